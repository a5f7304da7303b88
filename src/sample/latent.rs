//! Latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
//! Models", §3): a frozen AutoencoderKL around the U-Net. Training diffuses
//! `z = (encode(x).latent_dist.sample() − shift_factor) · scaling_factor`; sampling decodes
//! `z / scaling_factor + shift_factor` — diffusers' conventions (StableDiffusionPipeline; SD3's
//! pipelines for the shift, which is null for our VAEs and Stable Diffusion's).
//!
//! [`LatentVae`] is a VAE directory read and checked against a U-Net before the GPU starts;
//! [`LatentCodec`] is that VAE on the GPU, recording encode (training) and decode (sampling, the
//! training grids) into the caller's plan so neither costs a submit of its own.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};

use crate::gpu::{Gpu, Recorder, Tensor};
use crate::io::model_dir::read_model_weights;
use crate::nn::{UNetConfig, Vae, VaeConfig};
use crate::ops::OpResult;
use crate::ops::elementwise::{add_channel_bias, scale};
use crate::ops::noise::{purpose, random_normal};

/// A diffusers AutoencoderKL directory (`config.json` + `diffusion_pytorch_model.safetensors`),
/// read and checked, weights not yet loaded.
#[derive(Clone, Debug)]
pub struct LatentVae {
    pub dir: PathBuf,
    pub config: VaeConfig,
    /// Notes for the user (a defaulted scaling_factor, ignored keys).
    pub notes: Vec<String>,
}

impl LatentVae {
    /// Reads `dir/config.json`; a missing `scaling_factor` gets diffusers' default (noted).
    pub fn from_dir(dir: &Path) -> Result<LatentVae> {
        let path = dir.join("config.json");
        if !path.is_file() {
            bail!(
                "{} is not an AutoencoderKL directory: {} is missing (expected config.json + diffusion_pytorch_model.safetensors, e.g. the vae/ of a train-vae run)",
                dir.display(),
                path.display()
            );
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let config = VaeConfig::from_json(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let mut notes = Vec::new();
        if config.scaling_factor_defaulted {
            notes.push(format!(
                "{} has no scaling_factor: diffusers' default {} applies (latents of another VAE's scale would be off by the ratio)",
                path.display(),
                config.scaling_factor
            ));
        }
        if config.latents_mean.is_some() || config.latents_std.is_some() {
            notes.push(format!(
                "{}: latents_mean / latents_std are not used (as StableDiffusionPipeline ignores them); latents are scaled by scaling_factor and shift_factor only",
                path.display()
            ));
        }
        Ok(LatentVae {
            dir: dir.to_path_buf(),
            config,
            notes,
        })
    }

    /// A VAE directory beside a model (`vae/`), if there is one.
    pub fn beside(dir: &Path) -> Result<Option<LatentVae>> {
        let vae = dir.join("vae");
        if vae.join("config.json").is_file() {
            Ok(Some(Self::from_dir(&vae)?))
        } else {
            Ok(None)
        }
    }

    /// The latent the U-Net works on: [latent_channels, size, size] (CHW).
    pub fn latent_shape(&self) -> [usize; 3] {
        let c = &self.config;
        [c.latent_channels, c.latent_size(), c.latent_size()]
    }

    /// Refuses a U-Net that cannot diffuse this VAE's latents (before anything is allocated).
    pub fn check_fits(&self, unet: &UNetConfig) -> Result<()> {
        let [l, s, _] = self.latent_shape();
        let vae = self.dir.display();
        if unet.sr_scale.is_some() {
            bail!(
                "a super-resolution model cannot run in a VAE's latent space (--vae {vae}): its low-resolution input is an image"
            );
        }
        if unet.sample_size != s {
            bail!(
                "the U-Net's sample_size is {}, but the VAE {vae} makes {l}×{s}×{s} latents (sample_size {} / 2^{}): use a U-Net with sample_size {s} (e.g. the mnist-ldm preset for a 32×32 VAE with three blocks)",
                unet.sample_size,
                self.config.sample_size,
                self.config.block_out_channels.len() - 1
            );
        }
        if unet.in_channels != l || unet.out_channels != l {
            bail!(
                "the U-Net maps {} to {} channels, but the VAE {vae} has latent_channels {l}: the U-Net needs in_channels = out_channels = {l}",
                unet.in_channels,
                unet.out_channels
            );
        }
        Ok(())
    }

    /// The VAE on the GPU for batches of `batch` images of `size` (its square sample_size when
    /// None), with its weights: whole to encode (training), or `decode_only` (sampling: the
    /// encoder's activations get no storage).
    pub fn load(
        &self,
        gpu: &Arc<Gpu>,
        batch: usize,
        size: Option<(usize, usize)>,
        decode_only: bool,
    ) -> Result<LatentCodec> {
        let s = self.config.sample_size;
        let size = size.unwrap_or((s, s));
        // Frozen: encode for training, decode for sampling; no gradients kept.
        let _no_grad = crate::gpu::no_grad();
        let vae = if decode_only {
            Vae::decoder_at(gpu, &self.config, batch, size)
        } else {
            Vae::at(gpu, &self.config, batch, size)
        }
        .with_context(|| format!("building the VAE of {}", self.dir.display()))?;
        let weights = read_model_weights(&self.dir, &vae.params)?;
        if let Some(i) = weights.iter().position(|v| !v.is_finite()) {
            bail!(
                "{}: the VAE's weights hold a non-finite value (flat index {i}): the file is damaged",
                self.dir.display()
            );
        }
        vae.params.write_values(gpu, &weights)?;
        let shift = match self.config.shift_factor {
            Some(s) => {
                let values = vec![s as f32; batch * self.config.latent_channels];
                Some(gpu.tensor_from(
                    &[batch, self.config.latent_channels],
                    &values,
                    "vae shift_factor",
                )?)
            }
            None => None,
        };
        Ok(LatentCodec {
            vae,
            scaling_factor: self.config.scaling_factor as f32,
            shift,
        })
    }
}

/// A frozen VAE on the GPU that records latents in and out of a plan.
pub struct LatentCodec {
    pub vae: Vae,
    scaling_factor: f32,
    /// shift_factor per (sample, channel), for `add_channel_bias`.
    shift: Option<Tensor>,
}

impl LatentCodec {
    /// Records `out = (z − shift_factor) · scaling_factor`, z = μ + σ·ε the posterior's sample of
    /// `images` (NHWC, the VAE's [B, S, S, in_channels]), ε drawn from `rng_state`'s stream of the
    /// VAE's ε at `eps_offset` (each micro-batch its own slice).
    pub fn record_encode(
        &self,
        rec: &mut Recorder,
        images: &Tensor,
        rng_state: &Tensor,
        eps_offset: u32,
        out: &Tensor,
    ) -> OpResult {
        let vae = &self.vae;
        rec.copy(images, &vae.sample.value)?;
        random_normal(rec, rng_state, purpose::VAE_EPS, eps_offset, &vae.eps)?;
        vae.encode(rec)?;
        vae.sample_latent(rec)?;
        rec.copy(&vae.latent.value, out)?;
        if let Some(shift) = &self.shift {
            add_channel_bias(rec, shift, -1.0, out)?;
        }
        scale(rec, self.scaling_factor, out)
    }

    /// Records `decode(z / scaling_factor + shift_factor)` of `latents` (NHWC [B, s, s, L]) into
    /// `self.vae.output`. The division is a multiplication by the reciprocal (the last bit may
    /// differ from PyTorch's `latents / scaling_factor`).
    pub fn record_decode(&self, rec: &mut Recorder, latents: &Tensor) -> OpResult {
        let vae = &self.vae;
        rec.copy(latents, &vae.latent.value)?;
        scale(rec, 1.0 / self.scaling_factor, &vae.latent.value)?;
        if let Some(shift) = &self.shift {
            add_channel_bias(rec, shift, 1.0, &vae.latent.value)?;
        }
        vae.decode(rec)
    }

    /// The decoded images, NHWC [B, S, S, out_channels].
    pub fn output(&self) -> &Tensor {
        &self.vae.output.value
    }
}
