//! `shaders/gemm.wgsl`.
