//! `shaders/group_norm.wgsl`.
