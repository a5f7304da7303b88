//! `shaders/adamw.wgsl`.
