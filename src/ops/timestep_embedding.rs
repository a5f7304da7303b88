//! `shaders/timestep_embedding.wgsl`.
