//! Reference for `shaders/gemm.wgsl`.
