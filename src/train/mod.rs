//! The training loop: AdamW with warmup + constant/cosine LR, global-norm clipping on the GPU,
//! EMA (diffusers EMAModel), gradient accumulation, one queue submit per step, losses read back
//! asynchronously, a background data thread, seeded sample grids, atomic checkpoints and resume.

pub mod checkpoint;
pub mod config;
pub mod plot;
pub mod sample;

pub use config::{LrSchedule, TrainConfig};

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};

use crate::data::{Dataset, Loader};
use crate::diffusion::{NoiseSchedule, PredictionType};
use crate::gpu::{Gpu, Plan, Tensor};
use crate::nn::{UNet, UNetConfig};
use crate::ops::adamw::{
    AdamwConfig, AdamwHyper, EmaConfig, HYPER_LEN, adamw_step, ema_update, grad_norm_chunks,
    write_hyper,
};
use crate::ops::diffusion::{min_snr_weights, v_target};
use crate::ops::elementwise::cast_u32_to_f32;
use crate::ops::loss::{mse_backward, mse_loss};
use crate::ops::noise::{purpose, q_sample, random_normal, random_uniform_u32, write_rng_state};
use checkpoint::{LoadedTensors, atomic_write, save_model_dir, serialize_named};

/// Resolves the model config of a run.
pub fn resolve_model_config(cfg: &TrainConfig) -> Result<UNetConfig> {
    if let Some(init) = &cfg.init {
        return checkpoint::read_model_config(init);
    }
    if let Some(path) = &cfg.model_config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --model-config {}", path.display()))?;
        return UNetConfig::from_json(&text).map_err(|e| anyhow!("{}: {e}", path.display()));
    }
    UNetConfig::preset(&cfg.model).ok_or_else(|| {
        anyhow!(
            "unknown model preset `{}` (choose {})",
            cfg.model,
            UNetConfig::PRESETS.join(", ")
        )
    })
}

/// Everything a step touches, allocated once.
pub struct Trainer {
    pub gpu: Arc<Gpu>,
    pub cfg: TrainConfig,
    pub unet: UNet,
    pub schedule: NoiseSchedule,
    x0: Vec<Tensor>,
    losses: Vec<Tensor>,
    hyper: Tensor,
    rng_state: Tensor,
    pub ema: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    loss_log: Tensor,
    staging: wgpu::Buffer,
    step_plan: Plan,
    adam: AdamwConfig,
    ema_cfg: EmaConfig,
    /// Optimizer steps done.
    pub step: u64,
    /// Images consumed from the data stream.
    pub data_position: u64,
}

impl Trainer {
    pub fn new(gpu: Arc<Gpu>, cfg: TrainConfig, model: &UNetConfig) -> Result<Trainer> {
        cfg.validate()
            .map_err(|e| anyhow!("invalid training options: {e}"))?;
        let unet = UNet::new(&gpu, model, cfg.batch_size).context("building the U-Net")?;
        let schedule = NoiseSchedule::new(
            cfg.beta_schedule,
            cfg.num_train_timesteps,
            cfg.beta_start,
            cfg.beta_end,
        )
        .map_err(|e| anyhow!(e))?;
        let n = unet.params.len;
        let b = cfg.batch_size;
        let image_shape = unet.sample.shape().to_vec();
        let numel: usize = image_shape.iter().product();
        let accum = cfg.grad_accum;
        let x0: Vec<Tensor> = (0..accum)
            .map(|i| gpu.tensor(&image_shape, &format!("x0 {i}")))
            .collect();
        let losses: Vec<Tensor> = (0..accum)
            .map(|i| gpu.tensor(&[1], &format!("loss {i}")))
            .collect();
        let noise = gpu.tensor(&image_shape, "noise");
        let timesteps = gpu.tensor(&[b], "timesteps u32");
        let acp = gpu.tensor_from(
            &[schedule.num_train_timesteps],
            &schedule.alphas_cumprod,
            "alphas_cumprod",
        )?;
        let hyper = gpu.tensor(&[HYPER_LEN], "adamw hyper");
        // One RNG state for timesteps, noise and dropout masks, rewritten every step.
        let rng_state = unet.rng_state.clone();
        let clip = gpu.tensor(&[2], "grad clip, norm");
        let ema = gpu.tensor(&[n], "ema");
        let exp_avg = gpu.tensor(&[n], "exp_avg");
        let exp_avg_sq = gpu.tensor(&[n], "exp_avg_sq");
        let log_len = cfg.log_every as usize * accum;
        let loss_log = gpu.tensor(&[log_len], "loss log");
        let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("loss readback"),
            size: (log_len * 4) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let target = match cfg.prediction_type {
            PredictionType::VPrediction => Some(gpu.tensor(&image_shape, "v target")),
            _ => None,
        };
        let weights = (cfg.snr_gamma > 0.0).then(|| gpu.tensor(&[b], "min-SNR weights"));

        let mut rec = gpu.recorder();
        rec.clear(&unet.params.grads);
        for (i, x0_i) in x0.iter().enumerate() {
            unet.set_micro_batch(i as u32);
            random_uniform_u32(
                &mut rec,
                &rng_state,
                purpose::TIMESTEPS,
                (i * b) as u32,
                schedule.num_train_timesteps as u32,
                &timesteps,
            )?;
            cast_u32_to_f32(&mut rec, &timesteps, &unet.timesteps)?;
            random_normal(
                &mut rec,
                &rng_state,
                purpose::NOISE,
                (i * numel) as u32,
                &noise,
            )?;
            q_sample(&mut rec, x0_i, &noise, &timesteps, &acp, &unet.sample.value)?;
            unet.forward(&mut rec)?;
            let target_t = match (cfg.prediction_type, &target) {
                (PredictionType::Epsilon, _) => &noise,
                (PredictionType::Sample, _) => x0_i,
                (PredictionType::VPrediction, Some(t)) => {
                    v_target(&mut rec, x0_i, &noise, &timesteps, &acp, t)?;
                    t
                }
                (PredictionType::VPrediction, None) => unreachable!("v target allocated above"),
            };
            if let Some(w) = &weights {
                min_snr_weights(
                    &mut rec,
                    &timesteps,
                    &acp,
                    cfg.snr_gamma as f32,
                    cfg.prediction_type,
                    w,
                )?;
            }
            mse_loss(
                &mut rec,
                &unet.output.value,
                target_t,
                weights.as_ref(),
                &losses[i],
            )?;
            mse_backward(
                &mut rec,
                &unet.output.value,
                target_t,
                weights.as_ref(),
                1.0 / accum as f32,
                &unet.output.grad,
            )?;
            unet.backward(&mut rec)?;
        }
        let max_norm = (cfg.max_grad_norm > 0.0).then_some(cfg.max_grad_norm as f32);
        let store = &unet.params;
        grad_norm_chunks(&mut rec, &store.chunk_views(&store.grads), max_norm, &clip)?;
        let views = |t: &Tensor| store.chunk_views(t);
        let (p_v, g_v, m_v, v_v, e_v) = (
            views(&store.params),
            views(&store.grads),
            views(&exp_avg),
            views(&exp_avg_sq),
            views(&ema),
        );
        for i in 0..store.chunks.len() {
            adamw_step(&mut rec, &hyper, &clip, &g_v[i], &p_v[i], &m_v[i], &v_v[i])?;
            if cfg.ema {
                ema_update(&mut rec, &hyper, &p_v[i], &e_v[i])?;
            }
        }
        let step_plan = rec.finish();
        let adam = AdamwConfig {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_eps,
            weight_decay: cfg.weight_decay,
        };
        let ema_cfg = EmaConfig {
            decay: cfg.ema_decay,
            min_decay: cfg.ema_min_decay,
            use_ema_warmup: cfg.ema_warmup,
            power: cfg.ema_power,
            ..Default::default()
        };
        Ok(Trainer {
            gpu,
            cfg,
            unet,
            schedule,
            x0,
            losses,
            hyper,
            rng_state,
            ema,
            exp_avg,
            exp_avg_sq,
            loss_log,
            staging,
            step_plan,
            adam,
            ema_cfg,
            step: 0,
            data_position: 0,
        })
    }

    /// Per-kernel wall time of one step, summed by shader entry point, slowest first.
    pub fn profile_step(&self) -> Vec<(String, usize, f64)> {
        let mut by_entry: HashMap<String, (usize, f64)> = HashMap::new();
        let records = self.step_plan.records();
        for (i, secs) in self.step_plan.profile(&self.gpu) {
            let r = &records[i];
            let name = if r.kind == "dispatch" {
                format!("{}::{}", r.shader, r.entry)
            } else {
                r.kind.to_string()
            };
            let e = by_entry.entry(name).or_default();
            e.0 += 1;
            e.1 += secs;
        }
        let mut v: Vec<_> = by_entry.into_iter().map(|(k, (n, s))| (k, n, s)).collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    }

    /// Uploads initial weights (EMA starts equal to them).
    pub fn set_weights(&self, flat: &[f32]) -> Result<()> {
        self.gpu.write(&self.unet.params.params, flat)?;
        self.gpu.write(&self.ema, flat)?;
        Ok(())
    }

    /// Queues one optimizer step on `batches` (one per accumulation micro-batch): one submit.
    /// Returns the submission index; nothing is read back.
    pub fn submit_step(&mut self, batches: &[Vec<f32>]) -> Result<wgpu::SubmissionIndex> {
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
        let ema_decay = self.ema_cfg.get_decay(step);
        write_hyper(
            &self.gpu,
            &self.hyper,
            &AdamwHyper::new(&self.adam, self.cfg.lr_at(step), step as u32, ema_decay),
        )?;
        write_rng_state(&self.gpu, &self.rng_state, self.cfg.seed, step as u32)?;
        let mut enc = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("train step"),
            });
        self.step_plan.encode(&mut enc);
        let slot = ((step - 1) % self.cfg.log_every) as usize * self.losses.len();
        for (i, l) in self.losses.iter().enumerate() {
            enc.copy_buffer_to_buffer(
                l.buffer(),
                l.byte_offset(),
                self.loss_log.buffer(),
                ((slot + i) * 4) as u64,
                4,
            );
        }
        let idx = self.gpu.queue.submit([enc.finish()]);
        self.step = step;
        Ok(idx)
    }

    /// Starts an asynchronous readback of the loss log (the last `log_every` steps). The
    /// returned flag turns true when `read_losses` can be called; `device.poll` drives it.
    pub fn request_losses(&self) -> Arc<AtomicBool> {
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(
            self.loss_log.buffer(),
            0,
            &self.staging,
            0,
            self.loss_log.byte_len(),
        );
        self.gpu.queue.submit([enc.finish()]);
        let ready = Arc::new(AtomicBool::new(false));
        let flag = ready.clone();
        self.staging
            .slice(..)
            .map_async(wgpu::MapMode::Read, move |r| {
                if r.is_ok() {
                    flag.store(true, Ordering::Release);
                }
            });
        ready
    }

    /// Per-step mean losses of the last readback.
    pub fn read_losses(&self) -> Result<Vec<f32>> {
        let view = self
            .staging
            .slice(..)
            .get_mapped_range()
            .map_err(|e| anyhow!("loss readback: {e}"))?;
        let all: Vec<f32> = bytemuck::pod_collect_to_vec(&view);
        drop(view);
        self.staging.unmap();
        let accum = self.losses.len();
        Ok(all
            .chunks(accum)
            .map(|c| c.iter().sum::<f32>() / accum as f32)
            .collect())
    }

    /// Everything needed to continue the run, as one safetensors file.
    pub fn checkpoint_bytes(&self, model: &UNetConfig) -> Result<Vec<u8>> {
        let g = &self.gpu;
        let params = g.read(&self.unet.params.params)?;
        let ema = g.read(&self.ema)?;
        let m = g.read(&self.exp_avg)?;
        let v = g.read(&self.exp_avg_sq)?;
        let mut meta = HashMap::new();
        meta.insert("format".into(), "wgpu-diffusion checkpoint v1".into());
        meta.insert("step".into(), self.step.to_string());
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
        meta.insert("gemm_path".into(), self.gpu.gemm_path.to_string());
        let kernels: Vec<String> = self
            .gpu
            .kernels
            .keys()
            .iter()
            .map(|k| format!("{k:?}"))
            .collect();
        meta.insert("kernels".into(), serde_json::to_string(&kernels)?);
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
        g.write(&store.params, &ck.flat(store, "param")?)?;
        g.write(&self.ema, &ck.flat(store, "ema")?)?;
        g.write(&self.exp_avg, &ck.flat(store, "exp_avg")?)?;
        g.write(&self.exp_avg_sq, &ck.flat(store, "exp_avg_sq")?)?;
        self.step = num("step")?;
        self.data_position = num("data_position")?;
        Ok(())
    }
}

/// The folders of a run.
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn checkpoints(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
    pub fn samples(&self) -> PathBuf {
        self.root.join("samples")
    }
    pub fn model(&self) -> PathBuf {
        self.root.join("model")
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    /// Checkpoint files, oldest first.
    pub fn list_checkpoints(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.checkpoints())
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// What a finished (or stopped) run reports.
#[derive(Debug)]
pub struct RunSummary {
    pub run_dir: PathBuf,
    pub steps: u64,
    pub interrupted: bool,
    pub losses: Vec<(u64, f32)>,
}

/// Hooks for progress display (a bar on terminals, log lines otherwise).
pub trait Progress {
    fn start(&mut self, first_step: u64, total: u64);
    fn update(&mut self, step: u64, loss: Option<f32>, lr: f64, images_per_s: f64);
    fn message(&mut self, text: &str);
    fn finish(&mut self);
}

/// Runs (or resumes) training. `stop` is raised by Ctrl-C: the loop then writes a checkpoint and
/// returns cleanly.
pub fn run(
    gpu: Arc<Gpu>,
    mut cfg: TrainConfig,
    resume: Option<&Path>,
    stop: Arc<AtomicBool>,
    progress: &mut dyn Progress,
) -> Result<RunSummary> {
    let (run_dir, checkpoint) = match resume {
        Some(dir) => {
            let rd = RunDir {
                root: dir.to_path_buf(),
            };
            let last = rd.list_checkpoints().pop().ok_or_else(|| {
                anyhow!(
                    "--resume {}: no checkpoint in {}",
                    dir.display(),
                    rd.checkpoints().display()
                )
            })?;
            (rd, Some(LoadedTensors::read(&last)?))
        }
        None => {
            let root = cfg.out.clone().unwrap_or_else(default_run_dir);
            if root.join("checkpoints").exists() {
                bail!(
                    "{} already holds a run; use `train --resume {}` or another --out",
                    root.display(),
                    root.display()
                );
            }
            (RunDir { root }, None)
        }
    };
    let model = match &checkpoint {
        Some(ck) => {
            let meta = ck.metadata();
            let text = meta
                .get("unet_config")
                .ok_or_else(|| anyhow!("{}: no unet_config in its metadata", ck.path.display()))?;
            UNetConfig::from_json(text).map_err(|e| anyhow!("{}: {e}", ck.path.display()))?
        }
        None => resolve_model_config(&cfg)?,
    };
    if model.sample_size == 0 {
        bail!("the model config has no sample_size");
    }
    cfg.out = Some(run_dir.root.clone());
    std::fs::create_dir_all(run_dir.checkpoints())
        .with_context(|| format!("creating {}", run_dir.root.display()))?;
    std::fs::create_dir_all(run_dir.samples())?;
    atomic_write(&run_dir.config(), toml::to_string(&cfg)?.as_bytes())?;

    // Data, decoded once.
    let data: Arc<Dataset> = Arc::new(match &cfg.data {
        None => crate::data::mnist::load(model.sample_size, model.in_channels)?,
        Some(dir) => {
            let (d, skipped) = crate::data::folder::load(
                dir,
                model.sample_size,
                model.in_channels,
                cfg.hflip,
                cfg.strict,
            )?;
            if !skipped.is_empty() {
                progress.message(&format!(
                    "warning: skipped {} unreadable image(s), e.g. {}",
                    skipped.len(),
                    skipped[0]
                ));
            }
            d
        }
    });
    progress.message(&format!("data: {}", data.description));

    let mut trainer = Trainer::new(gpu.clone(), cfg.clone(), &model)?;
    progress.message(&format!(
        "model: {} parameters, batch {} x {} accumulation, {} dispatches per step",
        trainer.unet.params.count(),
        cfg.batch_size,
        cfg.grad_accum,
        trainer.step_plan.dispatch_count()
    ));
    match &checkpoint {
        Some(ck) => {
            trainer.restore(ck)?;
            progress.message(&format!(
                "resumed from {} at step {}",
                ck.path.display(),
                trainer.step
            ));
        }
        None => match &cfg.init {
            Some(dir) => {
                trainer.set_weights(&checkpoint::read_model_weights(dir, &trainer.unet.params)?)?;
                progress.message(&format!("initialised from {}", dir.display()));
            }
            None => trainer.set_weights(&crate::nn::init::default_init(
                &trainer.unet.params,
                cfg.seed,
            ))?,
        },
    }
    let mut sampler = sample::Sampler::new(
        &gpu,
        &model,
        &trainer.schedule,
        cfg.prediction_type,
        cfg.sample_steps,
    )?;

    let loader = Loader::start(
        data.clone(),
        cfg.batch_size,
        cfg.seed,
        trainer.data_position,
    );
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.metrics())?;
    let mut history: Vec<(u64, f32)> = read_metric_history(&run_dir.metrics(), trainer.step);
    let start = Instant::now();
    let mut pending: Option<(Arc<AtomicBool>, u64, Instant)> = None;
    let mut window_start = (trainer.step, Instant::now());
    let mut inflight: std::collections::VecDeque<wgpu::SubmissionIndex> = Default::default();
    let mut interrupted = false;
    progress.start(trainer.step, cfg.steps);

    while trainer.step < cfg.steps {
        if stop.load(Ordering::Relaxed) {
            interrupted = true;
            break;
        }
        let batches: Vec<Vec<f32>> = (0..cfg.grad_accum)
            .map(|_| {
                let b = loader.next();
                trainer.data_position = b.position;
                b.data
            })
            .collect();
        let idx = trainer.submit_step(&batches)?;
        inflight.push_back(idx);
        // Keep at most two steps queued so the CPU never runs far ahead of the GPU.
        if inflight.len() > 2 {
            let old = inflight.pop_front().expect("non-empty");
            gpu.device
                .poll(wgpu::PollType::Wait {
                    submission_index: Some(old),
                    timeout: None,
                })
                .map_err(|e| anyhow!("GPU error: {e}"))?;
        } else {
            let _ = gpu.device.poll(wgpu::PollType::Poll);
        }
        let step = trainer.step;
        let lr = cfg.lr_at(step);

        // Losses of the previous window, read back asynchronously.
        if let Some((ready, last_step, _)) = &pending
            && ready.load(Ordering::Acquire)
        {
            let last_step = *last_step;
            let losses = trainer.read_losses()?;
            pending = None;
            let n = losses.len() as u64;
            let now = Instant::now();
            let ips = ((last_step - window_start.0) * (cfg.batch_size * cfg.grad_accum) as u64)
                as f64
                / now.duration_since(window_start.1).as_secs_f64().max(1e-9);
            window_start = (last_step, now);
            for (k, loss) in losses.iter().enumerate() {
                let s = last_step + 1 - n + k as u64;
                if !loss.is_finite() {
                    let last = run_dir.list_checkpoints().pop();
                    bail!(
                        "the loss became non-finite ({loss}) at step {s}. Training stopped; the last good checkpoint is {}. Lower --lr or set --max-grad-norm.",
                        last.map(|p| p.display().to_string())
                            .unwrap_or_else(|| "none (no checkpoint was written yet)".into())
                    );
                }
                history.push((s, *loss));
                writeln!(
                    metrics,
                    "{}",
                    serde_json::json!({"step": s, "loss": loss, "lr": cfg.lr_at(s), "img_per_s": ips, "elapsed_s": start.elapsed().as_secs_f64()})
                )?;
            }
            progress.update(last_step, losses.last().copied(), cfg.lr_at(last_step), ips);
        }
        if step % cfg.log_every == 0 && pending.is_none() {
            pending = Some((trainer.request_losses(), step, Instant::now()));
        }
        progress.update(step, None, lr, 0.0);

        if cfg.sample_every > 0 && step % cfg.sample_every == 0 && step < cfg.steps {
            write_samples(&gpu, &trainer, &mut sampler, &run_dir, step, progress)?;
        }
        if step % cfg.checkpoint_every == 0 && step < cfg.steps {
            save_checkpoint(&trainer, &model, &run_dir, progress)?;
        }
    }
    // Drain the last losses.
    gpu.wait()?;
    if let Some((ready, last_step, _)) = pending.take() {
        let _ = gpu.device.poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: None,
        });
        if ready.load(Ordering::Acquire) {
            let losses = trainer.read_losses()?;
            let n = losses.len() as u64;
            for (k, loss) in losses.iter().enumerate() {
                let s = last_step + 1 - n + k as u64;
                history.push((s, *loss));
                writeln!(
                    metrics,
                    "{}",
                    serde_json::json!({"step": s, "loss": loss, "lr": cfg.lr_at(s), "elapsed_s": start.elapsed().as_secs_f64()})
                )?;
            }
        }
    }
    if let Some(&(_, l)) = history.last()
        && !l.is_finite()
    {
        bail!("the loss became non-finite; training stopped without writing a checkpoint");
    }
    save_checkpoint(&trainer, &model, &run_dir, progress)?;
    if !interrupted {
        write_samples(
            &gpu,
            &trainer,
            &mut sampler,
            &run_dir,
            trainer.step,
            progress,
        )?;
    }
    plot::loss_plot(&history, &run_dir.root.join("loss.png"))?;
    progress.finish();
    Ok(RunSummary {
        run_dir: run_dir.root,
        steps: trainer.step,
        interrupted,
        losses: history,
    })
}

fn read_metric_history(path: &Path, up_to: u64) -> Vec<(u64, f32)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_u64()?, v["loss"].as_f64()? as f32)))
        .filter(|(s, _)| *s <= up_to)
        .collect()
}

fn default_run_dir() -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("runs").join(format!("run-{secs}"))
}

fn save_checkpoint(
    trainer: &Trainer,
    model: &UNetConfig,
    run_dir: &RunDir,
    progress: &mut dyn Progress,
) -> Result<()> {
    let bytes = trainer.checkpoint_bytes(model)?;
    let path = run_dir
        .checkpoints()
        .join(format!("step-{:08}.safetensors", trainer.step));
    atomic_write(&path, &bytes)?;
    // The exported model: EMA weights when EMA is on.
    let weights = trainer.gpu.read(if trainer.cfg.ema {
        &trainer.ema
    } else {
        &trainer.unet.params.params
    })?;
    save_model_dir(
        &run_dir.model(),
        model,
        &trainer.unet.params,
        &weights,
        &trainer
            .schedule
            .scheduler_config_json(trainer.cfg.prediction_type),
    )?;
    let all = run_dir.list_checkpoints();
    if all.len() > trainer.cfg.keep_checkpoints {
        for old in &all[..all.len() - trainer.cfg.keep_checkpoints] {
            let _ = std::fs::remove_file(old);
        }
    }
    progress.message(&format!(
        "checkpoint {} (model exported to {})",
        path.display(),
        run_dir.model().display()
    ));
    Ok(())
}

fn write_samples(
    gpu: &Arc<Gpu>,
    trainer: &Trainer,
    sampler: &mut sample::Sampler,
    run_dir: &RunDir,
    step: u64,
    progress: &mut dyn Progress,
) -> Result<()> {
    let t = Instant::now();
    let weights = if trainer.cfg.ema {
        &trainer.ema
    } else {
        &trainer.unet.params.params
    };
    let images = sampler.sample(gpu, weights, trainer.cfg.seed)?;
    let path = run_dir.samples().join(format!("step-{step:08}.png"));
    plot::save_grid(&images, sampler.image_shape(), 4, &path)?;
    progress.message(&format!(
        "samples {} ({:.1} s)",
        path.display(),
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}
