//! `shaders/pack.wgsl`.
