//! Reference for `shaders/softmax.wgsl`.
