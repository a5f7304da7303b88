//! The training step: everything a step touches, allocated once; the step recorded once into a
//! plan (timesteps and noise drawn on the GPU, forward, loss, backward, clipping, AdamW, EMA)
//! and replayed with one submit; losses read back asynchronously; checkpoint contents.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, anyhow, bail};

use super::all_reduce::GradExchange;
use super::config::TrainConfig;
use super::loss_scaling::StepScaler;
use super::text::{TextTraining, TrainerText};
use crate::diffusion::edm::{P_MEAN, P_STD};
use crate::diffusion::{NoiseSchedule, PredictionType};
use crate::dist::World;
use crate::gpu::{Gpu, Plan, Recorder, Tensor};
use crate::io::tensors::{LoadedTensors, serialize_named};
use crate::nn::{ParamStore, UNet, UNetConfig, text_unet};
use crate::ops::OpResult;
use crate::ops::adamw::{
    AdamwConfig, AdamwHyper, EmaConfig, HYPER_LEN, adamw_step, ema_update, grad_norm_chunks,
    grad_norm_unscaled, write_hyper,
};
use crate::ops::diffusion::{
    edm_noised, edm_sigmas, min_snr_weights, v_target, ve_noised, ve_sigmas,
};
use crate::ops::elementwise::{cast_u32_to_f32, copy_channels};
use crate::ops::grad_scaler::{STATE_LEN, ScalerState, grad_scaler_update, scale_loss_gradient};
use crate::ops::loss::{mse_backward, mse_loss};
use crate::ops::noise::{purpose, q_sample, random_normal, random_uniform_u32, write_rng_state};
use crate::ops::upsample::{avg_pool_forward, upsample_bicubic_forward};
use crate::sample::{LatentCodec, LatentVae};

/// Everything a step touches, allocated once.
pub struct Trainer {
    pub gpu: Arc<Gpu>,
    pub cfg: TrainConfig,
    pub unet: UNet,
    pub schedule: NoiseSchedule,
    /// What each micro-batch's data is written into: the images (x0 itself, or a latent
    /// model's VAE input).
    x0: Vec<Tensor>,
    /// Latent diffusion: the frozen VAE whose encoder turns each micro-batch into the latent
    /// x0 the U-Net learns, in the same submit.
    pub latent: Option<LatentCodec>,
    /// Class labels of each micro-batch (class-conditional models).
    labels: Vec<Tensor>,
    losses: Vec<Tensor>,
    hyper: Tensor,
    rng_state: Tensor,
    pub ema: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    loss_log: Tensor,
    staging: wgpu::Buffer,
    /// Per micro-batch: timesteps, noise, forward, loss, backward into the gradient buffer.
    pub(super) grad_plan: Plan,
    /// Clipping, AdamW and EMA from the (all-reduced) gradients.
    update_plan: Plan,
    /// The job's ranks: one, or MPI's world (gradients summed across ranks between the plans).
    pub world: Rc<World>,
    /// Seconds spent reading back, all-reducing and writing the gradients, summed over steps.
    pub comm_seconds: f64,
    /// Data parallel: the gradient buckets, read back and all-reduced as backward finishes them.
    exchange: Option<GradExchange>,
    adam: AdamwConfig,
    ema_cfg: EmaConfig,
    /// Steps done (the data, RNG and learning-rate position).
    pub step: u64,
    /// AdamW's t: optimizer steps taken (= `step` unless a GradScaler skipped some; with one,
    /// the last count read back from the GPU).
    pub optimizer_steps: u64,
    /// Dynamic loss scaling (`cfg.grad_scaler`).
    pub scaler: Option<StepScaler>,
    /// Words per step in the loss log: the micro-batches' losses, then the scaler's state.
    log_record: usize,
    /// Images consumed from the data stream.
    pub data_position: u64,
    /// Class names by label (class-conditional runs), saved with checkpoints and exports.
    pub class_names: Vec<String>,
    /// Text-conditional runs: the text encoder sharing the U-Net's store, the captions' ids.
    pub text: Option<TrainerText>,
}

/// One step's record in the loss log.
#[derive(Clone, Copy, Debug)]
pub struct LoggedStep {
    /// The mean loss over the step's micro-batches (and ranks).
    pub loss: f32,
    /// The GradScaler's state after the step (runs with one).
    pub scaler: Option<ScalerState>,
}

/// The step's per-micro-batch scratch: what the noising, the loss and the optimizer update read
/// and write besides the U-Net's own tensors.
struct StepScratch {
    noise: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    /// Global-norm clipping's scale and the norm.
    clip: Tensor,
    /// The v target of v-prediction runs.
    v_target: Option<Tensor>,
    /// Min-SNR loss weights (`--snr-gamma`).
    snr_weights: Option<Tensor>,
    /// Super-resolution: the factor, x_t, the low-resolution image and its bicubic upsampling.
    sr: Option<(usize, Tensor, Tensor, Tensor)>,
    /// EDM (`objective = "edm"`): the per-sample normal draws, σ, and the target F should hit.
    edm: Option<EdmScratch>,
    /// VE-SDE (`objective = "ve-sde"`): (σ_min, σ_max, ε), the loss weights σ² and the score
    /// target −z/σ.
    ve: Option<((f32, f32, f32), Tensor, Tensor)>,
    /// The GradScaler's state (`train.grad_scaler`): the loss gradient is multiplied by its
    /// scale.
    loss_scale: Option<Tensor>,
}

/// The per-step tensors of EDM training.
struct EdmScratch {
    sigma_data: f32,
    draws: Tensor,
    sigmas: Tensor,
    target: Tensor,
}

impl StepScratch {
    fn new(
        gpu: &Arc<Gpu>,
        cfg: &TrainConfig,
        model: &UNetConfig,
        schedule: &NoiseSchedule,
        image_shape: &[usize],
    ) -> Result<StepScratch> {
        let b = cfg.batch_size;
        // The images (x0, noise, targets) have the output's channels; a super-resolution U-Net
        // takes twice as many (x_t and the upsampled low-resolution image).
        let sr = model.sr_scale.map(|k| {
            let (s, c) = (model.sample_size, model.out_channels);
            (
                k,
                gpu.tensor(image_shape, "sr: x_t"),
                gpu.tensor(&[b, s / k, s / k, c], "sr: low resolution"),
                gpu.tensor(image_shape, "sr: bicubic upsampled"),
            )
        });
        Ok(StepScratch {
            noise: gpu.tensor(image_shape, "noise"),
            timesteps: gpu.tensor(&[b], "timesteps u32"),
            alphas_cumprod: gpu.tensor_from(
                &[schedule.num_train_timesteps],
                &schedule.alphas_cumprod,
                "alphas_cumprod",
            )?,
            clip: gpu.tensor(&[2], "grad clip, norm"),
            v_target: (cfg.prediction_type == PredictionType::VPrediction)
                .then(|| gpu.tensor(image_shape, "v target")),
            snr_weights: (cfg.snr_gamma > 0.0).then(|| gpu.tensor(&[b], "min-SNR weights")),
            sr,
            edm: cfg.edm().map(|edm| EdmScratch {
                sigma_data: edm.sigma_data as f32,
                draws: gpu.tensor(&[b], "EDM ln σ draws"),
                sigmas: gpu.tensor(&[b], "EDM σ"),
                target: gpu.tensor(image_shape, "EDM target"),
            }),
            ve: cfg.ve().map(|ve| {
                let (lo, hi) = (ve.sigma_min as f32, ve.sigma_max as f32);
                (
                    (lo, hi, ve.sampling_eps as f32),
                    gpu.tensor(&[b], "VE-SDE weights σ²"),
                    gpu.tensor(image_shape, "VE-SDE score target"),
                )
            }),
            loss_scale: None,
        })
    }
}

/// The tensors each micro-batch's data is written into: x0 itself, or for latent diffusion the
/// VAE's input images.
fn data_tensors(
    gpu: &Arc<Gpu>,
    x0_shape: &[usize],
    latent: Option<&LatentCodec>,
    accum: usize,
) -> Vec<Tensor> {
    let shape = match latent {
        Some(codec) => codec.vae.sample.value.shape().to_vec(),
        None => x0_shape.to_vec(),
    };
    (0..accum)
        .map(|i| gpu.tensor(&shape, &format!("x0 {i}")))
        .collect()
}

/// Records micro-batch `i`'s input: its timesteps and noise from the run's RNG streams, then
/// x_t = q_sample(x0, ε, t) (Ho et al. 2020, eq. 4) — for super-resolution, cat([x_t,
/// bicubic(avg_pool(x0))]); for EDM, σ from ln σ ~ N(P_mean, P_std²) and c_in·(x0 + σ·ε)
/// (Karras et al. 2022, Table 1).
fn record_noised_input(
    rec: &mut Recorder,
    unet: &UNet,
    s: &StepScratch,
    rng_state: &Tensor,
    x0: &Tensor,
    i: usize,
    num_train_timesteps: usize,
) -> OpResult {
    let b = s.timesteps.numel();
    let numel = s.noise.numel();
    if let Some(edm) = &s.edm {
        // EDM: σ per sample, the U-Net sees c_in·(x0 + σ·n) at timestep ¼ ln σ.
        let offset = (i * b) as u32;
        random_normal(rec, rng_state, purpose::EDM_SIGMA, offset, &edm.draws)?;
        let (p_mean, p_std) = (P_MEAN as f32, P_STD as f32);
        edm_sigmas(rec, &edm.draws, p_mean, p_std, &edm.sigmas, &unet.timesteps)?;
        random_normal(rec, rng_state, purpose::NOISE, (i * numel) as u32, &s.noise)?;
        let input = &unet.sample.value;
        return edm_noised(
            rec,
            x0,
            &s.noise,
            &edm.sigmas,
            edm.sigma_data,
            input,
            &edm.target,
        );
    }
    if let Some((range, weights, target)) = &s.ve {
        // VE-SDE: t ~ U(ε, 1) from 24-bit uniform draws, σ(t); the U-Net takes σ itself.
        let offset = (i * b) as u32;
        random_uniform_u32(
            rec,
            rng_state,
            purpose::TIMESTEPS,
            offset,
            1 << 24,
            &s.timesteps,
        )?;
        ve_sigmas(rec, &s.timesteps, *range, &unet.timesteps, weights)?;
        random_normal(rec, rng_state, purpose::NOISE, (i * numel) as u32, &s.noise)?;
        let input = &unet.sample.value;
        return ve_noised(rec, x0, &s.noise, &unet.timesteps, input, target);
    }
    random_uniform_u32(
        rec,
        rng_state,
        purpose::TIMESTEPS,
        (i * b) as u32,
        num_train_timesteps as u32,
        &s.timesteps,
    )?;
    cast_u32_to_f32(rec, &s.timesteps, &unet.timesteps)?;
    random_normal(rec, rng_state, purpose::NOISE, (i * numel) as u32, &s.noise)?;
    let acp = &s.alphas_cumprod;
    match &s.sr {
        None => q_sample(rec, x0, &s.noise, &s.timesteps, acp, &unet.sample.value),
        Some((k, x_t, low, up)) => {
            // LR = avg_pool(x0); the U-Net sees cat([x_t, bicubic(LR)]) (noisy image first, as
            // StableDiffusionUpscalePipeline orders it).
            let c = x0.shape()[3];
            avg_pool_forward(rec, x0, *k, low)?;
            upsample_bicubic_forward(rec, low, *k, up)?;
            q_sample(rec, x0, &s.noise, &s.timesteps, acp, x_t)?;
            copy_channels(rec, x_t, 0, &unet.sample.value, 0, c, false)?;
            copy_channels(rec, up, 0, &unet.sample.value, c, c, false)
        }
    }
}

/// Records a micro-batch's loss (MSE to ε, x0 or v, min-SNR weighted when asked) into
/// `loss` and the gradient of the mean over the step's `micro_batches` (all ranks' together)
/// into the U-Net's output gradient.
fn record_loss(
    rec: &mut Recorder,
    unet: &UNet,
    s: &StepScratch,
    (cfg, micro_batches): (&TrainConfig, usize),
    x0: &Tensor,
    loss: &Tensor,
) -> OpResult {
    let acp = &s.alphas_cumprod;
    let target = match (cfg.prediction_type, &s.v_target) {
        // EDM: F's target, whose unweighted MSE is EDM's λ(σ)-weighted loss.
        _ if s.edm.is_some() => &s.edm.as_ref().expect("EDM scratch").target,
        _ if s.ve.is_some() => &s.ve.as_ref().expect("VE scratch").2,
        (PredictionType::Epsilon, _) => &s.noise,
        (PredictionType::Sample, _) => x0,
        (PredictionType::VPrediction, Some(v)) => {
            v_target(rec, x0, &s.noise, &s.timesteps, acp, v)?;
            v
        }
        (PredictionType::VPrediction, None) => unreachable!("v target allocated by StepScratch"),
    };
    // DSM's λ(σ) = σ² for the VE-SDE; min-SNR-γ when asked.
    let weights = match &s.ve {
        Some((_, w, _)) => Some(w),
        None => s.snr_weights.as_ref(),
    };
    if let Some(w) = &s.snr_weights {
        let gamma = cfg.snr_gamma as f32;
        min_snr_weights(rec, &s.timesteps, acp, gamma, cfg.prediction_type, w)?;
    }
    mse_loss(rec, &unet.output.value, target, weights, loss)?;
    let scale = 1.0 / micro_batches as f32;
    mse_backward(
        rec,
        &unet.output.value,
        target,
        weights,
        scale,
        &unet.output.grad,
    )?;
    match &s.loss_scale {
        Some(state) => scale_loss_gradient(rec, state, &unet.output.grad),
        None => Ok(()),
    }
}

/// The optimizer state a step updates after the accumulated backward passes.
struct OptimizerState<'a> {
    hyper: &'a Tensor,
    ema: &'a Tensor,
    exp_avg: &'a Tensor,
    exp_avg_sq: &'a Tensor,
    scaler: Option<&'a StepScaler>,
}

/// Records global-norm clipping, AdamW and the EMA update, chunk by chunk of the parameter store.
fn record_optimizer_update(
    rec: &mut Recorder,
    cfg: &TrainConfig,
    store: &ParamStore,
    state: &OptimizerState,
    clip: &Tensor,
) -> OpResult {
    let max_norm = (cfg.max_grad_norm > 0.0).then_some(cfg.max_grad_norm as f32);
    let grads = store.chunk_views(&store.grads);
    // With a GradScaler: the norm of the unscaled gradients, then the skip decision and this
    // step's AdamW/EMA values in the scaler's own hyper tensor.
    let hyper = match state.scaler {
        Some(scaler) => {
            grad_norm_unscaled(rec, &grads, max_norm, &scaler.state, clip)?;
            let host = (state.hyper, scaler.table());
            grad_scaler_update(rec, &scaler.cfg, &scaler.state, clip, host, &scaler.hyper)?;
            &scaler.hyper
        }
        None => {
            grad_norm_chunks(rec, &grads, max_norm, clip)?;
            state.hyper
        }
    };
    let views = |t: &Tensor| store.chunk_views(t);
    let (p_v, g_v, m_v, v_v, e_v) = (
        views(store.params()),
        views(&store.grads),
        views(state.exp_avg),
        views(state.exp_avg_sq),
        views(state.ema),
    );
    for i in 0..store.chunks.len() {
        adamw_step(rec, hyper, clip, &g_v[i], &p_v[i], &m_v[i], &v_v[i])?;
        if cfg.ema {
            ema_update(rec, hyper, &p_v[i], &e_v[i])?;
        }
    }
    Ok(())
}

/// Records the step's gradient plan: the gradient buffer cleared, then for each of this rank's
/// micro-batches (global index `first + local` of the step's `total`, all ranks counted) its
/// labels, the latent encoding, the noised input, forward, loss and backward.
fn record_gradient_plan(
    gpu: &Arc<Gpu>,
    (unet, scratch, cfg): (&UNet, &StepScratch, &TrainConfig),
    (latent, text): (Option<&LatentCodec>, Option<&TrainerText>),
    (x0, labels, losses): (&[Tensor], &[Tensor], &[Tensor]),
    (first, total): (usize, usize),
    num_train_timesteps: usize,
) -> Result<Plan> {
    let rng_state = &unet.rng_state;
    let image_shape = unet.output.shape().to_vec();
    let mut rec = gpu.recorder();
    rec.clear(&unet.params.grads);
    for (local, x0_i) in x0.iter().enumerate() {
        let i = first + local;
        unet.set_micro_batch(i as u32);
        if let (Some(dst), Some(src)) = (&unet.class_labels, labels.get(local)) {
            rec.copy(src, dst)?;
        }
        if let Some(text) = text {
            text.record_forward(&mut rec, unet, local)?;
        }
        let x0_i = match latent {
            Some(codec) => {
                let z = gpu.tensor(&image_shape, &format!("latent x0 {i}"));
                let offset = (i * codec.vae.eps.numel()) as u32;
                codec.record_encode(&mut rec, x0_i, rng_state, offset, &z)?;
                z
            }
            None => x0_i.clone(),
        };
        record_noised_input(
            &mut rec,
            unet,
            scratch,
            rng_state,
            &x0_i,
            i,
            num_train_timesteps,
        )?;
        unet.forward(&mut rec)?;
        record_loss(&mut rec, unet, scratch, (cfg, total), &x0_i, &losses[local])?;
        unet.backward(&mut rec)?;
        if let Some(text) = text {
            text.joint.record_backward(&mut rec, unet)?;
        }
    }
    Ok(rec.finish())
}

/// The U-Net in training mode, and with `text` the text encoder sharing its store.
fn build_models(
    gpu: &Arc<Gpu>,
    cfg: &TrainConfig,
    model: &UNetConfig,
    text: Option<TextTraining>,
) -> Result<(UNet, Option<TrainerText>)> {
    Ok(match text {
        Some(t) => {
            let built = text_unet::build(gpu, (model, &t.config), cfg.batch_size, t.trainable)
                .context("building the U-Net and its text encoder")?;
            let text = TrainerText::new(gpu, built.1, t, cfg.grad_accum);
            (built.0, Some(text))
        }
        None => (
            UNet::new(gpu, model, cfg.batch_size).context("building the U-Net")?,
            None,
        ),
    })
}

/// AdamW's and the EMA's settings from the run's options.
fn optimizer_configs(cfg: &TrainConfig) -> (AdamwConfig, EmaConfig) {
    let adam = AdamwConfig {
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_eps,
        weight_decay: cfg.weight_decay,
    };
    let ema = EmaConfig {
        decay: cfg.ema_decay,
        min_decay: cfg.ema_min_decay,
        use_ema_warmup: cfg.ema_warmup,
        power: cfg.ema_power,
        ..Default::default()
    };
    (adam, ema)
}

impl Trainer {
    /// Allocates everything a step touches and records the step once: per micro-batch the
    /// noised input, forward, loss and backward; then clipping, AdamW and EMA.
    pub fn new(gpu: Arc<Gpu>, cfg: TrainConfig, model: &UNetConfig) -> Result<Trainer> {
        Self::with_vae(gpu, cfg, model, None)
    }

    /// [`Trainer::new`] for latent diffusion when `vae` is given: each micro-batch's images
    /// are encoded by the frozen VAE, x0 = (z − shift_factor) · scaling_factor with z sampled
    /// from the posterior (its ε from the run's RNG, purpose VAE_EPS), then the U-Net's step.
    pub fn with_vae(
        gpu: Arc<Gpu>,
        cfg: TrainConfig,
        model: &UNetConfig,
        vae: Option<&LatentVae>,
    ) -> Result<Trainer> {
        Self::data_parallel(gpu, cfg, model, vae, Rc::new(World::single()))
    }

    /// [`Trainer::with_vae`] as one rank of a data-parallel job. With N ranks and A =
    /// `grad_accum` micro-batches each, a step has N·A micro-batches; rank r records micro-batches
    /// r·A … r·A + A − 1 with exactly the RNG offsets (noise, timesteps, dropout, label dropout,
    /// VAE ε) one process with `grad_accum` N·A gives them, and the loss gradient is scaled by
    /// 1/(N·A). The gradients are summed across ranks between the gradient and update plans.
    pub fn data_parallel(
        gpu: Arc<Gpu>,
        cfg: TrainConfig,
        model: &UNetConfig,
        vae: Option<&LatentVae>,
        world: Rc<World>,
    ) -> Result<Trainer> {
        Self::build(gpu, cfg, (model, None), vae, world)
    }

    /// [`Trainer::data_parallel`], text-conditional when `text` is given: the U-Net and the
    /// text encoder in one store, each micro-batch's caption ids encoded in the step.
    pub fn build(
        gpu: Arc<Gpu>,
        cfg: TrainConfig,
        (model, text): (&UNetConfig, Option<TextTraining>),
        vae: Option<&LatentVae>,
        world: Rc<World>,
    ) -> Result<Trainer> {
        cfg.validate()
            .map_err(|e| anyhow!("invalid training options: {e}"))?;
        if let Some(v) = vae {
            v.check_fits(model)?;
        }
        let (unet, text) = build_models(&gpu, &cfg, model, text)?;
        let schedule = NoiseSchedule::new(
            cfg.beta_schedule,
            cfg.num_train_timesteps,
            cfg.beta_start,
            cfg.beta_end,
        )
        .map_err(|e| anyhow!(e))?;
        let n = unet.params.len;
        let b = cfg.batch_size;
        let image_shape = unet.output.shape().to_vec();
        let scaler = StepScaler::new(&gpu, &cfg)?;
        let mut scratch = StepScratch::new(&gpu, &cfg, model, &schedule, &image_shape)?;
        scratch.loss_scale = scaler.as_ref().map(|s| s.state.clone());
        let accum = cfg.grad_accum;
        let labels: Vec<Tensor> = match &unet.class_labels {
            Some(_) => (0..accum)
                .map(|i| gpu.tensor(&[b], &format!("class labels {i}")))
                .collect(),
            None => Vec::new(),
        };
        let latent = vae.map(|v| v.load(&gpu, b, None, false)).transpose()?;
        let x0 = data_tensors(&gpu, &image_shape, latent.as_ref(), accum);
        let losses: Vec<Tensor> = (0..accum)
            .map(|i| gpu.tensor(&[1], &format!("loss {i}")))
            .collect();
        let hyper = gpu.tensor(&[HYPER_LEN], "adamw hyper");
        // One RNG state for timesteps, noise and dropout masks, rewritten every step.
        let rng_state = unet.rng_state.clone();
        let ema = gpu.tensor(&[n], "ema");
        let exp_avg = gpu.tensor(&[n], "exp_avg");
        let exp_avg_sq = gpu.tensor(&[n], "exp_avg_sq");
        let log_record = accum + if scaler.is_some() { STATE_LEN } else { 0 };
        let log_len = cfg.log_every as usize * log_record;
        let loss_log = gpu.tensor(&[log_len], "loss log");
        let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("loss readback"),
            size: (log_len * 4) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });

        let grad_plan = record_gradient_plan(
            &gpu,
            (&unet, &scratch, &cfg),
            (latent.as_ref(), text.as_ref()),
            (&x0, &labels, &losses),
            (accum * world.rank(), accum * world.size()),
            schedule.num_train_timesteps,
        )?;
        let mut rec = gpu.recorder();
        let state = OptimizerState {
            hyper: &hyper,
            ema: &ema,
            exp_avg: &exp_avg,
            exp_avg_sq: &exp_avg_sq,
            scaler: scaler.as_ref(),
        };
        record_optimizer_update(&mut rec, &cfg, &unet.params, &state, &scratch.clip)?;
        let update_plan = rec.finish();
        let exchange = world
            .is_parallel()
            .then(|| GradExchange::new(&gpu, &unet.params.grads, &grad_plan, cfg.bucket_mb));

        let (adam, ema_cfg) = optimizer_configs(&cfg);
        Ok(Trainer {
            gpu,
            cfg,
            unet,
            schedule,
            x0,
            latent,
            labels,
            losses,
            hyper,
            rng_state,
            ema,
            exp_avg,
            exp_avg_sq,
            loss_log,
            staging,
            grad_plan,
            update_plan,
            world,
            comm_seconds: 0.0,
            exchange,
            adam,
            ema_cfg,
            step: 0,
            optimizer_steps: 0,
            scaler,
            log_record,
            data_position: 0,
            class_names: Vec::new(),
            text,
        })
    }

    /// Text-conditional runs: each micro-batch's captions from its images' labels (templates
    /// and dropout drawn from the run's streams), tokenized and uploaded.
    fn write_captions(&mut self, step: u64, labels: &[Vec<u32>]) -> Result<()> {
        let Some(text) = self.text.as_mut() else {
            return Ok(());
        };
        if labels.len() != text.ids.len() {
            bail!("the text-conditional model needs the labels of every micro-batch");
        }
        let first_micro_batch = self.world.rank() * text.ids.len();
        let draws = (self.cfg.seed, step, self.cfg.caption_drop);
        for (i, l) in labels.iter().enumerate() {
            if l.len() != self.cfg.batch_size {
                bail!(
                    "micro-batch {i}: {} labels, expected {}",
                    l.len(),
                    self.cfg.batch_size
                );
            }
            let captions = text
                .setup
                .captions_of_batch(draws, first_micro_batch + i, l);
            text.write_ids(&self.gpu, i, &captions)?;
        }
        Ok(())
    }

    /// Per-kernel wall time of one step, summed by shader entry point, slowest first.
    /// FLOPs of one step's GEMMs and convolutions (2 per multiply-add).
    pub fn step_plan_flops(&self) -> f64 {
        self.grad_plan.flops() + self.update_plan.flops()
    }

    /// Dispatches (and copies) in one step.
    pub fn step_dispatches(&self) -> usize {
        self.grad_plan.dispatch_count() + self.update_plan.dispatch_count()
    }

    pub fn profile_step(&self) -> crate::gpu::PlanProfile {
        crate::gpu::PlanProfile::of(&self.gpu, &[&self.grad_plan, &self.update_plan])
    }

    /// Data parallel: (gradient buckets, segments the gradient plan is submitted in).
    pub fn all_reduce_shape(&self) -> Option<(usize, usize)> {
        self.exchange.as_ref().map(GradExchange::shape)
    }

    /// Every rank's parameters, compared by fingerprint: an error names the ranks whose copy
    /// differs from rank 0's (data-parallel ranks must stay bit-identical).
    pub fn check_ranks_agree(&self) -> Result<()> {
        if !self.world.is_parallel() {
            return Ok(());
        }
        let params = self.gpu.read(self.unet.params.params())?;
        let all = self.world.gather_u64(crate::dist::fingerprint(&params));
        let differ = crate::dist::ranks_differing_from_root(&all);
        if !differ.is_empty() {
            bail!(
                "at step {}, the parameters of rank(s) {differ:?} differ from rank 0's (fingerprints {all:x?}): the ranks diverged (mixed GPU drivers or GEMM paths?); resume from the last checkpoint with the same adapters",
                self.step
            );
        }
        Ok(())
    }

    /// Gives every rank rank 0's parameters, EMA and AdamW moments (after initialisation or a
    /// resume) and checks that they agree on the step and data position.
    pub fn broadcast_state(&mut self) -> Result<()> {
        if !self.world.is_parallel() {
            return Ok(());
        }
        for t in [
            self.unet.params.params(),
            &self.ema,
            &self.exp_avg,
            &self.exp_avg_sq,
        ] {
            let mut flat = self.gpu.read(t)?;
            self.world.broadcast_f32(&mut flat);
            self.gpu.write(t, &flat)?;
        }
        // The same options on every rank (a different --bucket-mb alone would mismatch the
        // all-reduce's message sizes); the run folder may differ.
        let options = TrainConfig {
            out: None,
            ..self.cfg.clone()
        };
        let text = toml::to_string(&options)?;
        let all = self
            .world
            .gather_u64(crate::dist::fingerprint_bytes(text.as_bytes()));
        let differ = crate::dist::ranks_differing_from_root(&all);
        if !differ.is_empty() {
            bail!(
                "rank(s) {differ:?} were started with other training options than rank 0: every rank must get the same command line"
            );
        }
        let mut position = [self.step, self.data_position];
        self.world.broadcast_u64(&mut position);
        if position != [self.step, self.data_position] {
            bail!(
                "rank {} is at step {} (data position {}) but rank 0 at step {} ({}): every rank must resume the same run folder",
                self.world.rank(),
                self.step,
                self.data_position,
                position[0],
                position[1]
            );
        }
        Ok(())
    }

    /// Uploads initial weights (EMA starts equal to them).
    pub fn set_weights(&self, flat: &[f32]) -> Result<()> {
        self.unet.params.write_values(&self.gpu, flat)?;
        self.gpu.write(&self.ema, flat)?;
        Ok(())
    }

    /// Queues one optimizer step on `batches` (one per accumulation micro-batch): one submit.
    /// Returns the submission index; nothing is read back.
    /// `labels`: each micro-batch's class labels (class-conditional models; empty otherwise).
    /// With `cond_drop` > 0 each label is replaced by the null class with that probability,
    /// decided by the Philox stream (seed, CLASS_DROP, step, micro-batch·B + sample): the same
    /// draws whatever the machine, so resume stays exact.
    pub fn submit_step(
        &mut self,
        batches: &[Vec<f32>],
        labels: &[Vec<u32>],
    ) -> Result<wgpu::SubmissionIndex> {
        // A lost device or an error wgpu reported since the last step ends the run here.
        self.gpu.check()?;
        if batches.len() != self.x0.len() {
            bail!(
                "{} micro-batches given, grad_accum is {}",
                batches.len(),
                self.x0.len()
            );
        }
        for (t, data) in self.x0.iter().zip(batches) {
            self.gpu.write(t, data)?;
        }
        let step = self.step + 1;
        if self.text.is_some() {
            self.write_captions(step, labels)?;
        }
        if !self.labels.is_empty() {
            if labels.len() != self.labels.len() {
                bail!("the class-conditional model needs the labels of every micro-batch");
            }
            let config = &self.unet.config;
            let real = config
                .null_class
                .unwrap_or(config.num_class_embeds.unwrap_or(0));
            let b = self.cfg.batch_size;
            let first_micro_batch = self.world.rank() * self.labels.len();
            for (i, (t, l)) in self.labels.iter().zip(labels).enumerate() {
                if l.len() != b || l.iter().any(|&c| c as usize >= real) {
                    bail!(
                        "micro-batch {i}: {} labels, expected {b} in 0..{real}",
                        l.len()
                    );
                }
                let dropped: Vec<u32> = l
                    .iter()
                    .enumerate()
                    .map(|(k, &c)| match config.null_class {
                        Some(null) if self.cfg.cond_drop > 0.0 => {
                            let word = crate::rng::random_u32(
                                self.cfg.seed,
                                purpose::CLASS_DROP,
                                step as u32,
                                ((first_micro_batch + i) * b + k) as u32,
                            );
                            if (word as f64) < self.cfg.cond_drop * 4_294_967_296.0 {
                                null as u32
                            } else {
                                c
                            }
                        }
                        _ => c,
                    })
                    .collect();
                self.gpu.write_u32(t, &dropped)?;
            }
        }
        // AdamW's t and the EMA's count: one past the optimizer steps taken. With a GradScaler
        // the GPU picks them from the table (the t-dependent values written here go unused).
        let (lr, t) = (self.cfg.lr_at(step), self.optimizer_steps + 1);
        let ema_decay = self.ema_cfg.get_decay(t);
        let hyper = AdamwHyper::new(&self.adam, lr, t as u32, ema_decay);
        write_hyper(&self.gpu, &self.hyper, &hyper)?;
        if let Some(scaler) = self.scaler.as_mut() {
            scaler.write_table(&self.gpu, step, (&self.adam, &self.ema_cfg), lr)?;
        }
        write_rng_state(&self.gpu, &self.rng_state, self.cfg.seed, step as u32)?;
        let mut enc = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("train step"),
            });
        match self.exchange.as_mut() {
            // Data parallel: the gradient plan goes in segments, the gradients are summed over
            // every rank's micro-batches as backward finishes them, and the update plan's
            // submit starts from the sum (src/train/all_reduce.rs).
            Some(exchange) => {
                let grads = &self.unet.params.grads;
                self.comm_seconds +=
                    exchange.run(&self.gpu, &self.grad_plan, grads, &self.world)?;
            }
            None => self.grad_plan.encode(&mut enc),
        }
        self.update_plan.encode(&mut enc);
        let slot = ((step - 1) % self.cfg.log_every) as usize * self.log_record;
        let log = |enc: &mut wgpu::CommandEncoder, t: &Tensor, at: usize| {
            let (buffer, offset) = (self.loss_log.buffer(), self.loss_log.byte_offset());
            let at = offset + (at * 4) as u64;
            enc.copy_buffer_to_buffer(t.buffer(), t.byte_offset(), buffer, at, t.byte_len());
        };
        for (i, l) in self.losses.iter().enumerate() {
            log(&mut enc, l, slot + i);
        }
        if let Some(scaler) = &self.scaler {
            log(&mut enc, &scaler.state, slot + self.losses.len());
        }
        let idx = self.gpu.submit_encoder(enc);
        self.step = step;
        if self.scaler.is_none() {
            self.optimizer_steps += 1;
        }
        Ok(idx)
    }

    /// Starts an asynchronous readback of the loss log (one slot per step, `(step − 1) %
    /// log_every`). The returned flag turns true when `read_losses` can be called;
    /// `device.poll` drives it (waiting on the returned submission guarantees it).
    pub fn request_losses(&self) -> (Arc<AtomicBool>, wgpu::SubmissionIndex) {
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(
            self.loss_log.buffer(),
            0,
            &self.staging,
            0,
            self.loss_log.byte_len(),
        );
        let submission = self.gpu.submit_encoder(enc);
        let ready = Arc::new(AtomicBool::new(false));
        let flag = ready.clone();
        self.staging
            .slice(..)
            .map_async(wgpu::MapMode::Read, move |r| {
                if r.is_ok() {
                    flag.store(true, Ordering::Release);
                }
            });
        (ready, submission)
    }

    /// Per-step mean losses of the last readback (with the scaler's state after the step when
    /// the run has one), by slot.
    pub fn read_losses(&self) -> Result<Vec<LoggedStep>> {
        let view = self
            .staging
            .slice(..)
            .get_mapped_range()
            .map_err(|e| anyhow!("loss readback: {e}"))?;
        let all: Vec<f32> = bytemuck::pod_collect_to_vec(&view);
        drop(view);
        self.staging.unmap();
        let accum = self.losses.len();
        let records = all.chunks(self.log_record);
        let mut means: Vec<f32> = records
            .clone()
            .map(|c| c[..accum].iter().sum::<f32>() / accum as f32)
            .collect();
        // Data parallel: the job's loss is the mean over every rank's micro-batches (a
        // collective: every rank reads the same windows).
        let ranks = self.world.size();
        if ranks > 1 {
            self.world.sum_in_rank_order(&mut means);
            means.iter_mut().for_each(|m| *m /= ranks as f32);
        }
        let states = records.map(|c| {
            let words: &[u32] = bytemuck::cast_slice(&c[accum..]);
            ScalerState::from_words(words)
        });
        Ok(means
            .into_iter()
            .zip(states)
            .map(|(loss, scaler)| LoggedStep { loss, scaler })
            .collect())
    }

    /// Everything needed to continue the run, as one safetensors file.
    pub fn checkpoint_bytes(&self, model: &UNetConfig) -> Result<Vec<u8>> {
        let g = &self.gpu;
        let params = g.read(self.unet.params.params())?;
        let ema = g.read(&self.ema)?;
        let m = g.read(&self.exp_avg)?;
        let v = g.read(&self.exp_avg_sq)?;
        let mut meta = HashMap::new();
        meta.insert("format".into(), "wgpu-diffusion checkpoint v1".into());
        meta.insert("step".into(), self.step.to_string());
        let mut optimizer_steps = self.optimizer_steps;
        if let Some(scaler) = &self.scaler {
            let state = scaler.read(g)?;
            optimizer_steps = state.optimizer_steps as u64;
            meta.insert("grad_scaler".into(), StepScaler::to_metadata(&state));
        }
        meta.insert("optimizer_steps".into(), optimizer_steps.to_string());
        meta.insert("data_position".into(), self.data_position.to_string());
        meta.insert(
            "rng".into(),
            format!(
                "philox4x32-10 seed {} counter step {}",
                self.cfg.seed, self.step
            ),
        );
        meta.insert("train_config".into(), toml::to_string(&self.cfg)?);
        meta.insert("unet_config".into(), model.to_json());
        // What sampling needs of the run, so `sample::ModelSource` reads it without `train`.
        meta.insert(
            "scheduler_config".into(),
            self.cfg.scheduler_config_json().map_err(|e| anyhow!(e))?,
        );
        meta.insert("ema".into(), self.cfg.ema.to_string());
        if self.text.is_some() {
            // The text encoder's weights are in this file (under text_encoder.); its config and
            // tokenizer are in the run folder.
            meta.insert("text_conditional".into(), "true".into());
        }
        if let Some(codec) = &self.latent {
            // Sampling a checkpoint decodes with the run folder's vae/ (sample::source).
            meta.insert("latent_diffusion".into(), "true".into());
            meta.insert("vae_config".into(), codec.vae.config.to_json());
        }
        meta.insert("gemm_path".into(), self.gpu.gemm_path.to_string());
        meta.insert("precision".into(), self.gpu.precision.to_string());
        // Data parallel: the ranks the step's micro-batches were spread over.
        meta.insert("ranks".into(), self.world.size().to_string());
        let kernels: Vec<String> = self
            .gpu
            .kernels
            .keys()
            .iter()
            .map(|k| format!("{k:?}"))
            .collect();
        meta.insert("kernels".into(), serde_json::to_string(&kernels)?);
        if !self.class_names.is_empty() {
            meta.insert(
                "class_names".into(),
                serde_json::to_string(&self.class_names)?,
            );
        }
        serialize_named(
            &self.unet.params,
            &[
                ("param", &params),
                ("ema", &ema),
                ("exp_avg", &m),
                ("exp_avg_sq", &v),
            ],
            meta,
        )
    }

    /// Restores parameters, EMA, moments and the position from a checkpoint.
    pub fn restore(&mut self, ck: &LoadedTensors) -> Result<()> {
        let meta = ck.metadata();
        let num = |k: &str| -> Result<u64> {
            meta.get(k).and_then(|v| v.parse().ok()).ok_or_else(|| {
                anyhow!(
                    "{}: metadata `{k}` is missing; not a wgpu-diffusion checkpoint?",
                    ck.path.display()
                )
            })
        };
        let store = &self.unet.params;
        let g = &self.gpu;
        store.write_values(g, &ck.flat(store, "param")?)?;
        g.write(&self.ema, &ck.flat(store, "ema")?)?;
        g.write(&self.exp_avg, &ck.flat(store, "exp_avg")?)?;
        g.write(&self.exp_avg_sq, &ck.flat(store, "exp_avg_sq")?)?;
        self.step = num("step")?;
        self.data_position = num("data_position")?;
        // Checkpoints from before GradScalers: every step was an optimizer step.
        self.optimizer_steps = match meta.get("optimizer_steps") {
            Some(_) => num("optimizer_steps")?,
            None => self.step,
        };
        if let Some(scaler) = self.scaler.as_mut() {
            let state = match meta.get("grad_scaler") {
                Some(text) => StepScaler::from_metadata(text)?,
                // A run that starts scaling on resume: a fresh scale, t where AdamW stood.
                None => ScalerState::fresh(scaler.cfg.init_scale, self.optimizer_steps as u32),
            };
            scaler.reset(g, self.step, state)?;
        }
        Ok(())
    }
}
