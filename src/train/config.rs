//! Training options: one struct read from a TOML `--config-file`, overridden by CLI flags, and
//! written back (resolved) into the run folder.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::diffusion::{BetaSchedule, PredictionType};

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
            out: None,
            data: None,
            hflip: false,
            strict: false,
            class_conditional: false,
            cond_drop: 0.1,
            task: Task::Generate,
            scale: 2,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), String> {
        let err = |m: String| Err(m);
        if self.steps == 0 {
            return err("steps must be at least 1".into());
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return err("batch_size and grad_accum must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return err(format!("lr must be positive, is {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.adam_beta1) || !(0.0..1.0).contains(&self.adam_beta2) {
            return err("adam betas must be in [0, 1)".into());
        }
        if self.max_grad_norm < 0.0 || self.snr_gamma < 0.0 || self.weight_decay < 0.0 {
            return err("max_grad_norm, snr_gamma and weight_decay must not be negative".into());
        }
        if !(0.0..=1.0).contains(&self.ema_decay) {
            return err(format!(
                "ema_decay must be in [0, 1], is {}",
                self.ema_decay
            ));
        }
        if self.sample_steps == 0 || self.sample_steps > self.num_train_timesteps {
            return err(format!(
                "sample_steps must be in 1..={}",
                self.num_train_timesteps
            ));
        }
        if self.task == Task::Sr && !matches!(self.scale, 2 | 4) {
            return err(format!("scale must be 2 or 4, is {}", self.scale));
        }
        if !(0.0..1.0).contains(&self.cond_drop) {
            return err(format!(
                "cond_drop must be in [0, 1), is {}",
                self.cond_drop
            ));
        }
        if self.checkpoint_every == 0 {
            return err("checkpoint_every must be at least 1".into());
        }
        if self.log_every == 0 || self.keep_checkpoints == 0 {
            return err("log_every and keep_checkpoints must be at least 1".into());
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
