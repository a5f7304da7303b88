//! Beta schedules exactly as diffusers' `DDPMScheduler` builds them (in float32 where diffusers
//! uses float32, so ᾱ_t matches to the last digit), prediction types and min-SNR weighting.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Ho et al. 2020: betas linear in [beta_start, beta_end].
    Linear,
    /// Latent-diffusion: sqrt(betas) linear.
    ScaledLinear,
    /// Nichol & Dhariwal 2021 ("Improved DDPM", eq. 17): ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008, betas capped at 0.999.
    #[serde(rename = "squaredcos_cap_v2")]
    #[value(name = "squaredcos_cap_v2", alias = "cosine")]
    SquaredcosCapV2,
    /// Jolicoeur-Martineau-style sigmoid of linspace(-6, 6).
    Sigmoid,
}

impl BetaSchedule {
    pub fn diffusers_name(self) -> &'static str {
        match self {
            BetaSchedule::Linear => "linear",
            BetaSchedule::ScaledLinear => "scaled_linear",
            BetaSchedule::SquaredcosCapV2 => "squaredcos_cap_v2",
            BetaSchedule::Sigmoid => "sigmoid",
        }
    }
}

/// What the network predicts (diffusers' `prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise ε (DDPM).
    Epsilon,
    /// v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022).
    #[value(name = "v_prediction")]
    VPrediction,
    /// The clean sample x0.
    Sample,
}

/// What a model is trained to do (`train --objective`): DDPM's ε-, v- or x0-prediction on a beta
/// schedule, the VE-SDE's denoising score matching (Song et al. 2021), or EDM's preconditioned
/// denoiser (Karras et al. 2022).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    #[default]
    Ddpm,
    VeSde,
    Edm,
}

impl PredictionType {
    pub fn diffusers_name(self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
            PredictionType::Sample => "sample",
        }
    }
}

/// The most training timesteps a schedule may have (diffusers' models use 1000).
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

/// A scheduler config's key read through `get`: a finite positive number, or `default` when
/// the key is absent (the score-based schedulers' settings).
pub(crate) fn positive_key(
    get: &dyn Fn(&str) -> Option<serde_json::Value>,
    key: &str,
    default: f64,
) -> Result<f64, String> {
    match get(key) {
        None => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| format!("scheduler key `{key}` must be a positive number, is {v}")),
    }
}

/// A scheduler config's key read through `get`: an integer in `range`, or `default` when absent.
pub(crate) fn count_key(
    get: &dyn Fn(&str) -> Option<serde_json::Value>,
    key: &str,
    default: usize,
    range: std::ops::RangeInclusive<u64>,
) -> Result<usize, String> {
    match get(key) {
        None => Ok(default),
        Some(v) => v
            .as_u64()
            .filter(|x| range.contains(x))
            .map(|x| x as usize)
            .ok_or_else(|| {
                format!(
                    "scheduler key `{key}` must be an integer in {}..={}, is {v}",
                    range.start(),
                    range.end()
                )
            }),
    }
}

/// torch.linspace(start, end, steps, dtype=float32): torch computes the step in the input
/// precision and fills the first half forwards from `start`, the second half backwards from
/// `end` (aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp).
pub fn linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start as f32];
    }
    let (s, e) = (start as f32, end as f32);
    let step = (e - s) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                s + step * i as f32
            } else {
                e - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NoiseSchedule {
    pub num_train_timesteps: usize,
    pub beta_schedule: BetaSchedule,
    pub beta_start: f64,
    pub beta_end: f64,
    pub betas: Vec<f32>,
    pub alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    pub fn new(
        schedule: BetaSchedule,
        num_train_timesteps: usize,
        beta_start: f64,
        beta_end: f64,
    ) -> Result<NoiseSchedule, String> {
        if num_train_timesteps < 2 {
            return Err(format!(
                "num_train_timesteps must be at least 2, is {num_train_timesteps}"
            ));
        }
        let n = num_train_timesteps;
        let betas: Vec<f32> = match schedule {
            BetaSchedule::Linear => linspace_f32(beta_start, beta_end, n),
            BetaSchedule::ScaledLinear => linspace_f32(beta_start.sqrt(), beta_end.sqrt(), n)
                .iter()
                .map(|b| b * b)
                .collect(),
            BetaSchedule::SquaredcosCapV2 => {
                // betas_for_alpha_bar(n, max_beta=0.999, "cosine"): Python floats, then float32.
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                    })
                    .collect()
            }
            BetaSchedule::Sigmoid => {
                let (bs, be) = (beta_start as f32, beta_end as f32);
                linspace_f32(-6.0, 6.0, n)
                    .iter()
                    .map(|&x| 1.0 / (1.0 + (-x).exp()) * (be - bs) + bs)
                    .collect()
            }
        };
        if betas.iter().any(|&b| !(b > 0.0 && b < 1.0)) {
            return Err(format!(
                "the {schedule:?} schedule with beta_start {beta_start}, beta_end {beta_end} gives betas outside (0, 1)"
            ));
        }
        // alphas = 1 - betas in float32; torch.cumprod on the CPU accumulates in double
        // (ATen's acc_type<float> is double) and rounds each partial product to float32.
        let mut acc = 1.0f64;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= (1.0f32 - b) as f64;
                acc as f32
            })
            .collect();
        Ok(NoiseSchedule {
            num_train_timesteps: n,
            beta_schedule: schedule,
            beta_start,
            beta_end,
            betas,
            alphas_cumprod,
        })
    }

    /// Signal-to-noise ratio ᾱ/(1−ᾱ) at t.
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t] as f64;
        a / (1.0 - a)
    }

    /// min-SNR-γ loss weight (Hang et al. 2023, eq. 10) for timestep t, as diffusers'
    /// train_text_to_image computes it: min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v,
    /// min(SNR, γ) for x0.
    pub fn min_snr_weight(&self, t: usize, gamma: f64, prediction: PredictionType) -> f64 {
        let snr = self.snr(t);
        let m = snr.min(gamma);
        match prediction {
            PredictionType::Epsilon => m / snr,
            PredictionType::VPrediction => m / (snr + 1.0),
            PredictionType::Sample => m,
        }
    }

    /// diffusers' scheduler_config.json for a DDPMScheduler with this schedule. `clip_sample`
    /// clamps the x0 estimates to [-1, 1]: right for images, wrong for a VAE's latents, which
    /// range wider (Stable Diffusion's scheduler configs turn it off).
    pub fn scheduler_config_json(&self, prediction: PredictionType, clip_sample: bool) -> String {
        serde_json::to_string_pretty(&serde_json::json!({
            "_class_name": "DDPMScheduler",
            "_diffusers_version": "0.31.0",
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule.diffusers_name(),
            "trained_betas": null,
            "variance_type": "fixed_small",
            "clip_sample": clip_sample,
            "clip_sample_range": 1.0,
            "prediction_type": prediction.diffusers_name(),
            "thresholding": false,
            "timestep_spacing": "leading",
            "steps_offset": 0,
            "rescale_betas_zero_snr": false
        }))
        .expect("scheduler config")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_are_valid_and_decreasing() {
        for s in [
            BetaSchedule::Linear,
            BetaSchedule::ScaledLinear,
            BetaSchedule::SquaredcosCapV2,
            BetaSchedule::Sigmoid,
        ] {
            let (start, end) = if s == BetaSchedule::ScaledLinear {
                (0.00085, 0.012)
            } else {
                (1e-4, 0.02)
            };
            let ns = NoiseSchedule::new(s, 1000, start, end).unwrap();
            assert!(ns.alphas_cumprod.windows(2).all(|w| w[1] < w[0]), "{s:?}");
            assert!(ns.alphas_cumprod[999] > 0.0);
        }
        let lin = NoiseSchedule::new(BetaSchedule::Linear, 1000, 1e-4, 0.02).unwrap();
        assert_eq!(lin.betas[0], 1e-4f32);
        assert_eq!(lin.betas[999], 0.02f32);
        assert!(NoiseSchedule::new(BetaSchedule::Linear, 1, 1e-4, 0.02).is_err());
        assert!(NoiseSchedule::new(BetaSchedule::Linear, 10, 0.5, 1.5).is_err());
    }

    #[test]
    fn min_snr_weights() {
        let s = NoiseSchedule::new(BetaSchedule::Linear, 1000, 1e-4, 0.02).unwrap();
        // Early timesteps have huge SNR: the ε weight is γ/SNR < 1; late ones have SNR < γ: 1.
        assert!(s.min_snr_weight(0, 5.0, PredictionType::Epsilon) < 0.01);
        assert_eq!(s.min_snr_weight(999, 5.0, PredictionType::Epsilon), 1.0);
    }
}
