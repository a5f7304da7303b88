//! `shaders/loss.wgsl`.
