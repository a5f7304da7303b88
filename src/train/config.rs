//! Training options: one struct read from a TOML `--config-file`, overridden by CLI flags, and
//! written back (resolved) into the run folder.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::diffusion::edm::EdmSettings;
use crate::diffusion::ve::VeSettings;
use crate::diffusion::{BetaSchedule, NoiseSchedule, Objective, PredictionType};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    Cosine,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Preset: tiny16, mnist28 or cifar32 (ignored when `model_config` is set).
    pub model: String,
    /// A diffusers UNet2DModel config.json.
    pub model_config: Option<PathBuf>,
    /// A diffusers model directory to fine-tune from.
    pub init: Option<PathBuf>,
    /// Latent diffusion: a diffusers AutoencoderKL directory; the U-Net learns its scaled
    /// latents (the VAE frozen).
    pub vae: Option<PathBuf>,
    pub steps: u64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub lr_warmup_steps: u64,
    pub lr_schedule: LrSchedule,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub max_grad_norm: f64,
    /// Dynamic loss scaling with torch.amp.GradScaler's semantics (`ops::grad_scaler`): the
    /// loss gradient × a scale; a step whose gradients are not finite is skipped (parameters,
    /// moments, AdamW's t and the EMA untouched) and the scale halves; after
    /// `grad_scaler_growth_interval` clean steps in a row it doubles. Half precision needs it;
    /// in f32 it turns an overflowing step into a skipped one instead of a stopped run.
    pub grad_scaler: bool,
    /// The scale the run starts from: a power of two (torch's default 2^16).
    pub grad_scaler_init_scale: f64,
    /// Clean steps in a row after which the scale doubles (torch's default 2000).
    pub grad_scaler_growth_interval: u64,
    /// `ddpm` (the beta schedule and prediction type below) or `edm` (Karras et al. 2022:
    /// preconditioned denoiser, ln σ ~ N(−1.2, 1.2²); the beta keys then do not apply).
    pub objective: Objective,
    /// EDM's σ_data, the data's standard deviation its preconditioning assumes.
    pub sigma_data: f64,
    /// VE-SDE: σ(t) = σ_min·(σ_max/σ_min)^t; σ_max 0 = measured at the start of the run as the
    /// largest pairwise distance of the training images in [0, 1] (Song & Ermon 2020,
    /// technique 1), and recorded in config.toml.
    pub ve_sigma_min: f64,
    pub ve_sigma_max: f64,
    pub beta_schedule: BetaSchedule,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub prediction_type: PredictionType,
    /// min-SNR-γ loss weighting (0 = off).
    pub snr_gamma: f64,
    pub ema: bool,
    pub ema_decay: f64,
    pub ema_min_decay: f64,
    pub ema_warmup: bool,
    pub ema_power: f64,
    pub seed: u64,
    /// Steps between sample grids, plus early grids at 100, 250, 500 and one at the end (0 = no
    /// grids).
    pub sample_every: u64,
    /// DDIM steps per sample grid (set_timesteps semantics).
    pub sample_steps: usize,
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
    /// Steps between loss readbacks / log lines.
    pub log_every: u64,
    /// Data parallel (mpirun): megabytes of gradients per all-reduce bucket; each bucket is
    /// read back and reduced as soon as the backward pass has finished it.
    pub bucket_mb: f64,
    pub out: Option<PathBuf>,
    /// A folder of images instead of the embedded MNIST.
    pub data: Option<PathBuf>,
    pub hflip: bool,
    pub strict: bool,
    /// Condition on class labels (MNIST's digits, or the sub-folders of `data`).
    pub class_conditional: bool,
    /// Label dropout for classifier-free guidance: the probability that a sample's label is
    /// replaced by the null class (0 = no unconditional branch).
    pub cond_drop: f64,
    /// Condition on captions through a CLIP text encoder and cross-attention (Stable
    /// Diffusion's UNet2DConditionModel): MNIST's digits described by templates, or the `text`
    /// of each image in `data`'s metadata.jsonl.
    pub text_conditional: bool,
    /// Caption dropout for classifier-free guidance: the probability that a sample's caption
    /// is replaced by the empty prompt.
    pub caption_drop: f64,
    /// A transformers CLIPTextModel directory to condition on (frozen unless
    /// `train_text_encoder`); none: a small text encoder trained from scratch with the U-Net.
    pub text_encoder: Option<PathBuf>,
    /// Train a loaded `text_encoder` with the U-Net (one trained from scratch always is).
    pub train_text_encoder: bool,
    /// A CLIPTokenizer directory (vocab.json + merges.txt, or tokenizer.json); none: one
    /// learned from the captions (BPE), written to the run folder.
    pub tokenizer: Option<PathBuf>,
    /// What the model learns: to generate images, or to super-resolve them.
    pub task: Task,
    /// Super-resolution factor (`task = "sr"`): LR = average pooling of the target by it.
    pub scale: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Unconditional or class-conditional generation.
    Generate,
    /// Super-resolution: the U-Net sees cat([x_t, bicubic(avg_pool(x0))]).
    Sr,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: "tiny16".into(),
            model_config: None,
            init: None,
            vae: None,
            steps: 3000,
            batch_size: 32,
            grad_accum: 1,
            lr: 1e-3,
            lr_warmup_steps: 100,
            lr_schedule: LrSchedule::Cosine,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            weight_decay: 1e-6,
            max_grad_norm: 1.0,
            grad_scaler: false,
            grad_scaler_init_scale: 65536.0,
            grad_scaler_growth_interval: 2000,
            objective: Objective::Ddpm,
            sigma_data: 0.5,
            ve_sigma_min: 0.01,
            ve_sigma_max: 0.0,
            beta_schedule: BetaSchedule::Linear,
            num_train_timesteps: 1000,
            beta_start: 1e-4,
            beta_end: 0.02,
            prediction_type: PredictionType::Epsilon,
            snr_gamma: 0.0,
            ema: true,
            ema_decay: 0.999,
            ema_min_decay: 0.0,
            ema_warmup: true,
            ema_power: 0.75,
            seed: 0,
            sample_every: 1000,
            sample_steps: 50,
            checkpoint_every: 500,
            keep_checkpoints: 3,
            log_every: 10,
            bucket_mb: 25.0,
            out: None,
            data: None,
            hflip: false,
            strict: false,
            class_conditional: false,
            cond_drop: 0.1,
            text_conditional: false,
            caption_drop: 0.1,
            text_encoder: None,
            train_text_encoder: false,
            tokenizer: None,
            task: Task::Generate,
            scale: 2,
        }
    }
}

impl TrainConfig {
    /// The scale must stay a power of two (unscaling is then exact) within f32's normal range,
    /// where the run's stop rule (below 2^-24) and f32 can both hold it.
    fn validate_grad_scaler(&self) -> Result<(), String> {
        let s = self.grad_scaler_init_scale;
        let power_of_two = s.is_finite() && s > 0.0 && s.log2().fract() == 0.0;
        if !(power_of_two && (2f64.powi(-24)..=2f64.powi(127)).contains(&s)) {
            return Err(format!(
                "grad_scaler_init_scale must be a power of two between 2^-24 and 2^127, is {s}"
            ));
        }
        if !(1..=u32::MAX as u64).contains(&self.grad_scaler_growth_interval) {
            return Err(format!(
                "grad_scaler_growth_interval must be in 1..={}, is {}",
                u32::MAX,
                self.grad_scaler_growth_interval
            ));
        }
        Ok(())
    }

    /// Checks every numeric option, naming the key (flags use the same names with dashes).
    pub fn validate(&self) -> Result<(), String> {
        fn at_least_one(name: &str, v: u64) -> Result<(), String> {
            if v == 0 {
                return Err(format!("{name} must be at least 1, is 0"));
            }
            Ok(())
        }
        fn finite_non_negative(name: &str, v: f64) -> Result<(), String> {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{name} must be a finite number >= 0, is {v}"));
            }
            Ok(())
        }
        fn in_unit_interval(name: &str, v: f64) -> Result<(), String> {
            if !(0.0..1.0).contains(&v) {
                return Err(format!("{name} must be in [0, 1), is {v}"));
            }
            Ok(())
        }
        at_least_one("steps", self.steps)?;
        // Step numbers key the random streams as 32-bit words; one more is kept for sampling.
        if self.steps >= u32::MAX as u64 {
            return Err(format!(
                "steps must be below {}, is {}",
                u32::MAX,
                self.steps
            ));
        }
        at_least_one("batch_size", self.batch_size as u64)?;
        at_least_one("grad_accum", self.grad_accum as u64)?;
        at_least_one("checkpoint_every", self.checkpoint_every)?;
        at_least_one("log_every", self.log_every)?;
        if !(self.bucket_mb.is_finite() && self.bucket_mb >= 0.001 && self.bucket_mb <= 4096.0) {
            return Err(format!(
                "bucket_mb must be between 0.001 and 4096 (megabytes of gradients per all-reduce bucket), is {}",
                self.bucket_mb
            ));
        }
        at_least_one("keep_checkpoints", self.keep_checkpoints as u64)?;
        // The loss log holds one window on the GPU.
        if self.log_every > 100_000 {
            return Err(format!(
                "log_every must be at most 100000, is {}",
                self.log_every
            ));
        }
        finite_non_negative("lr", self.lr)?;
        finite_non_negative("weight_decay", self.weight_decay)?;
        finite_non_negative("max_grad_norm", self.max_grad_norm)?;
        self.validate_grad_scaler()?;
        finite_non_negative("snr_gamma", self.snr_gamma)?;
        finite_non_negative("ema_power", self.ema_power)?;
        in_unit_interval("adam_beta1", self.adam_beta1)?;
        in_unit_interval("adam_beta2", self.adam_beta2)?;
        if !(self.adam_eps.is_finite() && self.adam_eps > 0.0) {
            return Err(format!(
                "adam_eps must be a finite number > 0, is {}",
                self.adam_eps
            ));
        }
        in_unit_interval("ema_decay", self.ema_decay)?;
        in_unit_interval("ema_min_decay", self.ema_min_decay)?;
        if self.ema_min_decay > self.ema_decay {
            return Err(format!(
                "ema_min_decay ({}) must not exceed ema_decay ({})",
                self.ema_min_decay, self.ema_decay
            ));
        }
        in_unit_interval("cond_drop", self.cond_drop)?;
        in_unit_interval("caption_drop", self.caption_drop)?;
        if self.text_conditional && self.class_conditional {
            return Err(
                "text_conditional and class_conditional exclude each other: a model conditions on captions or on class labels"
                    .into(),
            );
        }
        if !(1..=100_000).contains(&self.num_train_timesteps) {
            return Err(format!(
                "num_train_timesteps must be in 1..=100000, is {}",
                self.num_train_timesteps
            ));
        }
        let betas_ok = self.beta_start.is_finite()
            && self.beta_end.is_finite()
            && 0.0 < self.beta_start
            && self.beta_start <= self.beta_end
            && self.beta_end < 1.0;
        if !betas_ok {
            return Err(format!(
                "beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1, are {} and {}",
                self.beta_start, self.beta_end
            ));
        }
        if self.sample_steps == 0 || self.sample_steps > self.num_train_timesteps {
            return Err(format!(
                "sample_steps must be in 1..={}, is {}",
                self.num_train_timesteps, self.sample_steps
            ));
        }
        if self.task == Task::Sr && !matches!(self.scale, 2 | 4) {
            return Err(format!("scale must be 2 or 4, is {}", self.scale));
        }
        self.validate_objective()
    }

    /// The checks of the objective's own options and of what it cannot be combined with.
    fn validate_objective(&self) -> Result<(), String> {
        if !(self.sigma_data.is_finite() && self.sigma_data > 0.0) {
            return Err(format!(
                "sigma_data must be a finite number > 0, is {}",
                self.sigma_data
            ));
        }
        if self.objective != Objective::Ddpm {
            let name = self.objective_name();
            if self.prediction_type != PredictionType::Epsilon {
                return Err(format!(
                    "objective {name} trains its own output (EDM: F of D = c_skip·x + c_out·F; VE-SDE: the score): prediction_type {} does not apply, drop it",
                    self.prediction_type.diffusers_name()
                ));
            }
            if self.snr_gamma > 0.0 {
                return Err(format!(
                    "objective {name} has its own loss weighting λ(σ): snr_gamma does not apply, drop it"
                ));
            }
            if self.task == Task::Sr {
                return Err(format!(
                    "objective {name} is not supported with task sr (super-resolution trains with ddpm)"
                ));
            }
        }
        let ve_ok = self.ve_sigma_min.is_finite()
            && self.ve_sigma_min > 0.0
            && self.ve_sigma_max.is_finite()
            && (self.ve_sigma_max == 0.0 || self.ve_sigma_max > self.ve_sigma_min);
        if !ve_ok {
            return Err(format!(
                "ve_sigma_min must be > 0 and ve_sigma_max 0 (measure it) or above it, are {} and {}",
                self.ve_sigma_min, self.ve_sigma_max
            ));
        }
        Ok(())
    }

    /// The objective's name in the config file and on the command line.
    pub fn objective_name(&self) -> &'static str {
        match self.objective {
            Objective::Ddpm => "ddpm",
            Objective::VeSde => "ve-sde",
            Objective::Edm => "edm",
        }
    }

    /// The VE-SDE settings of an `objective = "ve-sde"` run once σ_max is known.
    pub fn ve(&self) -> Option<VeSettings> {
        (self.objective == Objective::VeSde).then(|| VeSettings {
            sigma_min: self.ve_sigma_min,
            sigma_max: self.ve_sigma_max,
            ..Default::default()
        })
    }

    /// The EDM settings of an `objective = "edm"` run (the sampler's config).
    pub fn edm(&self) -> Option<EdmSettings> {
        (self.objective == Objective::Edm).then(|| EdmSettings {
            sigma_data: self.sigma_data,
            num_train_timesteps: self.num_train_timesteps,
            ..Default::default()
        })
    }

    /// The scheduler_config.json the run's checkpoints and exports carry: a DDPMScheduler with
    /// the run's schedule and prediction type, or an EDM run's EDMEulerScheduler.
    pub fn scheduler_config_json(&self) -> Result<String, String> {
        if let Some(ve) = self.ve() {
            return Ok(ve.scheduler_config_json());
        }
        match self.edm() {
            Some(edm) => Ok(edm.scheduler_config_json()),
            None => {
                let json = NoiseSchedule::new(
                    self.beta_schedule,
                    self.num_train_timesteps,
                    self.beta_start,
                    self.beta_end,
                )?
                // A latent model's x0 is a scaled latent, not an image in [-1, 1]: no clipping.
                .scheduler_config_json(self.prediction_type, self.vae.is_none());
                if !(self.text_conditional && self.vae.is_some()) {
                    return Ok(json);
                }
                // A Stable Diffusion pipeline: steps_offset 1, as SD's configs have it (and
                // as StableDiffusionPipeline would amend any other value).
                let mut v: serde_json::Value =
                    serde_json::from_str(&json).map_err(|e| e.to_string())?;
                v["steps_offset"] = 1.into();
                serde_json::to_string_pretty(&v).map_err(|e| e.to_string())
            }
        }
    }

    /// The random streams address a step's draws with 32-bit counters: every micro-batch's noise
    /// (grad_accum x batch_size x the image's `image_numel` values) must fit in them.
    pub fn validate_rng_range(&self, image_numel: usize) -> Result<(), String> {
        let draws =
            (self.grad_accum as u128) * (self.batch_size as u128) * (image_numel.max(1) as u128);
        if draws > u32::MAX as u128 {
            return Err(format!(
                "grad_accum x batch_size x image size = {} x {} x {image_numel} = {draws} noise values per step; the random streams address at most {} (lower grad_accum or batch_size)",
                self.grad_accum,
                self.batch_size,
                u32::MAX
            ));
        }
        Ok(())
    }

    /// Learning rate at optimizer step `step` (1-based): linear warmup, then constant or
    /// half-cosine decay to 0 at `steps` (diffusers get_cosine_schedule_with_warmup).
    pub fn lr_at(&self, step: u64) -> f64 {
        let s = step.saturating_sub(1) as f64;
        let warm = self.lr_warmup_steps as f64;
        if s < warm {
            return self.lr * s / warm.max(1.0);
        }
        match self.lr_schedule {
            LrSchedule::Constant => self.lr,
            LrSchedule::Cosine => {
                let progress = (s - warm) / ((self.steps as f64 - warm).max(1.0));
                self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trip_and_unknown_keys() {
        let c = TrainConfig {
            steps: 7,
            model: "mnist28".into(),
            snr_gamma: 5.0,
            ..Default::default()
        };
        let text = toml::to_string(&c).unwrap();
        assert_eq!(toml::from_str::<TrainConfig>(&text).unwrap(), c);
        assert!(
            toml::from_str::<TrainConfig>("stepz = 3")
                .unwrap_err()
                .to_string()
                .contains("stepz")
        );
        let partial: TrainConfig = toml::from_str(
            "steps = 5\nprediction_type = \"v_prediction\"\nbeta_schedule = \"squaredcos_cap_v2\"",
        )
        .unwrap();
        assert_eq!((partial.steps, partial.batch_size), (5, 32));
    }

    #[test]
    fn zero_intervals_are_refused_by_name() {
        let c = TrainConfig {
            checkpoint_every: 0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("checkpoint_every"));
        let c = TrainConfig {
            log_every: 0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("log_every"));
        let c = TrainConfig {
            cond_drop: 1.0,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().contains("cond_drop"));
    }

    /// Each config is refused with an error naming its option.
    fn assert_refused_by_name(bad: Vec<(&str, TrainConfig)>) {
        for (name, c) in bad {
            let e = c.validate().unwrap_err();
            assert!(e.contains(name), "{name}: {e}");
        }
    }

    /// Counts and intervals: zero, steps past the random streams' 32-bit step numbers, a log
    /// window past what the GPU loss log holds.
    #[test]
    fn sizes_and_intervals_are_checked_by_name() {
        assert_refused_by_name(vec![
            (
                "steps",
                TrainConfig {
                    steps: 0,
                    ..Default::default()
                },
            ),
            (
                "steps",
                TrainConfig {
                    steps: u32::MAX as u64,
                    ..Default::default()
                },
            ),
            (
                "batch_size",
                TrainConfig {
                    batch_size: 0,
                    ..Default::default()
                },
            ),
            (
                "grad_accum",
                TrainConfig {
                    grad_accum: 0,
                    ..Default::default()
                },
            ),
            (
                "keep_checkpoints",
                TrainConfig {
                    keep_checkpoints: 0,
                    ..Default::default()
                },
            ),
            (
                "log_every",
                TrainConfig {
                    log_every: 1 << 40,
                    ..Default::default()
                },
            ),
        ]);
    }

    /// The optimizer's and EMA's rates and factors: negative, not finite, or outside the
    /// interval they must lie in.
    #[test]
    fn optimizer_options_are_checked_by_name() {
        assert_refused_by_name(vec![
            (
                "lr",
                TrainConfig {
                    lr: -1e-3,
                    ..Default::default()
                },
            ),
            (
                "lr",
                TrainConfig {
                    lr: f64::NAN,
                    ..Default::default()
                },
            ),
            (
                "lr",
                TrainConfig {
                    lr: f64::INFINITY,
                    ..Default::default()
                },
            ),
            (
                "weight_decay",
                TrainConfig {
                    weight_decay: -0.1,
                    ..Default::default()
                },
            ),
            (
                "weight_decay",
                TrainConfig {
                    weight_decay: f64::NAN,
                    ..Default::default()
                },
            ),
            (
                "max_grad_norm",
                TrainConfig {
                    max_grad_norm: -1.0,
                    ..Default::default()
                },
            ),
            (
                "max_grad_norm",
                TrainConfig {
                    max_grad_norm: f64::NAN,
                    ..Default::default()
                },
            ),
            (
                "snr_gamma",
                TrainConfig {
                    snr_gamma: f64::NAN,
                    ..Default::default()
                },
            ),
            (
                "ema_decay",
                TrainConfig {
                    ema_decay: 1.0,
                    ..Default::default()
                },
            ),
            (
                "ema_decay",
                TrainConfig {
                    ema_decay: -0.5,
                    ..Default::default()
                },
            ),
            (
                "ema_decay",
                TrainConfig {
                    ema_decay: f64::NAN,
                    ..Default::default()
                },
            ),
            (
                "adam_beta2",
                TrainConfig {
                    adam_beta2: 1.0,
                    ..Default::default()
                },
            ),
            (
                "adam_eps",
                TrainConfig {
                    adam_eps: 0.0,
                    ..Default::default()
                },
            ),
        ]);
    }

    /// The noise schedule (betas out of order, no timesteps) and the sampling steps of the
    /// periodic sample grids.
    #[test]
    fn noise_schedule_and_sampling_options_are_checked_by_name() {
        assert_refused_by_name(vec![
            (
                "beta_start",
                TrainConfig {
                    beta_start: 0.5,
                    beta_end: 0.1,
                    ..Default::default()
                },
            ),
            (
                "num_train_timesteps",
                TrainConfig {
                    num_train_timesteps: 0,
                    ..Default::default()
                },
            ),
            (
                "sample_steps",
                TrainConfig {
                    sample_steps: 0,
                    ..Default::default()
                },
            ),
        ]);
    }

    #[test]
    fn zero_means_off_where_an_option_allows_it() {
        // 0 is allowed where it means "off" or "none".
        let zeros = TrainConfig {
            lr: 0.0,
            weight_decay: 0.0,
            max_grad_norm: 0.0,
            sample_every: 0,
            ema_decay: 0.0,
            ..Default::default()
        };
        zeros.validate().unwrap();
    }

    #[test]
    fn rng_range_is_checked_by_name() {
        // The random streams' 32-bit range: 2^16 x 2^8 x 16x16 overflows, 2^8 x 32 x 16x16 fits.
        let big = TrainConfig {
            grad_accum: 1 << 16,
            batch_size: 1 << 8,
            ..Default::default()
        };
        big.validate().unwrap();
        assert!(
            big.validate_rng_range(256)
                .unwrap_err()
                .contains("grad_accum")
        );
        TrainConfig {
            grad_accum: 256,
            ..Default::default()
        }
        .validate_rng_range(256)
        .unwrap();
    }

    #[test]
    fn lr_warmup_then_cosine() {
        let c = TrainConfig {
            lr: 1.0,
            lr_warmup_steps: 10,
            steps: 110,
            ..Default::default()
        };
        assert_eq!(c.lr_at(1), 0.0);
        assert!((c.lr_at(6) - 0.5).abs() < 1e-12);
        assert!((c.lr_at(11) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(61) - 0.5).abs() < 1e-12);
        assert!(c.lr_at(110) < 1e-3);
    }
}
