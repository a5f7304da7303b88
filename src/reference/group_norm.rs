//! Reference for `shaders/group_norm.wgsl`.
