//! Reference for `shaders/loss.wgsl`.
