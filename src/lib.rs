//! wgpu-diffusion: DDPM training and sampling where every tensor operation is a WGSL compute
//! shader dispatched through wgpu (Vulkan, Metal, DX12; lavapipe for headless CI).

pub mod bench;
pub mod cli_sample;
pub mod cli_train;
pub mod cli_vae;
pub mod data;
pub mod diffusion;
/// The ranks of a data-parallel job (MPI with the `mpi` feature under a launcher; one rank otherwise).
pub mod dist;
pub mod gpu;
pub mod io;
pub mod metrics;
pub mod nn;
pub mod ops;
pub mod progress;
/// The tests' f64 oracle (forward and backward of every op). Only `tests/` and `#[cfg(test)]` code
/// may use it (`tests/layering.rs`); the product never does.
#[doc(hidden)]
pub mod reference;
pub mod rng;
pub mod robustness;
pub mod sample;
pub mod text;
pub mod train;
