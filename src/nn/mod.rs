//! Layers that own parameters and activations, and the diffusers-exact U-Net built from them.
//!
//! No autograd: a model is built for a fixed batch size, allocating every activation and its
//! gradient once; `forward` records its dispatches in order and `backward` records the reverse
//! (llm.c's way). Parameter gradients always accumulate (`+=`) into one flat gradient buffer that
//! the trainer zeroes once per optimizer step, which makes gradient accumulation free.

pub mod attention;
pub mod clip_text;
pub mod cond_config;
pub mod config;
pub mod graph;
pub mod init;
pub mod layers;
pub mod params;
pub mod text_unet;
pub mod transformer;
pub mod unet;
pub mod vae;
pub mod vae_config;

pub use config::UNetConfig;
pub use params::{ParamSpec, ParamStore};
pub use unet::UNet;
pub use vae::Vae;
pub use vae_config::VaeConfig;

use std::collections::HashSet;
use std::sync::Arc;

use crate::gpu::{Gpu, Tensor};

/// An activation and the buffer of its gradient.
#[derive(Clone, Debug)]
pub struct Act {
    pub value: Tensor,
    pub grad: Tensor,
}

impl Act {
    /// An activation of the run's activation type (`Gpu::activation_dtype`: f16 in a
    /// half-precision run), its gradient of the same type.
    pub fn new(gpu: &Arc<Gpu>, shape: &[usize], label: &str) -> Act {
        let dtype = gpu.activation_dtype();
        Act {
            // No storage inside `gpu::unused_activations` (parts a build never runs).
            value: gpu.activation_tensor_of(shape, dtype, label),
            // None inside `gpu::no_grad` (sampling builds).
            grad: gpu.grad_tensor_of(shape, dtype, &format!("d {label}")),
        }
    }

    /// An f32 activation whatever the precision (see `gpu::f32_activations`).
    pub fn new_f32(gpu: &Arc<Gpu>, shape: &[usize], label: &str) -> Act {
        let _f32 = crate::gpu::f32_activations();
        Act::new(gpu, shape, label)
    }
    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }
}

/// Bookkeeping while a backward pass is recorded: an activation gradient is overwritten by the
/// first op that writes it and accumulated by every later one (an activation read by several
/// ops — skip connections, residuals, the time embedding — sums their gradients).
#[derive(Default)]
pub struct GradTracker {
    written: HashSet<usize>,
}

impl GradTracker {
    /// Whether the next write to `grad` must accumulate; marks it written.
    pub fn accumulate(&mut self, grad: &Tensor) -> bool {
        let key = grad.buffer() as *const wgpu::Buffer as usize + grad.offset();
        !self.written.insert(key)
    }
}
