//! `shaders/reduce.wgsl`.
