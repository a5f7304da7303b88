//! Sample grids during training: DDPM with diffusers' set_timesteps(n) semantics on a batch-16
//! copy of the model that takes the EMA weights. Each reverse step is one submit (forward,
//! fresh noise, update); only the final images are read back.

use std::sync::Arc;

use anyhow::Result;

use crate::diffusion::sampler::{DdpmStep, ddpm_steps};
use crate::diffusion::{NoiseSchedule, PredictionType};
use crate::gpu::{Gpu, Plan, Tensor};
use crate::nn::{UNet, UNetConfig};
use crate::ops::diffusion::ddpm_step;
use crate::ops::noise::{purpose, random_normal, write_rng_state};

pub const GRID_IMAGES: usize = 16;

pub struct Sampler {
    unet: UNet,
    steps: Vec<DdpmStep>,
    coeffs: Tensor,
    rng_state: Tensor,
    init_plan: Plan,
    step_plan: Plan,
}

impl Sampler {
    pub fn new(
        gpu: &Arc<Gpu>,
        model: &UNetConfig,
        schedule: &NoiseSchedule,
        prediction: PredictionType,
        num_steps: usize,
    ) -> Result<Sampler> {
        let unet = UNet::for_inference(gpu, model, GRID_IMAGES)?;
        let steps = ddpm_steps(schedule, num_steps).map_err(anyhow::Error::msg)?;
        let coeffs = gpu.tensor(&[5], "ddpm coefficients");
        let rng_state = gpu.tensor(&[4], "sampling rng");
        let z = gpu.tensor(unet.sample.shape(), "sampling noise");
        let mut rec = gpu.recorder();
        random_normal(
            &mut rec,
            &rng_state,
            purpose::SAMPLING,
            0,
            &unet.sample.value,
        )?;
        let init_plan = rec.finish();
        let mut rec = gpu.recorder();
        unet.forward(&mut rec)?;
        random_normal(&mut rec, &rng_state, purpose::SAMPLING, 0, &z)?;
        ddpm_step(
            &mut rec,
            &unet.sample.value,
            &unet.output.value,
            &z,
            &coeffs,
            prediction,
            true,
        )?;
        let step_plan = rec.finish();
        Ok(Sampler {
            unet,
            steps,
            coeffs,
            rng_state,
            init_plan,
            step_plan,
        })
    }

    pub fn image_shape(&self) -> [usize; 4] {
        let s = self.unet.sample.shape();
        [s[0], s[1], s[2], s[3]]
    }

    /// Samples GRID_IMAGES images with `weights` (a flat parameter buffer of the same layout),
    /// seeded by `seed` alone (the same seed draws the same initial noise every time).
    pub fn sample(&mut self, gpu: &Arc<Gpu>, weights: &Tensor, seed: u64) -> Result<Vec<f32>> {
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(
            weights.buffer(),
            weights.byte_offset(),
            self.unet.params.params.buffer(),
            0,
            weights.byte_len(),
        );
        gpu.queue.submit([enc.finish()]);
        // Step u32::MAX draws x_T; step i draws the noise of reverse step i.
        write_rng_state(gpu, &self.rng_state, seed, u32::MAX)?;
        gpu.submit(&[&self.init_plan]);
        for (i, s) in self.steps.iter().enumerate() {
            gpu.write(&self.unet.timesteps, &[s.timestep as f32; GRID_IMAGES])?;
            gpu.write(&self.coeffs, &s.coefficients())?;
            write_rng_state(gpu, &self.rng_state, seed, i as u32)?;
            gpu.submit(&[&self.step_plan]);
        }
        Ok(gpu.read(&self.unet.sample.value)?)
    }
}
