//! Reference for `shaders/conv2d.wgsl`.
