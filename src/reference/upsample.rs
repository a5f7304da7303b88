//! Reference for `shaders/upsample.wgsl`.
