//! One type per sampler family behind [`SamplerFamily`]: each turns the spaced timesteps of
//! `set_timesteps(n)` into the U-Net evaluations of its loop with diffusers' arithmetic
//! (see `scheduler.rs` for the families and their papers). [`SamplingSchedule::new`] and
//! [`SamplingSchedule::repaint`] live here, beside the families they choose among, so that
//! `scheduler.rs` (configs, kinds, the per-step update types) needs nothing of this file. A new
//! family (the score-based samplers) is a new type here and a new [`SamplerKind`].

use super::NoiseSchedule;
use super::PredictionType;
use super::edm::EdmSettings;
use super::schedule::linspace_f32;
use super::scheduler::{
    ModelEval, ResolvedScheduler, SamplerKind, SamplingSchedule, SchedulerConfig, SigmaStage,
    TimestepSpacing, Update, VarianceType, VeUpdate, np_linspace, spaced_timesteps,
    trailing_timesteps,
};
use super::ve::VeSettings;

/// What a family sees of a schedule being built.
pub struct FamilyInputs<'a> {
    pub settings: &'a ResolvedScheduler,
    /// ᾱ_t of the model's training schedule.
    pub alphas_cumprod: &'a [f32],
    /// The family's timesteps (descending, distinct, in 0..T; [`SamplerFamily::timesteps`]).
    pub timesteps: &'a [f64],
    pub steps: usize,
}

/// A sampler family's loop: the U-Net evaluations and the initial noise scale.
pub struct FamilySteps {
    pub evals: Vec<ModelEval>,
    pub init_noise_sigma: f32,
}

pub trait SamplerFamily {
    /// `set_timesteps(steps)`: the timesteps the family visits (before any σ remapping).
    fn timesteps(&self, settings: &ResolvedScheduler, steps: usize) -> Vec<f64> {
        spaced_timesteps(
            settings.timestep_spacing,
            settings.num_train_timesteps,
            steps,
            settings.steps_offset,
        )
    }
    /// The evaluations of the loop over those timesteps.
    fn steps(&self, inputs: &FamilyInputs) -> FamilySteps;
}

/// DDPMScheduler: ancestral sampling (Ho et al. 2020, eq. 6–7).
pub struct Ddpm;

/// DDIMScheduler with η (Song et al. 2021, eq. 12 and 16).
pub struct Ddim {
    pub eta: f64,
}

/// DPMSolverMultistepScheduler, dpmsolver++ of order 2 (Lu et al. 2022, Algorithm 2).
pub struct DpmSolverPp2m;

/// PNDMScheduler with `skip_prk_steps` (PLMS: Liu et al. 2022, "Pseudo Numerical Methods for
/// Diffusion Models on Manifolds", the transfer of eq. 9 with the linear multistep ε of eq. 12,
/// warmed up as crowsonkb's PLMS): N steps take N + 1 evaluations over
/// `concat(ts[:-1], ts[-2:-1], ts[-1:])` reversed; the second evaluation redoes the first step
/// from its saved sample with the mean of both outputs (a second-order start), then the
/// multistep weights grow from 2 to 4 earlier outputs.
pub struct Plms;

/// EulerDiscreteScheduler or HeunDiscreteScheduler on Karras σs (Karras et al. 2022, eq. 5,
/// Algorithms 1 and 2 with s_churn = 0).
pub struct KarrasSigmas {
    pub heun: bool,
}

/// The evaluations of Euler or Heun over `sigmas` (σ_0 … σ_n, σ_n = 0): per step i one
/// evaluation at σ_i (Heun: saving its half), and Heun's correction at σ_{i+1} except after the
/// last step, whose σ_{i+1} is 0. `eval(step, at, dt, stage)` builds the evaluation at σ_at.
fn sigma_steps(
    sigmas: &[f32],
    heun: bool,
    mut eval: impl FnMut(usize, usize, f32, SigmaStage) -> ModelEval,
) -> Vec<ModelEval> {
    let steps = sigmas.len() - 1;
    let mut evals = Vec::new();
    for i in 0..steps {
        let dt = sigmas[i + 1] - sigmas[i];
        let stage = if heun {
            SigmaStage::HeunFirst
        } else {
            SigmaStage::Euler
        };
        evals.push(eval(i, i, dt, stage));
        if heun && i + 1 < steps {
            evals.push(eval(i, i + 1, dt, SigmaStage::HeunSecond));
        }
    }
    evals
}

/// The settings of a score-based model's sampler (EDM or VE-SDE): the beta-schedule fields
/// unused, no clipping, the objective's own settings attached.
fn score_settings(
    kind: SamplerKind,
    num_train_timesteps: usize,
    prediction_type: PredictionType,
    edm: Option<EdmSettings>,
    ve: Option<VeSettings>,
) -> ResolvedScheduler {
    ResolvedScheduler {
        kind,
        num_train_timesteps,
        beta_start: 0.0,
        beta_end: 0.0,
        beta_schedule: super::BetaSchedule::Linear,
        prediction_type,
        clip_sample: false,
        clip_sample_range: 1.0,
        timestep_spacing: TimestepSpacing::Linspace,
        steps_offset: 0,
        set_alpha_to_one: true,
        variance_type: VarianceType::FixedSmall,
        edm,
        ve,
    }
}

/// An EDM model's samplers on the σs of eq. 5: diffusers' `EDMEulerScheduler`, or the EDM
/// paper's Heun (Karras et al. 2022, Algorithm 1 with S_churn = 0, NVlabs `edm_sampler`).
/// Each evaluation sees c_in·x at timestep c_noise = ¼ ln σ, and D = c_skip·x + c_out·F is the
/// x0 the σ-space update steps towards.
pub struct EdmSigmas {
    pub settings: EdmSettings,
    pub heun: bool,
}

/// A VE-SDE model's samplers (Song et al. 2021): `pc`, diffusers' `ScoreSdeVeScheduler` loop as
/// `ScoreSdeVePipeline` runs it (per step `correct_steps` Langevin corrector steps, then the
/// reverse-diffusion predictor, all at the continuous σ(t_i), t = linspace(1, ε, N)); `ode`, the
/// probability-flow ODE dx/dσ = −σ·∇log p_σ(x) by Euler steps over the same σs and then to 0.
/// The U-Net receives σ itself (its fourier features take ln σ) and returns the score.
pub struct VeSde {
    pub settings: VeSettings,
    pub ode: bool,
}

impl VeSde {
    /// `--sampler pc` or `ode` on a VE-SDE model; the others are refused by name.
    pub fn new(settings: VeSettings, kind: SamplerKind) -> Result<VeSde, String> {
        let ode = match kind {
            SamplerKind::Pc => false,
            SamplerKind::Ode => true,
            other => {
                return Err(format!(
                    "--sampler {} does not fit a VE-SDE model (its scheduler is ScoreSdeVeScheduler): use --sampler pc (predictor-corrector, the default) or ode (probability flow)",
                    other.cli_name()
                ));
            }
        };
        Ok(VeSde { settings, ode })
    }

    /// `set_timesteps(n)` and `set_sigmas(n)` with diffusers' float32 arithmetic, then the loop.
    pub fn schedule(&self, steps: usize) -> Result<SamplingSchedule, String> {
        let ve = &self.settings;
        if steps < 2 {
            return Err(format!(
                "--steps must be at least 2 for a VE-SDE model, is {steps}"
            ));
        }
        let ts = linspace_f32(1.0, ve.sampling_eps, steps);
        let ratio = (ve.sigma_max / ve.sigma_min) as f32;
        let sigmas: Vec<f32> = ts
            .iter()
            .map(|&t| ve.sigma_min as f32 * (ratio as f64).powf(t as f64) as f32)
            .collect();
        let discrete: Vec<f32> = linspace_f32(ve.sigma_min.ln(), ve.sigma_max.ln(), steps)
            .iter()
            .map(|&l| (l as f64).exp() as f32)
            .collect();
        let eval = |noise_key: usize, sigma: f32, update: VeUpdate, adds_noise: bool| ModelEval {
            adds_noise,
            ..ModelEval::new(noise_key, sigma, 1.0, Update::Ve(update))
        };
        let mut evals = Vec::new();
        for (i, &t) in ts.iter().enumerate() {
            let last = i + 1 == steps;
            let sigma = sigmas[i];
            if self.ode {
                let next = if last { 0.0 } else { sigmas[i + 1] };
                let c = sigma * (sigma - next);
                evals.push(eval(i, sigma, VeUpdate::Ode { c, last }, false));
                continue;
            }
            for _ in 0..ve.correct_steps {
                let key = evals.len();
                evals.push(eval(
                    key,
                    sigma,
                    VeUpdate::Corrector { snr: ve.snr as f32 },
                    true,
                ));
            }
            // step_pred: the discrete σ at (t·(N−1)).long() and the one below it (0 at the end).
            let idx = (t * (steps - 1) as f32) as usize;
            let (s, adj) = (
                discrete[idx],
                if idx == 0 { 0.0 } else { discrete[idx - 1] },
            );
            let diffusion = (s * s - adj * adj).sqrt();
            let key = evals.len();
            evals.push(eval(
                key,
                sigma,
                VeUpdate::Predictor { diffusion, last },
                !last,
            ));
        }
        let kind = if self.ode {
            SamplerKind::Ode
        } else {
            SamplerKind::Pc
        };
        Ok(SamplingSchedule {
            settings: score_settings(
                kind,
                ve.num_train_timesteps,
                PredictionType::Epsilon,
                None,
                Some(*ve),
            ),
            num_inference_steps: steps,
            init_noise_sigma: ve.sigma_max as f32,
            timesteps: evals.iter().map(|e| e.timestep).collect(),
            evals,
        })
    }
}

/// The family of a sampler kind for a variance-preserving (DDPM-family) model; None for the
/// VE-SDE's samplers, which do not fit one.
pub fn family(kind: SamplerKind, eta: f64) -> Option<Box<dyn SamplerFamily>> {
    Some(match kind {
        SamplerKind::Ddpm => Box::new(Ddpm),
        SamplerKind::Ddim => Box::new(Ddim { eta }),
        SamplerKind::DpmSolverPp2m => Box::new(DpmSolverPp2m),
        SamplerKind::Euler => Box::new(KarrasSigmas { heun: false }),
        SamplerKind::Heun => Box::new(KarrasSigmas { heun: true }),
        SamplerKind::Pndm => Box::new(Plms),
        SamplerKind::Pc | SamplerKind::Ode => return None,
    })
}

/// The evaluations of a loop whose model input is not scaled (σ = 1).
fn unscaled(evals: Vec<ModelEval>) -> FamilySteps {
    FamilySteps {
        evals,
        init_noise_sigma: 1.0,
    }
}

impl SamplerFamily for Ddpm {
    fn steps(&self, inputs: &FamilyInputs) -> FamilySteps {
        let ts: Vec<usize> = inputs.timesteps.iter().map(|&t| t as usize).collect();
        let evals = ts
            .iter()
            .enumerate()
            // DDPMScheduler.previous_timestep: the next entry of the list.
            .map(|(i, &t)| {
                ddpm_eval(
                    inputs.settings,
                    inputs.alphas_cumprod,
                    t,
                    ts.get(i + 1).copied(),
                    i,
                )
            })
            .collect();
        unscaled(evals)
    }
}

impl SamplerFamily for Ddim {
    fn steps(&self, inputs: &FamilyInputs) -> FamilySteps {
        let stride = inputs.settings.num_train_timesteps / inputs.steps;
        let evals = inputs
            .timesteps
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                // DDIM always steps back by T // n, whatever the spacing (diffusers).
                let t = t as usize;
                let acp = inputs.alphas_cumprod;
                ddim_eval(inputs.settings, acp, t, t.checked_sub(stride), self.eta, i)
            })
            .collect();
        unscaled(evals)
    }
}

impl SamplerFamily for DpmSolverPp2m {
    fn timesteps(&self, settings: &ResolvedScheduler, steps: usize) -> Vec<f64> {
        dpm_timesteps(settings, steps)
    }

    fn steps(&self, inputs: &FamilyInputs) -> FamilySteps {
        let base = inputs.timesteps;
        let (sig_f32, _) = train_sigmas(inputs.alphas_cumprod);
        let mut sigmas: Vec<f32> = base.iter().map(|&t| interp(t, &sig_f32) as f32).collect();
        sigmas.push(0.0);
        // _sigma_to_alpha_sigma_t and λ = log α − log σ, per DPM-Solver++ (eq. 4).
        let alpha_sigma = |sig: f32| {
            let sig = sig as f64;
            let alpha = 1.0 / (sig * sig + 1.0).sqrt();
            (alpha, sig * alpha)
        };
        let lambda = |sig: f32| {
            let (a, s) = alpha_sigma(sig);
            a.ln() - s.ln()
        };
        let n = base.len();
        let mut evals = Vec::with_capacity(n);
        for i in 0..n {
            let (alpha_s, sigma_s) = alpha_sigma(sigmas[i]);
            let (alpha_t, sigma_t) = alpha_sigma(sigmas[i + 1]);
            // σ_t = 0 at the end: λ_t = ∞, e^{−h} = 0, and the update returns x0.
            let exp_neg_h = if sigma_t == 0.0 {
                0.0
            } else {
                (-(lambda(sigmas[i + 1]) - lambda(sigmas[i]))).exp()
            };
            let c_d0 = alpha_t * (exp_neg_h - 1.0);
            let first_order = i == 0 || i == n - 1;
            let c_d1 = if first_order {
                0.0
            } else {
                let h = lambda(sigmas[i + 1]) - lambda(sigmas[i]);
                let h0 = lambda(sigmas[i]) - lambda(sigmas[i - 1]);
                0.5 * c_d0 / (h0 / h)
            };
            evals.push(ModelEval {
                timestep: base[i] as f32,
                input_scale: 1.0,
                update: Update::DpmSolver {
                    a: alpha_s as f32,
                    s: sigma_s as f32,
                    c_x: (sigma_t / sigma_s) as f32,
                    c_d0: c_d0 as f32,
                    c_d1: c_d1 as f32,
                },
                adds_noise: false,
                step: i,
                known: None,
                renoise_before: Vec::new(),
                alpha_prev: 0.0,
            });
        }
        unscaled(evals)
    }
}

impl SamplerFamily for Plms {
    fn steps(&self, inputs: &FamilyInputs) -> FamilySteps {
        let settings = inputs.settings;
        let acp = inputs.alphas_cumprod;
        let t_train = settings.num_train_timesteps as i64;
        // PNDMScheduler's `num_train_timesteps // num_inference_steps`, whatever the spacing.
        let ratio = t_train / inputs.steps as i64;
        let ascending: Vec<i64> = inputs.timesteps.iter().rev().map(|&t| t as i64).collect();
        let n = ascending.len();
        let mut loop_timesteps = ascending[..n - 1].to_vec();
        if n >= 2 {
            loop_timesteps.push(ascending[n - 2]);
        }
        loop_timesteps.push(ascending[n - 1]);
        loop_timesteps.reverse();
        let final_acp = if settings.set_alpha_to_one {
            1.0
        } else {
            acp[0]
        };
        let mut history = 0usize; // len(ets) after the previous evaluation
        let evals = loop_timesteps
            .iter()
            .enumerate()
            .map(|(k, &t_loop)| {
                // The second evaluation redoes the first step: from t_loop + ratio to t_loop.
                let (t, prev) = if k == 1 {
                    ((t_loop + ratio).min(t_train - 1), t_loop)
                } else {
                    (t_loop, t_loop - ratio)
                };
                let append = k != 1;
                if append {
                    history = (history + 1).min(4);
                }
                let weights = match (k, history) {
                    (0, _) => [1.0, 0.0, 0.0, 0.0],
                    (1, _) => [0.5, 0.5, 0.0, 0.0],
                    (_, 2) => [1.5, -0.5, 0.0, 0.0],
                    (_, 3) => [23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0, 0.0],
                    _ => [55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0],
                };
                // _get_prev_sample, in float32 as torch computes it.
                let a_t = acp[t as usize];
                let a_prev = if prev >= 0 {
                    acp[prev as usize]
                } else {
                    final_acp
                };
                let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
                let c_sample = (a_prev / a_t).sqrt();
                let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
                ModelEval {
                    timestep: t_loop as f32,
                    input_scale: 1.0,
                    update: Update::Plms {
                        a: a_t.sqrt(),
                        s: b_t.sqrt(),
                        c_sample,
                        c_out: (a_prev - a_t) / denom,
                        weights,
                        append,
                        save_base: k == 0,
                        use_saved: k == 1,
                    },
                    adds_noise: false,
                    step: k,
                    known: None,
                    renoise_before: Vec::new(),
                    alpha_prev: a_prev,
                }
            })
            .collect();
        unscaled(evals)
    }
}

impl SamplerFamily for KarrasSigmas {
    fn steps(&self, inputs: &FamilyInputs) -> FamilySteps {
        let (settings, steps) = (inputs.settings, inputs.steps);
        let p = settings.prediction_type;
        let (sig_f32, log_sigmas) = train_sigmas(inputs.alphas_cumprod);
        // Euler/Heun keep the spaced timesteps as float32 before interpolating.
        let interpolated: Vec<f64> = inputs
            .timesteps
            .iter()
            .map(|&t| interp(t as f32 as f64, &sig_f32))
            .collect();
        let karras = karras_sigmas(&interpolated, steps);
        let ts: Vec<f32> = karras
            .iter()
            .map(|&s| sigma_to_t(s, &log_sigmas) as f32)
            .collect();
        let mut sigmas: Vec<f32> = karras.iter().map(|&s| s as f32).collect();
        sigmas.push(0.0);
        let max_sigma = sigmas.iter().cloned().fold(0.0f32, f32::max);
        let init_noise_sigma = match settings.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        let scale = |s: f32| 1.0 / (s * s + 1.0).sqrt();
        let evals = sigma_steps(&sigmas, self.heun, |step, at, dt, stage| {
            let sigma = sigmas[at];
            let (a, s) = sigma_space_x0(p, sigma);
            let update = Update::Sigma {
                a,
                s,
                sigma,
                dt,
                stage,
            };
            ModelEval::new(step, ts[at], scale(sigma), update)
        });
        FamilySteps {
            evals,
            init_noise_sigma,
        }
    }
}

impl EdmSigmas {
    /// `--sampler euler` or `heun` on an EDM model; the others are refused by name.
    pub fn new(settings: EdmSettings, kind: SamplerKind) -> Result<EdmSigmas, String> {
        let heun = match kind {
            SamplerKind::Euler => false,
            SamplerKind::Heun => true,
            other => {
                return Err(format!(
                    "--sampler {} does not fit an EDM model (its scheduler is EDMEulerScheduler): use --sampler euler (EDM Euler, the default) or heun (EDM Heun)",
                    other.cli_name()
                ));
            }
        };
        Ok(EdmSigmas { settings, heun })
    }

    /// `euler` as `EDMEulerScheduler.set_timesteps(steps)` and its loop (σs as float32,
    /// `init_noise_sigma` = √(σ_max²+1), diffusers' own choice); `heun` as `edm_sampler`
    /// (x = σ_max·noise, no correction on the last step, whose σ_next is 0).
    pub fn schedule(&self, steps: usize) -> Result<SamplingSchedule, String> {
        let edm = &self.settings;
        let min_steps = if self.heun { 2 } else { 1 };
        if steps < min_steps {
            return Err(format!(
                "--steps must be at least {min_steps} for an EDM model's {} sampler, is {steps}",
                if self.heun { "Heun" } else { "Euler" }
            ));
        }
        let sigmas: Vec<f32> = edm.karras_sigmas(steps).iter().map(|&s| s as f32).collect();
        let evals = sigma_steps(&sigmas, self.heun, |step, at, dt, stage| {
            let sigma = sigmas[at];
            let p = edm.precondition(sigma as f64);
            let (a, s) = edm.x0_coefficients(sigma as f64);
            let update = Update::Sigma {
                a,
                s,
                sigma,
                dt,
                stage,
            };
            ModelEval::new(step, p.c_noise as f32, p.c_in as f32, update)
        });
        let init_noise_sigma = if self.heun {
            edm.sigma_max
        } else {
            (edm.sigma_max * edm.sigma_max + 1.0).sqrt()
        } as f32;
        let kind = if self.heun {
            SamplerKind::Heun
        } else {
            SamplerKind::Euler
        };
        Ok(SamplingSchedule {
            settings: score_settings(
                kind,
                edm.num_train_timesteps,
                edm.prediction,
                Some(*edm),
                None,
            ),
            num_inference_steps: steps,
            init_noise_sigma,
            timesteps: evals.iter().map(|e| e.timestep).collect(),
            evals,
        })
    }
}

impl SamplingSchedule {
    /// `kind.from_config(config)` (with `--timestep-spacing` overriding the file), then
    /// `set_timesteps(steps)`; `eta` is DDIM's η.
    pub fn new(
        config: &SchedulerConfig,
        kind: SamplerKind,
        steps: usize,
        spacing_override: Option<TimestepSpacing>,
        eta: f64,
    ) -> Result<SamplingSchedule, String> {
        if let Some(ve) = config.ve()? {
            if spacing_override.is_some() || eta != 0.0 {
                return Err(
                    "--timestep-spacing and --eta do not apply to a VE-SDE model's samplers".into(),
                );
            }
            return VeSde::new(ve, kind)?.schedule(steps);
        }
        if let Some(edm) = config.edm()? {
            if spacing_override.is_some() || eta != 0.0 {
                return Err(
                    "--timestep-spacing and --eta do not apply to an EDM model's samplers".into(),
                );
            }
            return EdmSigmas::new(edm, kind)?.schedule(steps);
        }
        let Some(family) = family(kind, eta) else {
            return Err(format!(
                "--sampler {} is for VE-SDE models (ScoreSdeVeScheduler); this model's scheduler is {}: use ddim, ddpm, dpmpp-2m, euler or heun",
                kind.cli_name(),
                config
                    .get("_class_name")
                    .and_then(|v| v.as_str())
                    .unwrap_or("DDPMScheduler")
            ));
        };
        let mut settings = config.resolve(kind)?;
        if let Some(s) = spacing_override {
            settings.timestep_spacing = s;
        }
        let t_train = settings.num_train_timesteps;
        if steps == 0 || steps > t_train {
            return Err(format!(
                "--steps must be in 1..={t_train} (the model's num_train_timesteps), is {steps}"
            ));
        }
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(format!("--eta must be a finite number ≥ 0, is {eta}"));
        }
        if eta > 0.0 && kind != SamplerKind::Ddim {
            return Err(format!(
                "--eta applies to --sampler ddim only, not {}",
                kind.diffusers_class()
            ));
        }
        let schedule = NoiseSchedule::new(
            settings.beta_schedule,
            t_train,
            settings.beta_start,
            settings.beta_end,
        )?;
        let base = family.timesteps(&settings, steps);
        if base.iter().any(|&t| t < 0.0 || t >= t_train as f64)
            || base.windows(2).any(|w| w[1] >= w[0])
        {
            return Err(format!(
                "{steps} steps with {:?} spacing (steps_offset {}) give {} timesteps that are not distinct values in 0..{t_train} (from {} down to {}); choose fewer steps or another --timestep-spacing",
                settings.timestep_spacing,
                settings.steps_offset,
                base.len(),
                base.first().copied().unwrap_or(0.0),
                base.last().copied().unwrap_or(0.0)
            ));
        }
        let FamilySteps {
            evals,
            init_noise_sigma,
        } = family.steps(&FamilyInputs {
            settings: &settings,
            alphas_cumprod: &schedule.alphas_cumprod,
            timesteps: &base,
            steps,
        });
        Ok(SamplingSchedule {
            settings,
            num_inference_steps: steps,
            init_noise_sigma,
            timesteps: evals.iter().map(|e| e.timestep).collect(),
            evals,
        })
    }
}

/// One DDPMScheduler step from t to `prev` (None: the end, ᾱ_prev = 1).
fn ddpm_eval(
    settings: &ResolvedScheduler,
    acp: &[f32],
    t: usize,
    prev: Option<usize>,
    step: usize,
) -> ModelEval {
    let a_t = acp[t];
    let a_prev = prev.map(|p| acp[p]).unwrap_or(1.0);
    let beta_prod_t = 1.0 - a_t;
    let beta_prod_prev = 1.0 - a_prev;
    let current_alpha = a_t / a_prev;
    let current_beta = 1.0 - current_alpha;
    let variance = match settings.variance_type {
        VarianceType::FixedSmall => (beta_prod_prev / beta_prod_t * current_beta).max(1e-20),
        VarianceType::FixedLarge => current_beta,
    };
    ModelEval {
        timestep: t as f32,
        input_scale: 1.0,
        update: Update::Ddpm {
            a: a_t.sqrt(),
            s: beta_prod_t.sqrt(),
            c_x0: a_prev.sqrt() * current_beta / beta_prod_t,
            c_xt: current_alpha.sqrt() * beta_prod_prev / beta_prod_t,
            sigma: if t > 0 { variance.sqrt() } else { 0.0 },
        },
        adds_noise: t > 0,
        step,
        known: None,
        renoise_before: Vec::new(),
        alpha_prev: a_prev,
    }
}

/// One DDIMScheduler step from t to `prev` (None: the end, ᾱ_prev = final_alpha_cumprod),
/// σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ_prev)) (Song et al. 2021, eq. 16).
fn ddim_eval(
    settings: &ResolvedScheduler,
    acp: &[f32],
    t: usize,
    prev: Option<usize>,
    eta: f64,
    step: usize,
) -> ModelEval {
    let final_alpha = if settings.set_alpha_to_one {
        1.0f32
    } else {
        acp[0]
    };
    let a_t = acp[t];
    let a_prev = prev.map(|p| acp[p]).unwrap_or(final_alpha);
    let beta_t = 1.0 - a_t;
    let variance = ((1.0 - a_prev) / beta_t) * (1.0 - a_t / a_prev);
    let std = (eta as f32) * variance.sqrt();
    ModelEval {
        timestep: t as f32,
        input_scale: 1.0,
        update: Update::Ddim {
            a: a_t.sqrt(),
            s: beta_t.sqrt(),
            c_x0: a_prev.sqrt(),
            c_eps: (1.0 - a_prev - std * std).sqrt(),
            sigma: std,
        },
        adds_noise: eta > 0.0,
        step,
        known: None,
        renoise_before: Vec::new(),
        alpha_prev: a_prev,
    }
}

impl SamplingSchedule {
    /// RePaint (Lugmayr et al. 2022) with diffusers' `RePaintScheduler` timetable: N denoising
    /// steps of T/N train steps with DDPM or DDIM updates (ε or v models), where every step also
    /// replaces the known region by the original noised to the step's target level, and after
    /// a step that lands on a jump point the sample is renoised `jump_length` steps back up
    /// (`undo_step`: x ← √(Π(1−β))·x + √(1 − Π(1−β))·z over the T/N betas from t) and
    /// denoised again, `jump_n_sample − 1` times per jump point.
    pub fn repaint(
        config: &SchedulerConfig,
        kind: SamplerKind,
        steps: usize,
        eta: f64,
        jump_length: usize,
        jump_n_sample: usize,
    ) -> Result<SamplingSchedule, String> {
        if !matches!(kind, SamplerKind::Ddpm | SamplerKind::Ddim) {
            return Err(format!(
                "inpainting (RePaint) works with --sampler ddpm or ddim, not {}",
                kind.diffusers_class()
            ));
        }
        if config.edm()?.is_some() {
            return Err(
                "inpainting (RePaint) needs a DDPM-family model; this is an EDM model (EDMEulerScheduler)"
                    .into(),
            );
        }
        if jump_length == 0 || jump_n_sample == 0 {
            return Err("--jump-length and --jump-n-sample must be at least 1".into());
        }
        // Reuses the plain schedule's checks (steps, η, settings) and init sigma.
        let mut out = SamplingSchedule::new(
            config,
            kind,
            steps,
            None,
            if kind == SamplerKind::Ddim { eta } else { 0.0 },
        )?;
        let settings = out.settings.clone();
        let t_train = settings.num_train_timesteps;
        let schedule = NoiseSchedule::new(
            settings.beta_schedule,
            t_train,
            settings.beta_start,
            settings.beta_end,
        )?;
        let acp = &schedule.alphas_cumprod;
        let stride = t_train / steps;
        // RePaintScheduler.set_timesteps, in units of `stride`.
        let mut jumps: std::collections::HashMap<usize, usize> = Default::default();
        let mut j = 0;
        while j + jump_length < steps {
            jumps.insert(j, jump_n_sample - 1);
            j += jump_length;
        }
        let mut list = Vec::new();
        let mut t = steps;
        while t >= 1 {
            t -= 1;
            list.push(t);
            if let Some(left) = jumps.get_mut(&t)
                && *left > 0
            {
                *left -= 1;
                for _ in 0..jump_length {
                    t += 1;
                    list.push(t);
                }
            }
        }
        out.evals.clear();
        let mut pending_renoise = Vec::new();
        let mut t_last = list[0] + 1;
        for (i, &u) in list.iter().enumerate() {
            if u < t_last {
                let t = u * stride;
                let prev = t.checked_sub(stride);
                let mut eval = match kind {
                    SamplerKind::Ddpm => ddpm_eval(&settings, acp, t, prev, i),
                    _ => ddim_eval(&settings, acp, t, prev, eta, i),
                };
                eval.known = Some((eval.alpha_prev.sqrt(), (1.0 - eval.alpha_prev).sqrt()));
                // The known region needs fresh noise at every step.
                eval.adds_noise = true;
                eval.renoise_before = std::mem::take(&mut pending_renoise);
                out.evals.push(eval);
            } else {
                // undo_step(x, t_last): the betas of train steps t_last·stride + k, k < stride.
                let a: f64 = (0..stride)
                    .map(|k| 1.0 - schedule.betas[t_last * stride + k] as f64)
                    .product();
                pending_renoise.push((a.sqrt() as f32, (1.0 - a).sqrt() as f32));
            }
            t_last = u;
        }
        out.timesteps = out.evals.iter().map(|e| e.timestep).collect();
        Ok(out)
    }
}

/// log σ(t) as numpy holds it (float32), with σ(t) = √((1−ᾱ)/ᾱ) computed by torch in float32.
fn train_sigmas(acp: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let sigmas: Vec<f32> = acp.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect();
    let logs = sigmas.iter().map(|&s| (s as f64).ln() as f32).collect();
    (sigmas, logs)
}

/// numpy.interp(x, arange(len), table).
fn interp(x: f64, table: &[f32]) -> f64 {
    let last = table.len() - 1;
    if x <= 0.0 {
        return table[0] as f64;
    }
    if x >= last as f64 {
        return table[last] as f64;
    }
    let i = x.floor() as usize;
    let f = x - i as f64;
    let (lo, hi) = (table[i] as f64, table[i + 1] as f64);
    if f == 0.0 { lo } else { lo + (hi - lo) * f }
}

/// `_sigma_to_t`: the fractional timestep whose log σ interpolates to log `sigma`.
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    let low_idx = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let low = log_sigmas[low_idx] as f64;
    let high = log_sigmas[low_idx + 1] as f64;
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * (low_idx + 1) as f64
}

/// `_convert_to_karras` (Karras et al. 2022, eq. 5, ρ = 7) between the first and last σ given.
fn karras_sigmas(in_sigmas: &[f64], n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (sigma_min, sigma_max) = (in_sigmas[in_sigmas.len() - 1], in_sigmas[0]);
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// (a, s) of the x0 estimate in σ-space for a prediction type (see [`Update`]).
fn sigma_space_x0(prediction: PredictionType, sigma: f32) -> (f32, f32) {
    match prediction {
        PredictionType::Epsilon => (1.0, sigma),
        PredictionType::VPrediction => {
            let v = sigma * sigma + 1.0;
            (1.0 / v, sigma / v.sqrt())
        }
        PredictionType::Sample => (1.0, 0.0),
    }
}

/// DPMSolverMultistepScheduler.set_timesteps (lambda_min_clipped = −∞, so last_timestep = T).
fn dpm_timesteps(settings: &ResolvedScheduler, n: usize) -> Vec<f64> {
    let t_train = settings.num_train_timesteps;
    match settings.timestep_spacing {
        TimestepSpacing::Linspace => {
            let mut v: Vec<f64> = np_linspace(0.0, (t_train - 1) as f64, n + 1)
                .into_iter()
                .map(f64::round_ties_even)
                .rev()
                .collect();
            v.pop();
            v
        }
        TimestepSpacing::Leading => {
            let ratio = t_train / (n + 1);
            (1..=n)
                .rev()
                .map(|i| (i * ratio + settings.steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => trailing_timesteps(t_train, n),
    }
}
