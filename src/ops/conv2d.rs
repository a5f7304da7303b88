//! `shaders/conv2d.wgsl`.
