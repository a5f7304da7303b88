//! The samplers' schedules with diffusers 0.42's semantics: which timesteps a scheduler visits
//! for `set_timesteps(n)`, what it passes to the U-Net, how it scales the model input, and the
//! per-step constants of its update — computed here on the CPU, once per run; the element-wise
//! update itself is a WGSL kernel (`shaders/samplers.wgsl`) fed with [`Update::kernel_coeffs`].
//!
//! Five schedulers, each as diffusers builds it with `XScheduler.from_config(scheduler_config)`:
//!
//! * `DDPMScheduler` — ancestral sampling (Ho et al. 2020, eq. 6–7), variance fixed_small or
//!   fixed_large, clip_sample;
//! * `DDIMScheduler` — Song et al. 2021, eq. 12 with σ_t(η) of eq. 16, `set_alpha_to_one`;
//! * `DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"`, `solver_order=2`,
//!   midpoint solver, `lower_order_final`, `final_sigmas_type="zero"` (Lu et al. 2022,
//!   "DPM-Solver++", Algorithm 2);
//! * `EulerDiscreteScheduler` and `HeunDiscreteScheduler` with `use_karras_sigmas=True`: the
//!   σ spacing of Karras et al. 2022 (eq. 5, ρ = 7) over a DDPM-trained model, fractional
//!   timesteps found by interpolating log σ, inputs scaled by 1/√(σ²+1) (Karras et al.,
//!   Algorithms 1 and 2 with s_churn = 0).
//!
//! The arithmetic follows diffusers' order of operations: numpy's float64 where diffusers uses
//! numpy (timesteps, σ interpolation, Karras spacing), float32 where it uses torch tensors.

use serde_json::Value;

use super::edm::EdmSettings;
pub use super::schedule::MAX_TRAIN_TIMESTEPS;
use super::ve::VeSettings;
use super::{BetaSchedule, NoiseSchedule, PredictionType};

/// A sampler (diffusers scheduler class).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum SamplerKind {
    /// DDPMScheduler: ancestral sampling, fresh noise every step.
    Ddpm,
    /// DDIMScheduler: deterministic for --eta 0.
    Ddim,
    /// DPMSolverMultistepScheduler, dpmsolver++ order 2 (good at 15–25 steps).
    #[value(name = "dpmpp-2m")]
    DpmSolverPp2m,
    /// EulerDiscreteScheduler with Karras sigmas.
    Euler,
    /// HeunDiscreteScheduler with Karras sigmas (two U-Net evaluations per step).
    Heun,
    /// ScoreSdeVeScheduler: predictor–corrector sampling of a VE-SDE model.
    Pc,
    /// The probability-flow ODE of a VE-SDE model, Euler steps in σ.
    Ode,
    /// PNDMScheduler with skip_prk_steps (PLMS, as Stable Diffusion 1.x runs it).
    Pndm,
}

impl SamplerKind {
    pub fn diffusers_class(self) -> &'static str {
        match self {
            SamplerKind::Ddpm => "DDPMScheduler",
            SamplerKind::Ddim => "DDIMScheduler",
            SamplerKind::DpmSolverPp2m => "DPMSolverMultistepScheduler",
            SamplerKind::Euler => "EulerDiscreteScheduler",
            SamplerKind::Heun => "HeunDiscreteScheduler",
            SamplerKind::Pc => "ScoreSdeVeScheduler",
            SamplerKind::Ode => "probability-flow ODE (Euler)",
            SamplerKind::Pndm => "PNDMScheduler",
        }
    }

    /// The `--sampler` value that names it.
    pub fn cli_name(self) -> &'static str {
        match self {
            SamplerKind::Ddpm => "ddpm",
            SamplerKind::Ddim => "ddim",
            SamplerKind::DpmSolverPp2m => "dpmpp-2m",
            SamplerKind::Euler => "euler",
            SamplerKind::Heun => "heun",
            SamplerKind::Pc => "pc",
            SamplerKind::Ode => "ode",
            SamplerKind::Pndm => "pndm",
        }
    }

    /// Whether the scheduler class has `clip_sample` (DDPM, DDIM, Heun).
    fn has_clip_sample(self) -> bool {
        matches!(
            self,
            SamplerKind::Ddpm | SamplerKind::Ddim | SamplerKind::Heun
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

impl TimestepSpacing {
    fn parse(s: &str) -> Result<TimestepSpacing, String> {
        match s {
            "leading" => Ok(TimestepSpacing::Leading),
            "trailing" => Ok(TimestepSpacing::Trailing),
            "linspace" => Ok(TimestepSpacing::Linspace),
            _ => Err(format!(
                "timestep_spacing `{s}` is not supported (leading, trailing, linspace)"
            )),
        }
    }
}

/// DDPMScheduler's `variance_type` (the two fixed ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VarianceType {
    /// σ² = β̃_t, the posterior variance.
    FixedSmall,
    /// σ² = β_t.
    FixedLarge,
}

/// A `scheduler_config.json` as `from_config` sees it: the keys it holds (a key absent from
/// the file takes each scheduler class's own default when a sampler is built).
#[derive(Clone, Debug, Default)]
pub struct SchedulerConfig {
    keys: serde_json::Map<String, Value>,
}

/// diffusers scheduler classes whose configs carry the DDPM-family noise schedule we read (or
/// are ours): an unknown class samples only with an explicit --sampler.
pub const KNOWN_SCHEDULERS: &[&str] = &[
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "EDMEulerScheduler",
    "EDMDPMSolverMultistepScheduler",
    "ScoreSdeVeScheduler",
];

impl SchedulerConfig {
    /// Parses a scheduler_config.json. Settings that change the computation and that we do not
    /// implement are refused here, by name.
    pub fn from_json(text: &str) -> Result<SchedulerConfig, String> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| format!("scheduler_config.json is not valid JSON: {e}"))?;
        let keys = match v {
            Value::Object(o) => o,
            _ => return Err("scheduler_config.json must be a JSON object".into()),
        };
        let cfg = SchedulerConfig { keys };
        let unsupported_true = [
            "thresholding",
            "rescale_betas_zero_snr",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
            "use_dynamic_shifting",
        ];
        for k in unsupported_true {
            if cfg.bool_key(k)? == Some(true) {
                return Err(format!(
                    "scheduler setting `{k}` = true is not supported by wgpu-diffusion"
                ));
            }
        }
        if let Some(t) = cfg.keys.get("trained_betas")
            && !t.is_null()
        {
            return Err("scheduler setting `trained_betas` (explicit betas) is not supported; use a beta_schedule".into());
        }
        // Validate the values we read now, so a bad file is reported before any GPU work.
        cfg.num_key("beta_start")?;
        cfg.num_key("beta_end")?;
        // The schedule's arrays have num_train_timesteps entries: bound it before allocating.
        if let Some(t) = cfg.usize_key("num_train_timesteps")?
            && !(1..=MAX_TRAIN_TIMESTEPS).contains(&t)
        {
            return Err(format!(
                "scheduler key `num_train_timesteps` must be in 1..={MAX_TRAIN_TIMESTEPS}, is {t}"
            ));
        }
        if let Some(o) = cfg.usize_key("steps_offset")?
            && o > MAX_TRAIN_TIMESTEPS
        {
            return Err(format!(
                "scheduler key `steps_offset` must be at most {MAX_TRAIN_TIMESTEPS}, is {o}"
            ));
        }
        cfg.bool_key("clip_sample")?;
        cfg.bool_key("set_alpha_to_one")?;
        cfg.num_key("clip_sample_range")?;
        if let Some(s) = cfg.str_key("beta_schedule")? {
            beta_schedule_of(&s)?;
        }
        if let Some(s) = cfg.str_key("prediction_type")? {
            prediction_of(&s)?;
        }
        if let Some(s) = cfg.str_key("timestep_spacing")? {
            TimestepSpacing::parse(&s)?;
        }
        if let Some(s) = cfg.str_key("variance_type")? {
            variance_of(&s)?;
        }
        cfg.edm()?;
        cfg.ve()?;
        Ok(cfg)
    }

    /// The configuration of `DDPMScheduler()` with every key present (what our trainer writes,
    /// and what sampling assumes for a model directory without a scheduler_config.json).
    pub fn ddpm_default() -> SchedulerConfig {
        let s = NoiseSchedule::new(BetaSchedule::Linear, 1000, 1e-4, 0.02).expect("default");
        SchedulerConfig::from_json(&s.scheduler_config_json(PredictionType::Epsilon, true))
            .expect("default config")
    }

    /// This config with `overrides` set (e.g. `--snr`), validated again.
    pub fn with_overrides(&self, overrides: &[(&str, Value)]) -> Result<SchedulerConfig, String> {
        if overrides.is_empty() {
            return Ok(self.clone());
        }
        let mut keys = self.keys.clone();
        for (k, v) in overrides {
            keys.insert(k.to_string(), v.clone());
        }
        SchedulerConfig::from_json(&Value::Object(keys).to_string())
    }

    /// What StableDiffusionPipeline does to an outdated scheduler config when it is built
    /// (diffusers 0.42 `pipeline_stable_diffusion.py`, `__init__`): a `steps_offset` other than 1
    /// (a key absent from the file counts as its class's default, 0) becomes 1, and
    /// `clip_sample` true (DDPMScheduler's and DDIMScheduler's default) becomes false. A
    /// sampler chosen with `--sampler` then starts from the amended config, as
    /// `DDIMScheduler.from_config(pipe.scheduler.config)` does. Returns a note per change.
    pub fn stable_diffusion_amendments(&mut self) -> Result<Vec<String>, String> {
        let class = self
            .str_key("_class_name")?
            .unwrap_or_else(|| "DDPMScheduler".into());
        let mut notes = Vec::new();
        // The classes whose configs have no steps_offset (getattr(…, 1) leaves them alone).
        let no_offset = [
            "EDMEulerScheduler",
            "EDMDPMSolverMultistepScheduler",
            "ScoreSdeVeScheduler",
        ];
        let offset = self.usize_key("steps_offset")?.unwrap_or(0);
        if !no_offset.contains(&class.as_str()) && offset != 1 {
            self.keys.insert("steps_offset".into(), 1.into());
            notes.push(format!(
                "steps_offset {offset} is set to 1, as StableDiffusionPipeline does with outdated configs"
            ));
        }
        let clip_default = matches!(class.as_str(), "DDPMScheduler" | "DDIMScheduler");
        if self.bool_key("clip_sample")?.unwrap_or(clip_default) {
            self.keys.insert("clip_sample".into(), false.into());
            notes.push(
                "clip_sample is set to false, as StableDiffusionPipeline does with outdated configs"
                    .into(),
            );
        }
        Ok(notes)
    }

    /// A key's value as it is in the file (for messages and tests).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.keys.get(key).filter(|v| !v.is_null())
    }

    fn num_key(&self, k: &str) -> Result<Option<f64>, String> {
        self.get(k)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| format!("scheduler key `{k}` must be a number, is {v}"))
            })
            .transpose()
    }
    fn usize_key(&self, k: &str) -> Result<Option<usize>, String> {
        self.get(k)
            .map(|v| {
                v.as_u64().map(|x| x as usize).ok_or_else(|| {
                    format!("scheduler key `{k}` must be a non-negative integer, is {v}")
                })
            })
            .transpose()
    }
    fn bool_key(&self, k: &str) -> Result<Option<bool>, String> {
        self.get(k)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| format!("scheduler key `{k}` must be true or false, is {v}"))
            })
            .transpose()
    }
    fn str_key(&self, k: &str) -> Result<Option<String>, String> {
        self.get(k)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("scheduler key `{k}` must be a string, is {v}"))
            })
            .transpose()
    }

    /// The `_class_name` when it is none of [`KNOWN_SCHEDULERS`]: such a config's noise schedule
    /// is read, but which sampler it means is not known.
    pub fn unknown_class(&self) -> Option<&str> {
        let class = self.get("_class_name")?.as_str()?;
        (!KNOWN_SCHEDULERS.contains(&class)).then_some(class)
    }

    /// The EDM settings when the scheduler class is `EDMEulerScheduler` (an EDM model: its
    /// samplers are EDM Euler and Heun); None for the variance-preserving classes.
    pub fn edm(&self) -> Result<Option<EdmSettings>, String> {
        match self.str_key("_class_name")?.as_deref() {
            Some("EDMEulerScheduler") => {
                EdmSettings::from_scheduler_keys(&|k| self.get(k).cloned()).map(Some)
            }
            Some(c @ "EDMDPMSolverMultistepScheduler") => Err(format!(
                "scheduler class `{c}` is not supported by wgpu-diffusion (EDMEulerScheduler and the DDPM-family classes are)"
            )),
            _ => Ok(None),
        }
    }

    /// The VE-SDE settings when the scheduler class is `ScoreSdeVeScheduler` (a score model of
    /// the variance-exploding SDE: its samplers are pc and ode).
    pub fn ve(&self) -> Result<Option<VeSettings>, String> {
        match self.str_key("_class_name")?.as_deref() {
            Some("ScoreSdeVeScheduler") => {
                VeSettings::from_scheduler_keys(&|k| self.get(k).cloned()).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// The prediction type the file declares (epsilon when absent).
    pub fn prediction_type(&self) -> Result<PredictionType, String> {
        Ok(match self.str_key("prediction_type")? {
            Some(s) => prediction_of(&s)?,
            None => PredictionType::Epsilon,
        })
    }

    /// The settings `kind.from_config(self)` ends up with.
    pub fn resolve(&self, kind: SamplerKind) -> Result<ResolvedScheduler, String> {
        let heun = kind == SamplerKind::Heun;
        let beta_schedule = match self.str_key("beta_schedule")? {
            Some(s) => beta_schedule_of(&s)?,
            None => BetaSchedule::Linear,
        };
        if beta_schedule == BetaSchedule::Sigmoid && kind != SamplerKind::Ddpm {
            return Err(format!(
                "beta_schedule `sigmoid` is not implemented by diffusers' {} (only DDPMScheduler has it); sample with --sampler ddpm",
                kind.diffusers_class()
            ));
        }
        let clip_default = kind != SamplerKind::Heun;
        let clip_sample =
            kind.has_clip_sample() && self.bool_key("clip_sample")?.unwrap_or(clip_default);
        let timestep_spacing = match self.str_key("timestep_spacing")? {
            Some(s) => TimestepSpacing::parse(&s)?,
            None => match kind {
                SamplerKind::Ddpm | SamplerKind::Ddim | SamplerKind::Pndm => {
                    TimestepSpacing::Leading
                }
                _ => TimestepSpacing::Linspace,
            },
        };
        let variance_type = match (kind, self.str_key("variance_type")?) {
            (SamplerKind::Ddpm, Some(s)) => variance_of(&s)?,
            _ => VarianceType::FixedSmall,
        };
        if kind == SamplerKind::DpmSolverPp2m {
            for (k, ok) in [
                ("algorithm_type", "dpmsolver++"),
                ("solver_type", "midpoint"),
                ("final_sigmas_type", "zero"),
            ] {
                if let Some(v) = self.str_key(k)?
                    && v != ok
                {
                    return Err(format!(
                        "scheduler setting `{k}` = `{v}` is not supported by --sampler dpmpp-2m (only `{ok}`)"
                    ));
                }
            }
            if let Some(o) = self.usize_key("solver_order")?
                && o != 2
            {
                return Err(format!(
                    "scheduler setting `solver_order` = {o} is not supported by --sampler dpmpp-2m (2)"
                ));
            }
            if self.bool_key("use_karras_sigmas")? == Some(true) {
                return Err("scheduler setting `use_karras_sigmas` = true is not supported by --sampler dpmpp-2m".into());
            }
        }
        if matches!(kind, SamplerKind::Euler) {
            if let Some(v) = self.str_key("final_sigmas_type")?
                && v != "zero"
            {
                return Err(format!(
                    "scheduler setting `final_sigmas_type` = `{v}` is not supported (zero)"
                ));
            }
            if let Some(v) = self.str_key("timestep_type")?
                && v != "discrete"
            {
                return Err(format!(
                    "scheduler setting `timestep_type` = `{v}` is not supported (discrete)"
                ));
            }
        }
        if matches!(kind, SamplerKind::Euler | SamplerKind::Heun)
            && (self.get("sigma_min").is_some() || self.get("sigma_max").is_some())
        {
            return Err(
                "scheduler settings `sigma_min` / `sigma_max` are not supported by wgpu-diffusion"
                    .into(),
            );
        }
        if kind == SamplerKind::Pndm {
            self.check_pndm()?;
        }
        let set_alpha_to_one = match kind {
            SamplerKind::Ddim => self.bool_key("set_alpha_to_one")?.unwrap_or(true),
            // PNDMScheduler's default is False: the last step lands on ᾱ_0.
            SamplerKind::Pndm => self.bool_key("set_alpha_to_one")?.unwrap_or(false),
            _ => true,
        };
        Ok(ResolvedScheduler {
            kind,
            num_train_timesteps: self.usize_key("num_train_timesteps")?.unwrap_or(1000),
            beta_start: self
                .num_key("beta_start")?
                .unwrap_or(if heun { 0.00085 } else { 1e-4 }),
            beta_end: self
                .num_key("beta_end")?
                .unwrap_or(if heun { 0.012 } else { 0.02 }),
            beta_schedule,
            prediction_type: self.prediction_type()?,
            clip_sample,
            clip_sample_range: self.num_key("clip_sample_range")?.unwrap_or(1.0),
            timestep_spacing,
            steps_offset: self.usize_key("steps_offset")?.unwrap_or(0),
            set_alpha_to_one,
            variance_type,
            edm: None,
            ve: None,
        })
    }
}

impl SchedulerConfig {
    /// PNDM runs as PLMS (`skip_prk_steps`): a config naming PNDMScheduler must say so (its
    /// Runge–Kutta warm-up steps are not implemented), and the model must predict ε or v.
    fn check_pndm(&self) -> Result<(), String> {
        if self.str_key("_class_name")?.as_deref() == Some("PNDMScheduler")
            && self.bool_key("skip_prk_steps")? != Some(true)
        {
            return Err("PNDMScheduler with `skip_prk_steps` = false (its Runge–Kutta warm-up steps) is not supported: wgpu-diffusion runs PNDM as PLMS (skip_prk_steps = true, as Stable Diffusion does); set it in scheduler_config.json or choose another --sampler".into());
        }
        if self.prediction_type()? == PredictionType::Sample {
            return Err("PNDMScheduler takes epsilon or v_prediction models, not prediction_type `sample`; choose another --sampler".into());
        }
        Ok(())
    }
}

/// A diffusers name parsed by the enum's own serde names (shared with the training config).
fn named<T: serde::de::DeserializeOwned>(key: &str, s: &str, choices: &str) -> Result<T, String> {
    serde_json::from_value(Value::from(s))
        .map_err(|_| format!("{key} `{s}` is not supported ({choices})"))
}

fn beta_schedule_of(s: &str) -> Result<BetaSchedule, String> {
    named(
        "beta_schedule",
        s,
        "linear, scaled_linear, squaredcos_cap_v2, sigmoid",
    )
}

fn prediction_of(s: &str) -> Result<PredictionType, String> {
    named("prediction_type", s, "epsilon, v_prediction, sample")
}

fn variance_of(s: &str) -> Result<VarianceType, String> {
    match s {
        "fixed_small" => Ok(VarianceType::FixedSmall),
        "fixed_large" => Ok(VarianceType::FixedLarge),
        _ => Err(format!(
            "variance_type `{s}` is not supported (fixed_small, fixed_large)"
        )),
    }
}

/// The settings one scheduler class ends up with after `from_config`.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedScheduler {
    pub kind: SamplerKind,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub prediction_type: PredictionType,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
    pub variance_type: VarianceType,
    /// An EDM model's settings (EDMEulerScheduler); the beta-schedule fields above are then
    /// unused.
    pub edm: Option<EdmSettings>,
    /// A VE-SDE model's settings (ScoreSdeVeScheduler; the beta-schedule fields unused).
    pub ve: Option<VeSettings>,
}

impl ResolvedScheduler {
    /// The form in which the update kernels turn the model output m into x0 (see [`Update`]):
    /// EDM's D = c_skip·x + c_out·F is the v form x0 = a·x − s·m with (a, s) = (c_skip, −c_out).
    pub fn x0_form(&self) -> PredictionType {
        match self.edm {
            Some(_) => PredictionType::VPrediction,
            None => self.prediction_type,
        }
    }

    /// The sampler's name for messages: the diffusers class, or EDM's.
    pub fn class_name(&self) -> &'static str {
        match (self.edm, self.kind) {
            (Some(_), SamplerKind::Heun) => "EDM Heun (Karras et al. 2022, Algorithm 1)",
            (Some(_), _) => "EDMEulerScheduler",
            (None, SamplerKind::Pc) => "ScoreSdeVeScheduler (predictor-corrector)",
            (None, SamplerKind::Ode) => "VE-SDE probability-flow ODE (Euler in σ)",
            (None, k) => k.diffusers_class(),
        }
    }
}

/// Floats of the per-step constants the update kernels read ([`Update::kernel_coeffs`]).
pub const KERNEL_COEFFS: usize = 12;

/// The element-wise update after one U-Net evaluation; every field is a per-step constant.
///
/// Every variant first turns the model output m into the x0 estimate with (a, s):
/// ε: x0 = (x − s·m)/a, v: x0 = a·x − s·m, sample: x0 = m (then clamps it where the scheduler
/// clips). For the variance-preserving samplers (a, s) = (√ᾱ_t, √(1−ᾱ_t)); in σ-space (Euler,
/// Heun, x = x0 + σ·ε) they are (1, σ) for ε and (1/(σ²+1), σ/√(σ²+1)) for v.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Update {
    /// x ← c_x0·x0 + c_xt·x + σ·z (DDPMScheduler.step).
    Ddpm {
        a: f32,
        s: f32,
        c_x0: f32,
        c_xt: f32,
        sigma: f32,
    },
    /// x ← c_x0·x0 + c_eps·ε̂ + σ·z, ε̂ the model's noise estimate (DDIMScheduler.step).
    Ddim {
        a: f32,
        s: f32,
        c_x0: f32,
        c_eps: f32,
        sigma: f32,
    },
    /// x ← c_x·x − c_d0·x0 − c_d1·(x0 − x0_prev); then x0_prev ← x0 (c_d1 = 0: first order).
    DpmSolver {
        a: f32,
        s: f32,
        c_x: f32,
        c_d0: f32,
        c_d1: f32,
    },
    /// d = (x − x0)/σ; x ← x + d·dt (Euler, and the first, saving half of a Heun step);
    /// Heun's second half: d = ((x − x0)/σ + d_saved)/2; x ← x_saved + d·dt.
    Sigma {
        a: f32,
        s: f32,
        sigma: f32,
        dt: f32,
        stage: SigmaStage,
    },
    /// A VE-SDE model's corrector, predictor or ODE step.
    Ve(VeUpdate),
    /// PNDMScheduler.step_plms (Liu et al. 2022, eq. 9 with the linear multistep ε of eq. 12):
    /// ε = w_m·m + Σ w_k·h_k over the last model outputs h_0 (newest) … h_2 (v models: ε =
    /// a·that + s·base), x ← c_sample·base − c_out·ε, base = x or the sample saved by the first
    /// step (`use_saved`, the second evaluation's redo of the first step); then `save_base` keeps
    /// x, `append` shifts m into the history.
    Plms {
        a: f32,
        s: f32,
        c_sample: f32,
        c_out: f32,
        /// (w_m, w_0, w_1, w_2).
        weights: [f32; 4],
        append: bool,
        save_base: bool,
        use_saved: bool,
    },
}

/// A VE-SDE evaluation's update (`shaders/samplers.wgsl` `ve_step`, the model output m being
/// the score).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum VeUpdate {
    /// ScoreSdeVeScheduler.step_correct (Langevin, Algorithm 5 of Song et al. 2021): ε =
    /// 2(r·mean‖z‖/mean‖m‖)² from the batch, x ← x + ε·m + √(2ε)·z.
    Corrector { snr: f32 },
    /// step_pred (reverse diffusion): x_mean = x + (σ² − σ_prev²)·m, x ← x_mean + √(σ² − σ_prev²)·z;
    /// `last`: x ← 2·clamp(x_mean, 0, 1) − 1 (the pipeline's output, mapped to [−1, 1]).
    Predictor { diffusion: f32, last: bool },
    /// Probability-flow ODE, Euler in σ: x ← x + σ(σ − σ_next)·m (`c` = σ(σ − σ_next));
    /// `last`: then x ← 2·clamp(x, 0, 1) − 1.
    Ode { c: f32, last: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SigmaStage {
    Euler,
    HeunFirst,
    HeunSecond,
}

impl ModelEval {
    /// An evaluation that draws no noise and touches no known region (the σ-space and
    /// score-based samplers'): step `step`, the U-Net at `timestep` on x·`input_scale`.
    pub fn new(step: usize, timestep: f32, input_scale: f32, update: Update) -> ModelEval {
        ModelEval {
            timestep,
            input_scale,
            update,
            adds_noise: false,
            step,
            known: None,
            renoise_before: Vec::new(),
            alpha_prev: 0.0,
        }
    }

    /// The 8 constants the kernels of this evaluation read: the update's, the known-region
    /// coefficients (inpainting) in slots 5 and 6, the model-input scale in slot 7.
    pub fn kernel_coeffs(&self) -> [f32; KERNEL_COEFFS] {
        let mut c = self.update.kernel_coeffs(self.input_scale);
        if let Some((a, b)) = self.known {
            c[5] = a;
            c[6] = b;
        }
        c
    }
}

impl Update {
    /// The constants the update kernels read (`shaders/samplers.wgsl`): [0..5] the update's,
    /// [5..7] inpainting's known region (set by [`ModelEval::kernel_coeffs`]), [7] the model
    /// input scale, [8..12] PLMS's history weights and flags.
    pub fn kernel_coeffs(&self, input_scale: f32) -> [f32; KERNEL_COEFFS] {
        let mut out = [0.0; KERNEL_COEFFS];
        out[7] = input_scale;
        let first: [f32; 5] = match *self {
            Update::Ddpm {
                a,
                s,
                c_x0,
                c_xt,
                sigma,
            } => [a, s, c_x0, c_xt, sigma],
            Update::Ddim {
                a,
                s,
                c_x0,
                c_eps,
                sigma,
            } => [a, s, c_x0, c_eps, sigma],
            Update::DpmSolver {
                a,
                s,
                c_x,
                c_d0,
                c_d1,
            } => [a, s, c_x, c_d0, c_d1],
            Update::Sigma {
                a,
                s,
                sigma,
                dt,
                stage,
            } => {
                let code = match stage {
                    SigmaStage::Euler => 0.0,
                    SigmaStage::HeunFirst => 1.0,
                    SigmaStage::HeunSecond => 2.0,
                };
                [a, s, sigma, dt, code]
            }
            // coeffs[2..5] = (snr or the predictor's diffusion² or the ODE's c, the diffusion,
            // stage: 0 corrector, 1 predictor, 2 last predictor, 3 ODE, 4 last ODE step).
            Update::Ve(u) => {
                let (c2, c3, stage) = match u {
                    VeUpdate::Corrector { snr } => (snr, 0.0, 0.0),
                    VeUpdate::Predictor { diffusion, last } => (
                        diffusion * diffusion,
                        diffusion,
                        if last { 2.0 } else { 1.0 },
                    ),
                    VeUpdate::Ode { c, last } => (c, 0.0, if last { 4.0 } else { 3.0 }),
                };
                [0.0, 0.0, c2, c3, stage]
            }
            // coeffs[8..12] = (w_0, w_1, w_2, flags: 1 append, 2 save the base, 4 use it).
            Update::Plms {
                a,
                s,
                c_sample,
                c_out,
                weights,
                append,
                save_base,
                use_saved,
            } => {
                out[8..11].copy_from_slice(&weights[1..]);
                out[11] = (append as u32 + 2 * save_base as u32 + 4 * use_saved as u32) as f32;
                [a, s, c_sample, c_out, weights[0]]
            }
        };
        out[..5].copy_from_slice(&first);
        out
    }
}

/// One U-Net evaluation of a sampling loop and the update that follows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelEval {
    /// The timestep given to the U-Net (fractional for Euler/Heun).
    pub timestep: f32,
    /// `scale_model_input`: the U-Net sees x·input_scale.
    pub input_scale: f32,
    pub update: Update,
    /// The step adds fresh noise (DDPM at t > 0, DDIM with η > 0): entry `step` of the
    /// per-step noise.
    pub adds_noise: bool,
    /// The scheduler step this evaluation belongs to (Heun: two evaluations per step).
    pub step: usize,
    /// Inpainting: after the update, the known region is set to a·x0_known + b·z (the
    /// original noised to the level the step lands on, with this step's noise z).
    pub known: Option<(f32, f32)>,
    /// Inpainting's resampling: before this evaluation, x ← a·x + b·z' for each (a, b), each
    /// with fresh noise.
    pub renoise_before: Vec<(f32, f32)>,
    /// ᾱ of the level the update lands on (DDPM/DDIM, 1 at the end; 0 for the others).
    pub alpha_prev: f32,
}

/// A whole sampling loop: `x = noise·init_noise_sigma`, then for each evaluation
/// `x = update(x, unet(x·input_scale, timestep))`.
#[derive(Clone, Debug)]
pub struct SamplingSchedule {
    pub settings: ResolvedScheduler,
    pub num_inference_steps: usize,
    pub init_noise_sigma: f32,
    /// `sched.timesteps` as diffusers lists them.
    pub timesteps: Vec<f32>,
    pub evals: Vec<ModelEval>,
}

/// numpy.linspace(start, stop, num) (float64, endpoint included).
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| start + i as f64 * step).collect();
    v[num - 1] = stop;
    v
}

/// numpy.arange(start, stop, step) for a negative float step.
fn np_arange_down(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    (0..len).map(|i| start + i as f64 * step).collect()
}

/// "trailing" spacing, the same in every scheduler: round(arange(T, 0, −T/n)) − 1.
pub(crate) fn trailing_timesteps(t_train: usize, n: usize) -> Vec<f64> {
    let ratio = t_train as f64 / n as f64;
    np_arange_down(t_train as f64, 0.0, -ratio)
        .into_iter()
        .map(|t| t.round_ties_even() - 1.0)
        .collect()
}

/// The integer timesteps diffusers' DDPM/DDIM (and the spacing part of Euler/Heun) choose.
pub(crate) fn spaced_timesteps(
    spacing: TimestepSpacing,
    t_train: usize,
    n: usize,
    steps_offset: usize,
) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (t_train - 1) as f64, n)
            .into_iter()
            .rev()
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = t_train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => trailing_timesteps(t_train, n),
    }
}

impl SamplingSchedule {
    /// Steps that draw per-step noise.
    pub fn uses_step_noise(&self) -> bool {
        self.evals.iter().any(|e| e.adds_noise)
    }

    /// How many per-step noise draws a loop takes (`--step-noise`'s first dimension): one per
    /// scheduler step, or for the VE-SDE's predictor–corrector one per evaluation, as diffusers
    /// draws them (the last predictor's is drawn there too, and unused).
    pub fn noise_draws(&self) -> usize {
        if self.settings.ve.is_some() && self.uses_step_noise() {
            return self.evals.len();
        }
        self.evals
            .iter()
            .filter(|e| e.adds_noise)
            .map(|e| e.step + 1)
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ddpm_cfg() -> SchedulerConfig {
        SchedulerConfig::ddpm_default()
    }

    /// StableDiffusionPipeline's amendments: steps_offset to 1 (absent counts as 0) and
    /// clip_sample to false (absent counts as true for DDPM and DDIM, not for PNDM); EDM
    /// configs have no steps_offset; an up-to-date SD config is left as it is.
    #[test]
    fn stable_diffusion_amends_outdated_configs() {
        let amend = |json: &str| {
            let mut cfg = SchedulerConfig::from_json(json).unwrap();
            let notes = cfg.stable_diffusion_amendments().unwrap();
            (cfg, notes.len())
        };
        let (cfg, n) = amend(r#"{"_class_name": "DDPMScheduler"}"#);
        assert_eq!(n, 2);
        assert_eq!(cfg.get("steps_offset"), Some(&Value::from(1)));
        assert_eq!(cfg.get("clip_sample"), Some(&Value::from(false)));
        let (cfg, n) = amend(r#"{"_class_name": "PNDMScheduler", "steps_offset": 0}"#);
        assert_eq!(n, 1);
        assert_eq!(cfg.get("clip_sample"), None);
        let sd = r#"{"_class_name": "PNDMScheduler", "steps_offset": 1, "clip_sample": false}"#;
        assert_eq!(amend(sd).1, 0);
        assert_eq!(amend(r#"{"_class_name": "EDMEulerScheduler"}"#).1, 0);
    }

    /// PNDM runs as PLMS: a PNDMScheduler config without skip_prk_steps, or a sample-predicting
    /// model, is refused by name; Stable Diffusion's config resolves with PNDM's own defaults
    /// (leading spacing, set_alpha_to_one false) and N steps take N + 1 evaluations, the second
    /// at the first one's next timestep again.
    #[test]
    fn pndm_is_plms_with_its_own_defaults() {
        let sd = r#"{"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "skip_prk_steps": true,
            "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false}"#;
        let cfg = SchedulerConfig::from_json(sd).unwrap();
        let r = cfg.resolve(SamplerKind::Pndm).unwrap();
        assert_eq!(r.timestep_spacing, TimestepSpacing::Leading);
        assert!(!r.set_alpha_to_one && !r.clip_sample);
        let s = SamplingSchedule::new(&cfg, SamplerKind::Pndm, 4, None, 0.0).unwrap();
        assert_eq!(s.timesteps, vec![751.0, 501.0, 501.0, 251.0, 1.0]);
        let prk = SchedulerConfig::from_json(r#"{"_class_name": "PNDMScheduler"}"#).unwrap();
        let e = prk.resolve(SamplerKind::Pndm).unwrap_err();
        assert!(e.contains("skip_prk_steps"), "{e}");
        let x0 = ddpm_cfg()
            .with_overrides(&[("prediction_type", "sample".into())])
            .unwrap();
        let e = x0.resolve(SamplerKind::Pndm).unwrap_err();
        assert!(e.contains("epsilon or v_prediction"), "{e}");
    }

    fn ts(kind: SamplerKind, n: usize, spacing: Option<TimestepSpacing>) -> Vec<f32> {
        SamplingSchedule::new(&ddpm_cfg(), kind, n, spacing, 0.0)
            .unwrap()
            .timesteps
    }

    #[test]
    fn leading_ten_steps_per_sampler() {
        let hundreds: Vec<f32> = (0..10).rev().map(|i| (i * 100) as f32).collect();
        assert_eq!(ts(SamplerKind::Ddim, 10, None), hundreds);
        assert_eq!(ts(SamplerKind::Ddpm, 10, None), hundreds);
        // DPM-Solver divides by n + 1 and drops the last: 900, 810, …, 90.
        let dpm: Vec<f32> = (1..=10).rev().map(|i| (i * 90) as f32).collect();
        assert_eq!(ts(SamplerKind::DpmSolverPp2m, 10, None), dpm);
        // Euler under "leading" spans σ(900)..σ(0) (Karras spacing between them).
        let e = ts(SamplerKind::Euler, 10, None);
        assert!((e[0] - 900.0).abs() < 1e-3 && e[9].abs() < 1e-3, "{e:?}");
    }

    #[test]
    fn trailing_and_linspace() {
        let trailing: Vec<f32> = (0..10).rev().map(|i| (i * 100 + 99) as f32).collect();
        assert_eq!(
            ts(SamplerKind::Ddim, 10, Some(TimestepSpacing::Trailing)),
            trailing
        );
        assert_eq!(
            ts(SamplerKind::Ddim, 4, Some(TimestepSpacing::Linspace)),
            vec![999.0, 666.0, 333.0, 0.0]
        );
        assert_eq!(
            ts(
                SamplerKind::DpmSolverPp2m,
                3,
                Some(TimestepSpacing::Linspace)
            ),
            vec![999.0, 666.0, 333.0]
        );
    }

    #[test]
    fn init_noise_sigma_depends_on_spacing() {
        let lead = SamplingSchedule::new(&ddpm_cfg(), SamplerKind::Euler, 10, None, 0.0).unwrap();
        let lin = SamplingSchedule::new(
            &ddpm_cfg(),
            SamplerKind::Euler,
            10,
            Some(TimestepSpacing::Linspace),
            0.0,
        )
        .unwrap();
        let s = NoiseSchedule::new(BetaSchedule::Linear, 1000, 1e-4, 0.02).unwrap();
        let sigma = |t: usize| ((1.0 - s.alphas_cumprod[t]) / s.alphas_cumprod[t]).sqrt();
        assert!((lin.init_noise_sigma - sigma(999)).abs() < 1e-3 * sigma(999));
        let expect = (sigma(900).powi(2) + 1.0).sqrt();
        assert!((lead.init_noise_sigma - expect).abs() < 1e-3 * expect);
        assert_eq!(
            SamplingSchedule::new(&ddpm_cfg(), SamplerKind::Ddim, 10, None, 0.0)
                .unwrap()
                .init_noise_sigma,
            1.0
        );
    }

    #[test]
    fn heun_evaluates_twice_per_step_but_the_last() {
        let h = SamplingSchedule::new(&ddpm_cfg(), SamplerKind::Heun, 10, None, 0.0).unwrap();
        assert_eq!(h.evals.len(), 19);
        assert_eq!(h.timesteps[1], h.timesteps[2]);
        assert!(matches!(
            h.evals[18].update,
            Update::Sigma {
                stage: SigmaStage::HeunFirst,
                ..
            }
        ));
    }

    #[test]
    fn class_defaults_apply_to_missing_keys() {
        let c = SchedulerConfig::from_json("{}").unwrap();
        let heun = c.resolve(SamplerKind::Heun).unwrap();
        assert_eq!((heun.beta_start, heun.beta_end), (0.00085, 0.012));
        assert!(!heun.clip_sample);
        assert_eq!(heun.timestep_spacing, TimestepSpacing::Linspace);
        let ddim = c.resolve(SamplerKind::Ddim).unwrap();
        assert!(ddim.clip_sample && ddim.set_alpha_to_one);
        assert_eq!(ddim.timestep_spacing, TimestepSpacing::Leading);
        // Euler and DPM-Solver have no clip_sample even when the file sets it.
        let d = ddpm_cfg();
        assert!(!d.resolve(SamplerKind::Euler).unwrap().clip_sample);
        assert!(d.resolve(SamplerKind::Heun).unwrap().clip_sample);
    }

    #[test]
    fn bad_settings_are_named() {
        let sig = r#"{"beta_schedule": "sigmoid"}"#;
        let c = SchedulerConfig::from_json(sig).unwrap();
        assert!(c.resolve(SamplerKind::Ddpm).is_ok());
        let e = c.resolve(SamplerKind::Euler).unwrap_err();
        assert!(e.contains("sigmoid"), "{e}");
        let e = SchedulerConfig::from_json(r#"{"thresholding": true}"#).unwrap_err();
        assert!(e.contains("thresholding"), "{e}");
        let e = SchedulerConfig::from_json(r#"{"variance_type": "learned"}"#).unwrap_err();
        assert!(e.contains("learned"), "{e}");
        let e = SamplingSchedule::new(&ddpm_cfg(), SamplerKind::Ddim, 0, None, 0.0).unwrap_err();
        assert!(e.contains("--steps"), "{e}");
        assert!(SamplingSchedule::new(&ddpm_cfg(), SamplerKind::Ddim, 1001, None, 0.0).is_err());
        assert!(SamplingSchedule::new(&ddpm_cfg(), SamplerKind::Euler, 10, None, 0.5).is_err());
    }

    /// diffusers' RePaintScheduler.set_timesteps(10, jump_length=3, jump_n_sample=2) lists
    /// 900 800 700 600 700 800 900 800 700 600 500 400 300 400 500 600 500 400 300 200 100 0
    /// 100 200 300 200 100 0: the model runs at each descending entry, the ascending ones are
    /// jumps back up.
    #[test]
    fn repaint_timetable_matches_diffusers() {
        let r = SamplingSchedule::repaint(&ddpm_cfg(), SamplerKind::Ddim, 10, 0.0, 3, 2).unwrap();
        let evals: Vec<f32> = vec![
            900., 800., 700., 600., 800., 700., 600., 500., 400., 300., 500., 400., 300., 200.,
            100., 0., 200., 100., 0.,
        ];
        assert_eq!(r.timesteps, evals);
        let jumps: Vec<usize> = r.evals.iter().map(|e| e.renoise_before.len()).collect();
        assert_eq!(
            jumps,
            vec![0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 3, 0, 0]
        );
        // The last step lands on ᾱ = 1: the known region is the original exactly.
        assert_eq!(r.evals.last().unwrap().known, Some((1.0, 0.0)));
        assert!(r.evals.iter().all(|e| e.adds_noise));
        let none =
            SamplingSchedule::repaint(&ddpm_cfg(), SamplerKind::Ddpm, 5, 0.0, 10, 10).unwrap();
        assert_eq!(none.timesteps, vec![800., 600., 400., 200., 0.]);
        assert!(
            SamplingSchedule::repaint(&ddpm_cfg(), SamplerKind::Euler, 5, 0.0, 10, 10).is_err()
        );
    }

    #[test]
    fn ddpm_final_step_returns_x0() {
        let s = SamplingSchedule::new(&ddpm_cfg(), SamplerKind::Ddpm, 50, None, 0.0).unwrap();
        assert_eq!(s.timesteps[0], 980.0);
        match s.evals[49].update {
            Update::Ddpm {
                c_x0, c_xt, sigma, ..
            } => {
                assert!((c_x0 - 1.0).abs() < 1e-6 && c_xt.abs() < 1e-6 && sigma == 0.0);
            }
            u => panic!("{u:?}"),
        }
        assert!(!s.evals[49].adds_noise && s.evals[0].adds_noise);
    }
}
