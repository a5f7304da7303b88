//! Reference for `shaders/reduce.wgsl`.
