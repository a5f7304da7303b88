//! The variance-exploding SDE of Song et al. 2021 ("Score-Based Generative Modeling through
//! Stochastic Differential Equations", §3.4 and Appendix C): σ(t) = σ_min·(σ_max/σ_min)^t on
//! data in [0, 1], a U-Net with fourier time features that receives σ and returns the score
//! (diffusers' UNet2DModel divides its output by σ), trained by denoising score matching with
//! λ(σ) = σ², and sampled with diffusers' `ScoreSdeVeScheduler` (predictor–corrector) or the
//! probability-flow ODE. A model trained with this objective records a `ScoreSdeVeScheduler`
//! scheduler config, which is how sampling knows the objective.

use serde_json::Value;

use super::schedule::{MAX_TRAIN_TIMESTEPS, count_key, positive_key};

/// What a VE-SDE model and its sampler agree on (`ScoreSdeVeScheduler`'s config).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VeSettings {
    pub sigma_min: f64,
    pub sigma_max: f64,
    /// The corrector's signal-to-noise ratio r (Algorithm 5).
    pub snr: f64,
    /// The last t of the sampling schedule (linspace(1, ε, N)); also training's smallest t.
    pub sampling_eps: f64,
    /// Langevin corrector steps before each predictor step.
    pub correct_steps: usize,
    pub num_train_timesteps: usize,
}

impl Default for VeSettings {
    /// `ScoreSdeVeScheduler()`'s defaults.
    fn default() -> Self {
        VeSettings {
            sigma_min: 0.01,
            sigma_max: 1348.0,
            snr: 0.15,
            sampling_eps: 1e-5,
            correct_steps: 1,
            num_train_timesteps: 2000,
        }
    }
}

impl VeSettings {
    /// σ(t) = σ_min·(σ_max/σ_min)^t.
    pub fn sigma(&self, t: f64) -> f64 {
        self.sigma_min * (self.sigma_max / self.sigma_min).powf(t)
    }

    /// Reads a `ScoreSdeVeScheduler` config: every key it has, defaults for the absent ones.
    pub fn from_scheduler_keys(get: &dyn Fn(&str) -> Option<Value>) -> Result<Self, String> {
        let d = VeSettings::default();
        let num = |k: &str, default: f64| positive_key(get, k, default);
        let s = VeSettings {
            sigma_min: num("sigma_min", d.sigma_min)?,
            sigma_max: num("sigma_max", d.sigma_max)?,
            snr: num("snr", d.snr)?,
            sampling_eps: num("sampling_eps", d.sampling_eps)?,
            correct_steps: count_key(get, "correct_steps", d.correct_steps, 0..=1000)?,
            num_train_timesteps: count_key(
                get,
                "num_train_timesteps",
                d.num_train_timesteps,
                1..=MAX_TRAIN_TIMESTEPS as u64,
            )?,
        };
        if s.sigma_min >= s.sigma_max {
            return Err(format!(
                "scheduler keys sigma_min ({}) must be below sigma_max ({})",
                s.sigma_min, s.sigma_max
            ));
        }
        if s.sampling_eps >= 1.0 {
            return Err(format!(
                "scheduler key `sampling_eps` must be below 1, is {}",
                s.sampling_eps
            ));
        }
        Ok(s)
    }

    /// The scheduler_config.json a VE-SDE run writes (`ScoreSdeVeScheduler` with these settings).
    pub fn scheduler_config_json(&self) -> String {
        serde_json::to_string_pretty(&serde_json::json!({
            "_class_name": "ScoreSdeVeScheduler",
            "_diffusers_version": "0.42.1",
            "num_train_timesteps": self.num_train_timesteps,
            "snr": self.snr,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "sampling_eps": self.sampling_eps,
            "correct_steps": self.correct_steps
        }))
        .expect("scheduler config")
    }
}

/// The largest Euclidean distance between two of `images` (flat, `len` values each, in
/// [−1, 1]) measured in [0, 1] — Song & Ermon 2020's technique 1 for σ_max — over the first
/// `limit` images (all pairs: O(limit²·len)).
pub fn max_pairwise_distance(images: &[f32], len: usize, limit: usize) -> f64 {
    let n = (images.len() / len.max(1)).min(limit);
    let img = |i: usize| &images[i * len..(i + 1) * len];
    let mut best = 0.0f64;
    for i in 0..n {
        let a = img(i);
        for j in i + 1..n {
            let d2: f32 = a.iter().zip(img(j)).map(|(x, y)| (x - y) * (x - y)).sum();
            best = best.max(d2 as f64);
        }
    }
    // [−1, 1] → [0, 1] halves every distance.
    0.5 * best.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_and_checks_values() {
        let s = VeSettings {
            sigma_max: 16.5,
            ..Default::default()
        };
        let v: Value = serde_json::from_str(&s.scheduler_config_json()).unwrap();
        assert_eq!(
            VeSettings::from_scheduler_keys(&|k| v.get(k).cloned()).unwrap(),
            s
        );
        let e = VeSettings::from_scheduler_keys(&|k| (k == "snr").then(|| Value::from(-1.0)))
            .unwrap_err();
        assert!(e.contains("snr"), "{e}");
        assert!((s.sigma(0.0) - 0.01).abs() < 1e-15 && (s.sigma(1.0) - 16.5).abs() < 1e-12);
    }

    #[test]
    fn pairwise_distance_in_unit_range() {
        // A black and a white 2-pixel image in [−1, 1]: distance √2 in [0, 1].
        let d = max_pairwise_distance(&[-1.0, -1.0, 1.0, 1.0, 0.0, 0.0], 2, 10);
        assert!((d - 2f64.sqrt()).abs() < 1e-6, "{d}");
    }
}
