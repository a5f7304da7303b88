//! Reference for `shaders/timestep_embedding.wgsl`.
