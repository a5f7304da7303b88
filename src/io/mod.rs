//! Files in and out, between `nn` and `train`/`sample` (docs/ARCHITECTURE.md, "Layers and what
//! each may import"): atomic writes, PNG images and grids, safetensors tensors and diffusers model
//! directories. Training checkpoints are safetensors files written by `train::trainer` through
//! these same functions.

pub mod atomic;
pub mod images;
pub mod model_dir;
pub mod tensors;
