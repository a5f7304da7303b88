//! Reference for `shaders/noise.wgsl`.
