//! Reference for `shaders/adamw.wgsl`.
