//! The AutoencoderKL training step (issue 22's `train-vae`, library part): recorded once and
//! replayed with one submit, as the U-Net's. Per step: ε ~ N(0, I) from the run's counter-based
//! RNG (its own purpose), z = μ + σ·ε, x̂ = decode(z), loss = (1/B)Σ|x − x̂| + kl_weight · (1/B)Σ KL
//! (CompVis' autoencoder loss without its perceptual and GAN terms; `RecLoss::L2` puts
//! (1/B)Σ(x − x̂)² in place of the L1 term), the backward pass, and Adam with betas (0.5, 0.9) as
//! CompVis trains its autoencoders.
//!
//! A step's inputs are the parameters, the Adam moments, the step number (the RNG counter and
//! Adam's bias corrections) and the batch, so a checkpoint of the first three
//! ([`VaeTrainer::checkpoint_bytes`], [`VaeTrainer::restore`]) resumes a run bit for bit.
//!
//! In half precision (`precision = "f16"`: f16 GEMM and conv operands) the step scales its loss
//! with the U-Net's GPU-side GradScaler ([`StepScaler`]): the reconstruction gradient and the KL
//! term's are multiplied by the scale, and a step with inf/NaN gradients leaves the parameters,
//! the moments and Adam's t alone. Adam's t is then the scaler's count of steps taken, and the
//! scaler's state goes into checkpoints beside it.
//!
//! MNIST for the `mnist-vae` preset is padded from 28×28 to 32×32 with the background value
//! (−1 in [−1, 1]); PSNR is measured on the 28×28 crop ([`crop_psnr`]).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::loss_scaling::{StepScaler, check_health};
use crate::gpu::{Gpu, Plan, Precision, Tensor};
use crate::io::tensors::{LoadedTensors, serialize_named};
use crate::metrics::{psnr, to_unit};
use crate::nn::{Vae, VaeConfig};
use crate::ops::adamw::{
    AdamwConfig, AdamwHyper, EmaConfig, HYPER_LEN, adamw_step, grad_norm_unscaled, write_hyper,
};
use crate::ops::grad_scaler::{
    GradScalerConfig, ScalerState, grad_scaler_update, scale_loss_gradient,
};
use crate::ops::loss::{l1_backward, l1_loss, l2_backward, l2_loss};
use crate::ops::noise::{purpose, random_normal, write_rng_state};
use crate::ops::posterior::posterior_kl;

/// The reconstruction term of the VAE's loss: summed over each image, averaged over the batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum RecLoss {
    /// (1/B) Σ |x − x̂| (CompVis' autoencoders).
    #[default]
    L1,
    /// (1/B) Σ (x − x̂)².
    L2,
}

impl std::fmt::Display for RecLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RecLoss::L1 => "l1",
            RecLoss::L2 => "l2",
        })
    }
}

/// What a VAE run sets (what its steps depend on).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeTrainConfig {
    pub batch_size: usize,
    pub lr: f64,
    /// Weight of the KL term (CompVis' 1e-6).
    pub kl_weight: f64,
    pub seed: u64,
    pub rec_loss: RecLoss,
    /// f16: half-precision GEMM and conv operands with a GradScaler (torch.amp's defaults:
    /// initial scale 2^16, growth every 2000 clean steps). Runs from before it are f32.
    #[serde(default)]
    pub precision: Precision,
}

impl Default for VaeTrainConfig {
    fn default() -> Self {
        VaeTrainConfig {
            batch_size: 16,
            lr: 1e-3,
            kl_weight: 1e-6,
            seed: 0,
            rec_loss: RecLoss::L1,
            precision: Precision::F32,
        }
    }
}

/// The `format` of a VAE checkpoint's metadata.
pub const VAE_CHECKPOINT_FORMAT: &str = "wgpu-diffusion vae checkpoint v1";

/// Adam as CompVis trains its autoencoders: betas (0.5, 0.9), no weight decay.
pub const VAE_ADAM: AdamwConfig = AdamwConfig {
    beta1: 0.5,
    beta2: 0.9,
    eps: 1e-8,
    weight_decay: 0.0,
};

pub struct VaeTrainer {
    pub gpu: Arc<Gpu>,
    pub cfg: VaeTrainConfig,
    pub vae: Vae,
    rng_state: Tensor,
    hyper: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// [reconstruction loss, mean KL] of the step, and a view of each.
    losses: Tensor,
    pub rec_loss: Tensor,
    pub kl: Tensor,
    step_plan: Plan,
    /// Steps done (with a GradScaler, skipped ones included).
    pub step: u64,
    /// Dynamic loss scaling (half precision).
    scaler: Option<StepScaler>,
}

impl VaeTrainConfig {
    /// Every option checked by name (before anything is allocated).
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr must be a finite number > 0, is {}", self.lr);
        }
        if !(self.kl_weight.is_finite() && self.kl_weight >= 0.0) {
            bail!(
                "--kl-weight must be a finite number ≥ 0, is {}",
                self.kl_weight
            );
        }
        Ok(())
    }
}

impl VaeTrainer {
    /// Allocates the VAE and the optimizer state and records the step once.
    pub fn new(gpu: Arc<Gpu>, cfg: VaeTrainConfig, model: &VaeConfig) -> Result<VaeTrainer> {
        cfg.validate()?;
        if cfg.precision != gpu.precision {
            bail!(
                "the VAE run trains in {}, the GPU was opened for {}: give --precision {}",
                cfg.precision,
                gpu.precision,
                cfg.precision
            );
        }
        let scaler = match cfg.precision {
            Precision::F16 => Some(StepScaler::with_config(&gpu, GradScalerConfig::default())?),
            Precision::F32 => None,
        };
        let vae = Vae::new(&gpu, model, cfg.batch_size).context("building the VAE")?;
        let n = vae.params.len;
        let rng_state = gpu.tensor(&[4], "vae rng state");
        let hyper = gpu.tensor(&[HYPER_LEN], "adam hyper");
        let grad_scale = gpu.tensor_from(&[2], &[1.0, 0.0], "grad scale")?;
        let exp_avg = gpu.tensor(&[n], "exp_avg");
        let exp_avg_sq = gpu.tensor(&[n], "exp_avg_sq");
        // In one tensor, so one readback per step brings both; the KL at the first offset a
        // storage binding may start at.
        let kl_at = (gpu.limits.min_storage_buffer_offset_alignment as usize / 4).max(64);
        let losses = gpu.tensor(&[kl_at + 1], "rec loss, kl");
        let rec_loss = losses.view(0, &[1], "rec loss");
        let kl = losses.view(kl_at, &[1], "kl");
        let mut rec = gpu.recorder();
        rec.clear(&vae.params.grads);
        random_normal(&mut rec, &rng_state, purpose::VAE_EPS, 0, &vae.eps)?;
        vae.forward(&mut rec)?;
        let (x_rec, x) = (&vae.output.value, &vae.sample.value);
        match cfg.rec_loss {
            RecLoss::L1 => {
                l1_loss(&mut rec, x_rec, x, &rec_loss)?;
                l1_backward(&mut rec, x_rec, x, 1.0, &vae.output.grad)?;
            }
            RecLoss::L2 => {
                l2_loss(&mut rec, x_rec, x, &rec_loss)?;
                l2_backward(&mut rec, x_rec, x, 1.0, &vae.output.grad)?;
            }
        }
        let loss_scale = scaler.as_ref().map(|s| &s.state);
        if let Some(state) = loss_scale {
            scale_loss_gradient(&mut rec, state, &vae.output.grad)?;
        }
        posterior_kl(&mut rec, &vae.moments.value, &kl)?;
        vae.backward_scaled(&mut rec, cfg.kl_weight as f32, loss_scale)?;
        let p = &vae.params;
        let (p_v, g_v) = (p.chunk_views(p.params()), p.chunk_views(&p.grads));
        let (m_v, v_v) = (p.chunk_views(&exp_avg), p.chunk_views(&exp_avg_sq));
        // With a GradScaler: the unscaled gradients' norm (non-finite on an overflow), then the
        // skip decision and this step's Adam values in the scaler's hyper tensor; the update
        // multiplies the gradients by `grad_scale`[0] = 1/scale.
        let step_hyper = match &scaler {
            Some(s) => {
                grad_norm_unscaled(&mut rec, &g_v, None, &s.state, &grad_scale)?;
                let host = (&hyper, s.table());
                grad_scaler_update(&mut rec, &s.cfg, &s.state, &grad_scale, host, &s.hyper)?;
                &s.hyper
            }
            None => &hyper,
        };
        for i in 0..p_v.len() {
            adamw_step(
                &mut rec,
                step_hyper,
                &grad_scale,
                &g_v[i],
                &p_v[i],
                &m_v[i],
                &v_v[i],
            )?;
        }
        let step_plan = rec.finish();
        Ok(VaeTrainer {
            gpu,
            cfg,
            vae,
            rng_state,
            hyper,
            exp_avg,
            exp_avg_sq,
            losses,
            rec_loss,
            kl,
            step_plan,
            step: 0,
            scaler,
        })
    }

    /// The GradScaler's state after the last step (half precision only).
    pub fn scaler_state(&self) -> Option<ScalerState> {
        self.scaler.as_ref().map(StepScaler::last_read)
    }

    /// Starts from these weights (the flat layout of `vae.params`), with fresh Adam moments.
    pub fn set_weights(&mut self, weights: &[f32]) -> Result<()> {
        let g = &self.gpu;
        self.vae.params.write_values(g, weights)?;
        let zeros = vec![0.0; self.vae.params.len];
        g.write(&self.exp_avg, &zeros)?;
        g.write(&self.exp_avg_sq, &zeros)?;
        self.step = 0;
        if let Some(scaler) = self.scaler.as_mut() {
            scaler.reset(g, 0, ScalerState::fresh(scaler.cfg.init_scale, 0))?;
        }
        Ok(())
    }

    /// One step on `images` (NHWC, the batch's [B, S, S, C]); returns (loss, reconstruction
    /// loss, KL) read back. With a GradScaler, a step whose gradients overflowed is skipped
    /// (its loss may be non-finite: [`scaler_state`](Self::scaler_state) tells), and the run
    /// stops on the scaler's rules.
    pub fn train_step(&mut self, images: &[f32]) -> Result<(f32, f32, f32)> {
        let g = &self.gpu;
        g.write(&self.vae.sample.value, images)?;
        let t = self.step + 1;
        write_rng_state(g, &self.rng_state, self.cfg.seed, self.step as u32)?;
        // Adam's t: one past the steps taken (with a GradScaler the GPU picks it from the
        // table, skipped steps not counted).
        let adam_t = self.optimizer_steps() + 1;
        let lr = self.cfg.lr;
        write_hyper(
            g,
            &self.hyper,
            &AdamwHyper::new(&VAE_ADAM, lr, adam_t as u32, 0.0),
        )?;
        if let Some(scaler) = self.scaler.as_mut() {
            scaler.write_table(g, t, (&VAE_ADAM, &EmaConfig::default()), lr)?;
        }
        g.run(&[&self.step_plan])?;
        self.step = t;
        let both = g.read(&self.losses)?;
        let (rec, kl) = (both[0], both[both.len() - 1]);
        let loss = (rec as f64 + self.cfg.kl_weight * kl as f64) as f32;
        if let Some(scaler) = self.scaler.as_mut() {
            let state = scaler.read(g)?;
            scaler.note(t, state)?;
            check_health(t, &state, "Lower --lr or --kl-weight.")?;
            if state.skipped_in_row > 0 {
                return Ok((loss, rec, kl));
            }
        }
        if !loss.is_finite() {
            bail!("the VAE loss became non-finite ({loss}) at step {t}; lower --lr or --kl-weight");
        }
        Ok((loss, rec, kl))
    }

    /// Adam's steps taken: every step, or with a GradScaler those not skipped.
    pub fn optimizer_steps(&self) -> u64 {
        match &self.scaler {
            Some(scaler) => scaler.known_optimizer_steps(),
            None => self.step,
        }
    }

    /// A checkpoint: the parameters (`param.<name>`), Adam's moments (`exp_avg.<name>`,
    /// `exp_avg_sq.<name>`) and, in the metadata, `format`, `step`, the RNG's key, the GEMM path
    /// and `train_config` (this trainer's options as TOML, whose floats read back to the same bits;
    /// serde_json's default parser does not promise that) beside the caller's `meta`.
    pub fn checkpoint_bytes(&self, mut meta: HashMap<String, String>) -> Result<Vec<u8>> {
        let g = &self.gpu;
        let params = g.read(self.vae.params.params())?;
        let m = g.read(&self.exp_avg)?;
        let v = g.read(&self.exp_avg_sq)?;
        meta.insert("format".into(), VAE_CHECKPOINT_FORMAT.into());
        meta.insert("step".into(), self.step.to_string());
        meta.insert(
            "rng".into(),
            format!(
                "philox4x32-10 seed {} purpose {} counter step {}",
                self.cfg.seed,
                purpose::VAE_EPS,
                self.step
            ),
        );
        meta.insert("gemm_path".into(), g.gemm_path.to_string());
        meta.insert("train_config".into(), toml::to_string(&self.cfg)?);
        if let Some(scaler) = &self.scaler {
            let state = scaler.read(g)?;
            meta.insert("grad_scaler".into(), StepScaler::to_metadata(&state));
        }
        serialize_named(
            &self.vae.params,
            &[("param", &params), ("exp_avg", &m), ("exp_avg_sq", &v)],
            meta,
        )
    }

    /// Restores the parameters, Adam's moments and the step from a checkpoint of
    /// [`checkpoint_bytes`](Self::checkpoint_bytes) whose options are this trainer's.
    pub fn restore(&mut self, ck: &LoadedTensors) -> Result<()> {
        let meta = ck.metadata();
        let path = ck.path.display();
        if meta.get("format").map(String::as_str) != Some(VAE_CHECKPOINT_FORMAT) {
            bail!(
                "{path}: not a train-vae checkpoint (its metadata has no `format` {VAE_CHECKPOINT_FORMAT:?})"
            );
        }
        let stored: VaeTrainConfig = meta
            .get("train_config")
            .ok_or_else(|| anyhow!("{path}: metadata `train_config` is missing"))
            .and_then(|t| toml::from_str(t).map_err(|e| anyhow!("{path}: train_config: {e}")))?;
        if stored != self.cfg {
            bail!(
                "{path}: the checkpoint was trained with {stored:?}, this run has {:?}",
                self.cfg
            );
        }
        let step = meta
            .get("step")
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| anyhow!("{path}: metadata `step` is missing or not a number"))?;
        let store = &self.vae.params;
        let g = &self.gpu;
        store.write_values(g, &ck.flat(store, "param")?)?;
        g.write(&self.exp_avg, &ck.flat(store, "exp_avg")?)?;
        g.write(&self.exp_avg_sq, &ck.flat(store, "exp_avg_sq")?)?;
        self.step = step;
        if let Some(scaler) = self.scaler.as_mut() {
            let state = meta
                .get("grad_scaler")
                .ok_or_else(|| {
                    anyhow!(
                        "{path}: metadata `grad_scaler` is missing (an f16 run's checkpoint has it)"
                    )
                })
                .and_then(|m| StepScaler::from_metadata(m))?;
            scaler.reset(g, step, state)?;
        }
        Ok(())
    }
}

/// Digits on the VAE's canvas: MNIST's 28×28 padded to `size` (≥ 28) with the background.
pub fn mnist_canvas(images: &[f32], n: usize, size: usize) -> Result<Vec<f32>> {
    if size < 28 || !(size - 28).is_multiple_of(2) {
        bail!(
            "the VAE's sample_size {size} cannot hold MNIST's 28×28 digits with equal padding (28, 30, 32, …)"
        );
    }
    Ok(pad_digits(images, n, 28, (size - 28) / 2))
}

/// MNIST digits (NHWC [N, 28, 28, 1], values in [−1, 1]) padded by `pad` pixels on each side
/// with the background value −1.
pub fn pad_digits(images: &[f32], n: usize, side: usize, pad: usize) -> Vec<f32> {
    let big = side + 2 * pad;
    let mut out = vec![-1.0f32; n * big * big];
    for i in 0..n {
        for y in 0..side {
            let src = &images[(i * side + y) * side..(i * side + y + 1) * side];
            let at = (i * big + y + pad) * big + pad;
            out[at..at + side].copy_from_slice(src);
        }
    }
    out
}

/// Mean PSNR (images in [0, 1], MAX = 1) of reconstructions against originals, both NHWC
/// [N, big, big, 1], measured on the centred `side`×`side` crop.
pub fn crop_psnr(
    original: &[f32],
    reconstructed: &[f32],
    n: usize,
    big: usize,
    side: usize,
) -> f64 {
    let pad = (big - side) / 2;
    let crop = |v: &[f32], i: usize| -> Vec<f32> {
        (0..side)
            .flat_map(|y| {
                let at = (i * big + y + pad) * big + pad;
                v[at..at + side].to_vec()
            })
            .collect()
    };
    (0..n)
        .map(|i| {
            psnr(
                &to_unit(&crop(original, i)),
                &to_unit(&crop(reconstructed, i)),
            )
        })
        .sum::<f64>()
        / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run options written before `precision` existed read as f32; f16 round-trips.
    #[test]
    fn precision_defaults_to_f32_and_round_trips() {
        let f16 = VaeTrainConfig {
            precision: Precision::F16,
            ..Default::default()
        };
        let text = toml::to_string(&f16).unwrap();
        assert!(text.contains("precision = \"f16\""), "{text}");
        assert_eq!(toml::from_str::<VaeTrainConfig>(&text).unwrap(), f16);
        let old: String = text
            .lines()
            .filter(|l| !l.starts_with("precision"))
            .map(|l| format!("{l}\n"))
            .collect();
        let read: VaeTrainConfig = toml::from_str(&old).unwrap();
        assert_eq!(read.precision, Precision::F32);
    }
}
