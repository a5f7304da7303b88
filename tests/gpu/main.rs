//! GPU kernel tests: every kernel against its f64 reference (`wgpu_diffusion::reference`) on
//! several shapes, odd ones included. One integration-test binary so wgpu links once.
//!
//! These tests need a GPU adapter; with none they FAIL (never skip) and say how to get one.
//! On Linux without a GPU: `apt-get install mesa-vulkan-drivers` (lavapipe).

mod adamw;
mod attention;
mod bands;
mod cli;
mod clip_text;
mod common;
mod conv2d;
mod edm;
mod elementwise;
mod embedding;
mod f16_storage;
mod gelu;
mod gemm;
mod grad_scaler;
mod group_norm;
mod half_operands;
mod hostile;
mod kernel_keys;
mod layer_norm;
mod ldm;
mod loss;
mod noise;
mod parity;
mod posterior;
mod reduce;
mod sample_cli;
mod sample_parity;
mod samplers;
mod sd_pipeline;
mod softmax;
mod timestep_embedding;
mod train;
mod transformer2d;
mod upsample;
mod vae;
mod ve;
