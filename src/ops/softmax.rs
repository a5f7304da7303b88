//! `shaders/softmax.wgsl`.
