//! `shaders/noise.wgsl`.
