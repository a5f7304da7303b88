//! `shaders/upsample.wgsl`.
