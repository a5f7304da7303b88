//! EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
//! Models"): the preconditioning of Table 1, the training noise distribution, the ρ-spaced σ
//! schedule (eq. 5) and the two samplers — diffusers' `EDMEulerScheduler` and the paper's
//! 2nd-order Heun (Algorithm 1, S_churn = 0, as NVlabs' `edm_sampler` runs it), whose loops
//! `families::EdmSigmas` builds. A model trained with this objective records an
//! `EDMEulerScheduler` scheduler config, which is how sampling knows the objective.

use serde_json::Value;

use super::PredictionType;
use super::schedule::{MAX_TRAIN_TIMESTEPS, count_key, positive_key};

/// EDM's training noise: ln σ ~ N(P_mean, P_std²) (Table 1).
pub const P_MEAN: f64 = -1.2;
pub const P_STD: f64 = 1.2;

/// What an EDM model and its sampler agree on (`EDMEulerScheduler`'s config).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EdmSettings {
    pub sigma_min: f64,
    pub sigma_max: f64,
    /// σ_data, the data's standard deviation the preconditioning assumes.
    pub sigma_data: f64,
    pub rho: f64,
    /// `epsilon`: D = c_skip·x + c_out·F (EDM's own F); `v_prediction`: c_out negated.
    pub prediction: PredictionType,
    pub num_train_timesteps: usize,
}

impl Default for EdmSettings {
    /// `EDMEulerScheduler()`'s defaults, the EDM paper's values.
    fn default() -> Self {
        EdmSettings {
            sigma_min: 0.002,
            sigma_max: 80.0,
            sigma_data: 0.5,
            rho: 7.0,
            prediction: PredictionType::Epsilon,
            num_train_timesteps: 1000,
        }
    }
}

/// The preconditioning of Table 1 at one σ.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Preconditioning {
    pub c_skip: f64,
    pub c_out: f64,
    pub c_in: f64,
    pub c_noise: f64,
}

impl EdmSettings {
    /// c_skip = σ_d²/(σ²+σ_d²), c_out = σσ_d/√(σ²+σ_d²), c_in = 1/√(σ²+σ_d²), c_noise = ¼ ln σ.
    pub fn precondition(&self, sigma: f64) -> Preconditioning {
        let sd2 = self.sigma_data * self.sigma_data;
        let v = sigma * sigma + sd2;
        Preconditioning {
            c_skip: sd2 / v,
            c_out: sigma * self.sigma_data / v.sqrt(),
            c_in: 1.0 / v.sqrt(),
            c_noise: 0.25 * sigma.ln(),
        }
    }

    /// Reads an `EDMEulerScheduler` config: every key it has, defaults for the absent ones,
    /// settings we do not implement refused by name.
    pub fn from_scheduler_keys(get: &dyn Fn(&str) -> Option<Value>) -> Result<Self, String> {
        let d = EdmSettings::default();
        let num = |k: &str, default: f64| positive_key(get, k, default);
        let text = |k: &str, ok: &[&str]| -> Result<Option<String>, String> {
            match get(k) {
                None => Ok(None),
                Some(Value::String(s)) if ok.contains(&s.as_str()) => Ok(Some(s)),
                Some(v) => Err(format!(
                    "scheduler setting `{k}` = {v} is not supported for EDMEulerScheduler ({})",
                    ok.join(", ")
                )),
            }
        };
        text("sigma_schedule", &["karras"])?;
        text("final_sigmas_type", &["zero"])?;
        let prediction = match text("prediction_type", &["epsilon", "v_prediction"])?.as_deref() {
            Some("v_prediction") => PredictionType::VPrediction,
            _ => PredictionType::Epsilon,
        };
        let s = EdmSettings {
            sigma_min: num("sigma_min", d.sigma_min)?,
            sigma_max: num("sigma_max", d.sigma_max)?,
            sigma_data: num("sigma_data", d.sigma_data)?,
            rho: num("rho", d.rho)?,
            prediction,
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
        Ok(s)
    }

    /// The scheduler_config.json an EDM run writes (`EDMEulerScheduler` with these settings).
    pub fn scheduler_config_json(&self) -> String {
        serde_json::to_string_pretty(&serde_json::json!({
            "_class_name": "EDMEulerScheduler",
            "_diffusers_version": "0.42.1",
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "sigma_data": self.sigma_data,
            "sigma_schedule": "karras",
            "num_train_timesteps": self.num_train_timesteps,
            "prediction_type": self.prediction.diffusers_name(),
            "rho": self.rho,
            "final_sigmas_type": "zero"
        }))
        .expect("scheduler config")
    }

    /// eq. 5: σ_i = (σ_max^{1/ρ} + r_i (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ for r = linspace(0, 1, n),
    /// in float64 (both diffusers and NVlabs compute it so), then σ_n = 0.
    pub fn karras_sigmas(&self, n: usize) -> Vec<f64> {
        let (lo, hi) = (
            self.sigma_min.powf(1.0 / self.rho),
            self.sigma_max.powf(1.0 / self.rho),
        );
        let mut s: Vec<f64> = (0..n)
            .map(|i| {
                let r = if n == 1 {
                    0.0
                } else {
                    i as f64 / (n - 1) as f64
                };
                (hi + r * (lo - hi)).powf(self.rho)
            })
            .collect();
        s.push(0.0);
        s
    }

    /// (a, s) of the x0 estimate for the sampler kernels' v form x0 = a·x − s·m (see
    /// `scheduler::Update`): D = c_skip·x ± c_out·F is that form with (c_skip, ∓c_out).
    pub fn x0_coefficients(&self, sigma: f64) -> (f32, f32) {
        let p = self.precondition(sigma);
        let sign = match self.prediction {
            PredictionType::VPrediction => 1.0,
            _ => -1.0,
        };
        (p.c_skip as f32, (sign * p.c_out) as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preconditioning_is_table_1() {
        let s = EdmSettings::default();
        let p = s.precondition(0.5);
        // σ = σ_d: c_skip = ½, c_out = σ_d/√2, c_in = 1/(σ_d√2).
        assert!((p.c_skip - 0.5).abs() < 1e-15);
        assert!((p.c_out - 0.5 / 2f64.sqrt()).abs() < 1e-15);
        assert!((p.c_in - 1.0 / (0.5 * 2f64.sqrt())).abs() < 1e-12);
        assert!((p.c_noise - 0.25 * 0.5f64.ln()).abs() < 1e-15);
        // λ(σ)·c_out² = 1 (the loss weight makes the effective F-target loss unweighted).
        for sigma in [0.002, 0.3, 1.0, 80.0] {
            let p = s.precondition(sigma);
            let lambda = (sigma * sigma + 0.25) / (sigma * 0.5).powi(2);
            assert!((lambda * p.c_out * p.c_out - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn karras_sigmas_span_the_range() {
        let s = EdmSettings::default();
        let sig = s.karras_sigmas(18);
        assert_eq!(sig.len(), 19);
        assert!((sig[0] - 80.0).abs() < 1e-9);
        assert!((sig[17] - 0.002).abs() < 1e-12);
        assert_eq!(sig[18], 0.0);
        assert!(sig.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn loops_and_their_errors() {
        use crate::diffusion::families::EdmSigmas;
        use crate::diffusion::scheduler::SamplerKind;
        let s = EdmSettings::default();
        let euler = EdmSigmas::new(s, SamplerKind::Euler)
            .unwrap()
            .schedule(18)
            .unwrap();
        assert_eq!(euler.evals.len(), 18);
        assert!((euler.init_noise_sigma - (80f32 * 80.0 + 1.0).sqrt()).abs() < 1e-4);
        assert!((euler.timesteps[0] - 0.25 * 80f32.ln()).abs() < 1e-6);
        let heun = EdmSigmas::new(s, SamplerKind::Heun)
            .unwrap()
            .schedule(18)
            .unwrap();
        assert_eq!(heun.evals.len(), 35);
        assert_eq!(heun.init_noise_sigma, 80.0);
        let e = EdmSigmas::new(s, SamplerKind::Ddim).err().unwrap();
        assert!(e.contains("--sampler ddim") && e.contains("euler"), "{e}");
        assert!(
            EdmSigmas::new(s, SamplerKind::Heun)
                .unwrap()
                .schedule(1)
                .is_err()
        );
    }

    #[test]
    fn scheduler_config_round_trips_and_refuses_what_we_lack() {
        let s = EdmSettings {
            sigma_data: 0.25,
            ..Default::default()
        };
        let v: Value = serde_json::from_str(&s.scheduler_config_json()).unwrap();
        let back = EdmSettings::from_scheduler_keys(&|k| v.get(k).cloned()).unwrap();
        assert_eq!(back, s);
        let e = EdmSettings::from_scheduler_keys(&|k| {
            (k == "sigma_schedule").then(|| Value::from("exponential"))
        })
        .unwrap_err();
        assert!(e.contains("sigma_schedule"), "{e}");
    }
}
