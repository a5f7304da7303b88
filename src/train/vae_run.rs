//! A VAE training run on MNIST (issue 22's `train-vae`): steps of [`VaeTrainer`] over seeded
//! epoch permutations of the training digits (padded to the VAE's size with the background
//! value), `metrics.jsonl`, held-out reconstruction grids in `samples/` (their PSNR logged as
//! `test_psnr`), atomic checkpoints in `checkpoints/` and a resume that gives the same bits as an
//! uninterrupted run; at the end `scaling_factor` by Rombach's scale_by_std, the exported
//! diffusers directory `vae/`, `reconstructions.png` and `loss.png`, then `finished.json`.
//!
//! The run folder (a [`RunDir`]) holds `train-vae.toml` (the run's options, [`VaeRunOptions`])
//! and `vae-config.json` (the VAE's config) from its start, so a run killed before its first
//! checkpoint resumes from step 0; each checkpoint holds both too, and a resume takes them from
//! the last one.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::RunDir;
use super::run_dir::truncate_metrics;
use super::vae_trainer::{VaeTrainConfig, VaeTrainer, crop_psnr, mnist_canvas};
use crate::data::{Dataset, epoch_order};
use crate::gpu::{Gpu, Plan};
use crate::io::atomic::atomic_write;
use crate::io::images::save_grid;
use crate::io::model_dir::MODEL_WEIGHTS;
use crate::io::tensors::{LoadedTensors, read_metadata, serialize_named};
use crate::nn::VaeConfig;
use crate::ops::noise::{purpose, random_normal, write_rng_state};
use crate::progress::ConsoleProgress;

/// The run's options, in the run folder as [`RUN_OPTIONS`] and in every checkpoint's metadata
/// (`run_options`), both TOML.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeRunOptions {
    /// Optimizer steps of the whole run.
    pub steps: u64,
    /// A checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept (the oldest are deleted).
    pub keep_checkpoints: usize,
    /// A held-out reconstruction grid every this many steps and at the end (0: none).
    pub sample_every: u64,
    /// What the steps depend on.
    pub train: VaeTrainConfig,
}

impl VaeRunOptions {
    /// Every option checked by name (before anything is allocated).
    pub fn validate(&self) -> Result<()> {
        self.train.validate()?;
        if self.steps == 0 {
            bail!("--steps must be at least 1");
        }
        if self.keep_checkpoints == 0 {
            bail!(
                "--keep-checkpoints must be at least 1 (the last checkpoint is what a resume reads)"
            );
        }
        Ok(())
    }

    /// Whether step `step` draws a held-out grid: every `sample_every` steps and at the end.
    pub fn is_sample_step(&self, step: u64) -> bool {
        self.sample_every > 0 && (step.is_multiple_of(self.sample_every) || step == self.steps)
    }
}

/// The run's options in its folder.
pub const RUN_OPTIONS: &str = "train-vae.toml";
/// The VAE's config (diffusers JSON) in the run folder.
pub const RUN_MODEL: &str = "vae-config.json";
/// MNIST's training digits.
const MNIST_TRAIN_IMAGES: usize = 60_000;

/// What a finished (or stopped) VAE run reports.
#[derive(Debug)]
pub struct VaeRunSummary {
    pub out: PathBuf,
    /// (step, loss) of every step of the run, those before a resume included.
    pub losses: Vec<(u64, f32)>,
    /// The step the run stopped at.
    pub step: u64,
    /// Stopped (Ctrl-C) before its last step: a checkpoint was written, nothing exported.
    pub interrupted: bool,
    /// Of the export (None when interrupted).
    pub scaling_factor: Option<f64>,
    /// Mean PSNR of the held-out reconstructions of `reconstructions.png` (28×28 crop, [0, 1]).
    pub test_psnr: Option<f64>,
}

/// A run folder to resume, read without its tensors.
#[derive(Debug)]
pub struct VaeResumePoint {
    pub dir: PathBuf,
    pub model: VaeConfig,
    pub options: VaeRunOptions,
    /// The last checkpoint (none when the run was killed before its first).
    pub checkpoint: Option<PathBuf>,
    /// The step that checkpoint holds (0 without one).
    pub step: u64,
    /// The GEMM path the run trained with (a resumed run keeps it: the same bits).
    pub gemm_path: Option<String>,
}

impl VaeResumePoint {
    /// The VAE config and options of the last checkpoint of the run in `dir`, or of its
    /// `train-vae.toml` and `vae-config.json` when it has none.
    pub fn read(dir: &Path) -> Result<VaeResumePoint> {
        let rd = RunDir {
            root: dir.to_path_buf(),
        };
        let Some(last) = rd.list_checkpoints().pop() else {
            return Self::from_run_files(dir);
        };
        let meta = read_metadata(&last)?;
        let get = |key: &str| {
            meta.get(key).ok_or_else(|| {
                anyhow!(
                    "{}: no `{key}` in its metadata: not a train-vae checkpoint (a U-Net run resumes with `train --resume`)",
                    last.display()
                )
            })
        };
        let model = VaeConfig::from_json(get("vae_config")?)
            .map_err(|e| anyhow!("{}: vae_config: {e}", last.display()))?;
        let options: VaeRunOptions = toml::from_str(get("run_options")?)
            .map_err(|e| anyhow!("{}: run_options: {e}", last.display()))?;
        let step = get("step")?
            .parse::<u64>()
            .map_err(|e| anyhow!("{}: step: {e}", last.display()))?;
        Ok(VaeResumePoint {
            dir: dir.to_path_buf(),
            model,
            options,
            checkpoint: Some(last),
            step,
            gemm_path: meta.get("gemm_path").cloned(),
        })
    }

    fn from_run_files(dir: &Path) -> Result<VaeResumePoint> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    anyhow!(
                        "--resume {}: no train-vae run there (no checkpoint, no {name}); start one with `train-vae --out {}`",
                        dir.display(),
                        dir.display()
                    )
                } else {
                    anyhow!("--resume {}: {e}", path.display())
                }
            })
        };
        let options: VaeRunOptions = toml::from_str(&read(RUN_OPTIONS)?)
            .map_err(|e| anyhow!("{}: {e}", dir.join(RUN_OPTIONS).display()))?;
        let model = VaeConfig::from_json(&read(RUN_MODEL)?)
            .map_err(|e| anyhow!("{}: {e}", dir.join(RUN_MODEL).display()))?;
        Ok(VaeResumePoint {
            dir: dir.to_path_buf(),
            model,
            options,
            checkpoint: None,
            step: 0,
            gemm_path: None,
        })
    }

    /// Whether the run ended cleanly at its checkpoint's step (its export written).
    pub fn finished(&self) -> bool {
        RunDir {
            root: self.dir.clone(),
        }
        .finished_at(self.step)
    }

    /// Whether resuming with `options` has something to do: an error for a finished run (or
    /// one past `options.steps`). Ok(true) when only the run's end (export, grids) is left.
    pub fn check_steps(&self, options: &VaeRunOptions) -> Result<bool> {
        let (dir, step, steps) = (self.dir.display(), self.step, options.steps);
        if step > steps {
            bail!(
                "--resume {dir}: the run is at step {step}, past --steps {steps}: give --steps above {step} to train further"
            );
        }
        if step == steps && self.finished() {
            bail!(
                "--resume {dir}: the run is finished (step {step} of {steps}): nothing to do; give --steps above {step} to train further"
            );
        }
        Ok(step == steps)
    }
}

/// What every run (new or resumed) needs checked before the GPU starts: the options and a VAE
/// that fits MNIST's digits.
fn check_fits(model: &VaeConfig, opts: &VaeRunOptions) -> Result<()> {
    opts.validate()?;
    if model.in_channels != 1 || model.out_channels != 1 {
        bail!("train-vae trains on MNIST: the VAE needs 1 input and 1 output channel");
    }
    mnist_canvas(&[], 0, model.sample_size)?;
    if opts.train.batch_size > MNIST_TRAIN_IMAGES {
        bail!(
            "--batch-size {} is larger than the data set ({MNIST_TRAIN_IMAGES} digits)",
            opts.train.batch_size
        );
    }
    Ok(())
}

/// Everything a new run needs checked before the GPU starts: the options, a VAE that fits
/// MNIST's digits, and an `out` that holds no run yet (a run there is resumed with `--resume`).
pub fn check_vae_run(model: &VaeConfig, opts: &VaeRunOptions, out: &Path) -> Result<()> {
    check_fits(model, opts)?;
    let rd = RunDir {
        root: out.to_path_buf(),
    };
    if out.join("vae").exists()
        || out.join(RUN_OPTIONS).exists()
        || rd.metrics().exists()
        || !rd.list_checkpoints().is_empty()
    {
        bail!(
            "{} already holds a run; continue it with `train-vae --resume {}`, or choose another --out",
            out.display(),
            out.display()
        );
    }
    Ok(())
}

/// Runs (or, with `resume`, continues) a VAE run in `out` up to `opts.steps`, then writes its
/// end. `stop` (Ctrl-C) ends it early with a checkpoint.
pub fn run_vae(
    gpu: Arc<Gpu>,
    model: &VaeConfig,
    opts: &VaeRunOptions,
    out: &Path,
    resume: Option<&VaeResumePoint>,
    stop: &AtomicBool,
) -> Result<VaeRunSummary> {
    match resume {
        None => check_vae_run(model, opts, out)?,
        Some(point) => {
            check_fits(model, opts)?;
            point.check_steps(opts)?;
        }
    }
    let data = crate::data::mnist::load(28, 1)?;
    let mut trainer = gpu
        .checked_build(|| VaeTrainer::new(gpu.clone(), opts.train.clone(), model))
        .map_err(|e| anyhow!("{e} (try a smaller --batch-size)"))?;
    match resume.and_then(|p| p.checkpoint.as_ref().map(|c| (c, p.step))) {
        Some((path, step)) => {
            trainer.restore(&LoadedTensors::read(path)?)?;
            if trainer.step != step {
                bail!(
                    "{}: holds step {}, its header said {step} a moment ago (rewritten meanwhile?); resume again",
                    path.display(),
                    trainer.step
                );
            }
        }
        None => trainer.set_weights(&crate::nn::init::default_init(
            &trainer.vae.params,
            opts.train.seed,
        ))?,
    }
    let held_out = HeldOut::new(&trainer)?;
    let rd = RunDir {
        root: out.to_path_buf(),
    };
    write_run_files(&rd, model, opts)?;
    // Rows past the checkpoint's step (logged before a kill) and a torn last row are dropped,
    // so a resumed run never logs a step twice.
    let mut losses = truncate_metrics(&rd.metrics(), trainer.step).context("metrics.jsonl")?;
    let mut progress = ConsoleProgress::new("train-vae", "steps");
    if trainer.step > 0 {
        progress.println(&format!("resumed at step {}", trainer.step));
    }
    let run = VaeRun {
        model,
        opts,
        rd: &rd,
        held_out: &held_out,
    };
    let interrupted = run
        .train_steps(&mut trainer, &data, &mut losses, stop, &mut progress)
        .map_err(|e| with_resume_hint(e, &gpu, &rd))?;
    progress.finish();
    let mut summary = VaeRunSummary {
        out: out.to_path_buf(),
        losses,
        step: trainer.step,
        interrupted,
        scaling_factor: None,
        test_psnr: None,
    };
    if !interrupted {
        let (factor, psnr) = run
            .write_end(&trainer, &data, &summary.losses, &progress)
            .map_err(|e| with_resume_hint(e, &gpu, &rd))?;
        summary.scaling_factor = Some(factor);
        summary.test_psnr = Some(psnr);
    }
    Ok(summary)
}

/// Creates the run folder, clears what a kill left half-written, and writes the run's options.
fn write_run_files(rd: &RunDir, model: &VaeConfig, opts: &VaeRunOptions) -> Result<()> {
    std::fs::create_dir_all(rd.checkpoints())
        .with_context(|| format!("creating {}", rd.checkpoints().display()))?;
    std::fs::create_dir_all(rd.samples())
        .with_context(|| format!("creating {}", rd.samples().display()))?;
    rd.remove_partial_files();
    atomic_write(&rd.root.join(RUN_MODEL), model.to_json().as_bytes())?;
    atomic_write(
        &rd.root.join(RUN_OPTIONS),
        toml::to_string(opts)?.as_bytes(),
    )
}

/// Whatever stopped the run (a lost device, a full disk, a non-finite loss), its last
/// checkpoint is intact: the error says how to go on.
fn with_resume_hint(e: anyhow::Error, gpu: &Gpu, rd: &RunDir) -> anyhow::Error {
    let hint = match rd.list_checkpoints().pop() {
        Some(last) => format!(
            "the last complete checkpoint is {}; continue with `wgpu-diffusion train-vae --resume {}`",
            last.display(),
            rd.root.display()
        ),
        None => format!(
            "no checkpoint was written yet; `wgpu-diffusion train-vae --resume {}` starts it again from step 0",
            rd.root.display()
        ),
    };
    match gpu.check() {
        Err(gpu_err) if !format!("{e:#}").contains(&gpu_err.to_string()) => {
            e.context(gpu_err.to_string()).context(hint)
        }
        _ => e.context(hint),
    }
}

/// What the steps and the end of a run share.
struct VaeRun<'a> {
    model: &'a VaeConfig,
    opts: &'a VaeRunOptions,
    rd: &'a RunDir,
    held_out: &'a HeldOut,
}

impl VaeRun<'_> {
    /// The steps from the trainer's step to the run's last (or a stop): a metrics row each, the
    /// held-out grids and their PSNR, the checkpoints. Returns whether `stop` ended it early
    /// (a checkpoint of that step then written).
    fn train_steps(
        &self,
        trainer: &mut VaeTrainer,
        data: &Dataset,
        losses: &mut Vec<(u64, f32)>,
        stop: &AtomicBool,
        progress: &mut ConsoleProgress,
    ) -> Result<bool> {
        let opts = self.opts;
        let (b, size, per) = (opts.train.batch_size, self.model.sample_size, 28 * 28);
        let mut metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.rd.metrics())
            .with_context(|| format!("opening {}", self.rd.metrics().display()))?;
        progress.start(trainer.step, opts.steps);
        let per_epoch = (data.len / b) as u64;
        let mut order = (u64::MAX, Vec::new());
        let mut checkpointed = trainer.step;
        while trainer.step < opts.steps {
            if stop.load(Ordering::Relaxed) {
                if checkpointed != trainer.step {
                    self.save_checkpoint(trainer, progress)?;
                }
                return Ok(true);
            }
            let (epoch, k) = (
                trainer.step / per_epoch,
                (trainer.step % per_epoch) as usize,
            );
            if order.0 != epoch {
                order = (epoch, epoch_order(data.len, opts.train.seed, epoch));
            }
            let mut batch = Vec::with_capacity(b * per);
            for &i in &order.1[k * b..(k + 1) * b] {
                batch.extend_from_slice(&data.images[i as usize * per..(i as usize + 1) * per]);
            }
            let (loss, rec, kl) = trainer.train_step(&mnist_canvas(&batch, b, size)?)?;
            let step = trainer.step;
            let mut row = serde_json::json!({"step": step, "loss": loss, "rec_loss": rec,
                "rec_loss_kind": opts.train.rec_loss.to_string(), "kl": kl});
            let mut message = format!("loss {loss:.2}");
            // Half precision: the GradScaler's scale and skipped steps (a skipped step's
            // non-finite loss is logged as null and left out of the loss curve).
            if let Some(state) = trainer.scaler_state() {
                row["loss_scale"] = serde_json::json!(state.scale);
                row["skipped_steps"] = serde_json::json!(state.skipped_total);
                message += &format!(", scale {}", state.scale);
                if state.skipped_total > 0 {
                    message += &format!(" ({} skipped)", state.skipped_total);
                }
                if state.skipped_in_row > 0 {
                    progress.println(&format!(
                        "step {step}: inf/NaN gradients, optimizer step skipped; loss scale now {}",
                        state.scale
                    ));
                }
            }
            if opts.is_sample_step(step) {
                let path = self.rd.samples().join(format!("step-{step:08}.png"));
                let psnr = self.held_out.write_reconstructions(trainer, &path)?;
                row["test_psnr"] = serde_json::json!(psnr);
                message += &format!(", test PSNR {psnr:.2} dB");
            }
            writeln!(metrics, "{row}")
                .with_context(|| format!("writing {}", self.rd.metrics().display()))?;
            if loss.is_finite() {
                losses.push((step, loss));
            }
            progress.set_message(message);
            progress.set(step, true);
            if opts.checkpoint_every > 0
                && step.is_multiple_of(opts.checkpoint_every)
                && step < opts.steps
            {
                self.save_checkpoint(trainer, progress)?;
                checkpointed = step;
            }
        }
        Ok(false)
    }

    /// Writes `checkpoints/step-XXXXXXXX.safetensors` atomically (parameters, Adam's moments,
    /// the step, the VAE's config and the run's options) and deletes the oldest past
    /// `keep_checkpoints`.
    fn save_checkpoint(&self, trainer: &VaeTrainer, progress: &ConsoleProgress) -> Result<()> {
        let mut meta = HashMap::new();
        meta.insert("vae_config".to_string(), self.model.to_json());
        meta.insert("run_options".to_string(), toml::to_string(self.opts)?);
        let bytes = trainer.checkpoint_bytes(meta)?;
        let path = self
            .rd
            .checkpoints()
            .join(format!("step-{:08}.safetensors", trainer.step));
        atomic_write(&path, &bytes)?;
        let all = self.rd.list_checkpoints();
        let keep = self.opts.keep_checkpoints;
        if all.len() > keep {
            for old in &all[..all.len() - keep] {
                let _ = std::fs::remove_file(old);
            }
        }
        progress.println(&format!("checkpoint {}", path.display()));
        Ok(())
    }

    /// The end of a run: the final checkpoint, `scaling_factor`, the export `vae/`,
    /// `reconstructions.png`, `loss.png`, then `finished.json`. Returns (scaling_factor, PSNR of
    /// the reconstructions).
    fn write_end(
        &self,
        trainer: &VaeTrainer,
        data: &Dataset,
        losses: &[(u64, f32)],
        progress: &ConsoleProgress,
    ) -> Result<(f64, f64)> {
        self.save_checkpoint(trainer, progress)?;
        let scaling_factor = scale_by_std(trainer, &data.images, data.len)?;
        let mut exported = self.model.clone();
        exported.scaling_factor = scaling_factor;
        exported.scaling_factor_defaulted = false;
        export_vae(trainer, &exported, &self.rd.root.join("vae"))?;
        let psnr = self
            .held_out
            .write_reconstructions(trainer, &self.rd.root.join("reconstructions.png"))?;
        super::plot::loss_plot(losses, &self.rd.root.join("loss.png"))?;
        let marker = serde_json::json!({ "step": trainer.step }).to_string();
        atomic_write(&self.rd.finished_marker(), marker.as_bytes())?;
        Ok((scaling_factor, psnr))
    }
}

/// The first test digits (as many as a batch holds), on the VAE's canvas, and the plan that
/// reconstructs them with the posterior's mode: the same digits at every grid, so the grids and
/// their PSNR show the VAE's progress.
pub struct HeldOut {
    /// [B, S, S, 1]: the digits, then the background where the test set has fewer than B.
    digits: Vec<f32>,
    n: usize,
    plan: Plan,
}

impl HeldOut {
    pub fn new(trainer: &VaeTrainer) -> Result<HeldOut> {
        let vae = &trainer.vae;
        let (b, size) = (vae.batch, vae.config.sample_size);
        let (n_test, test) = crate::data::mnist::test_images().map_err(|e| anyhow!(e))?;
        let n = b.min(n_test);
        let mut digits = mnist_canvas(&test[..n * 784], n, size)?;
        digits.resize(b * size * size, -1.0);
        let mut rec = trainer.gpu.recorder();
        vae.forward(&mut rec)?;
        Ok(HeldOut {
            digits,
            n,
            plan: rec.finish(),
        })
    }

    /// Reconstructs the digits (ε = 0: the posterior's mode), writes them under their originals
    /// to `path` (a PNG), and returns their mean PSNR on the 28×28 crop. Touches only the VAE's
    /// activations and ε, never what a training step reads from before it writes.
    pub fn write_reconstructions(&self, trainer: &VaeTrainer, path: &Path) -> Result<f64> {
        let vae = &trainer.vae;
        let (g, size, n) = (&trainer.gpu, vae.config.sample_size, self.n);
        g.write(&vae.sample.value, &self.digits)?;
        g.write(&vae.eps, &vec![0.0; vae.eps.numel()])?;
        g.run(&[&self.plan])?;
        let recon = g.read(&vae.output.value)?;
        let psnr = crop_psnr(&self.digits, &recon, n, size, 28);
        let per = size * size;
        let mut grid = self.digits[..n * per].to_vec();
        grid.extend_from_slice(&recon[..n * per]);
        save_grid(&grid, [2 * n, size, size, 1], n, path)?;
        Ok(psnr)
    }
}

/// 1 / std of z = μ + σ·ε over (at least) the first 1024 training digits (Rombach et al. 2022,
/// appendix G, `scale_by_std`), ε from the run's RNG.
pub fn scale_by_std(trainer: &VaeTrainer, images: &[f32], len: usize) -> Result<f64> {
    let vae = &trainer.vae;
    let (g, b) = (&trainer.gpu, vae.batch);
    let n = 1024usize.min(len).div_ceil(b) * b;
    let rng = g.tensor(&[4], "scale_by_std rng");
    let mut rec = g.recorder();
    random_normal(&mut rec, &rng, purpose::VAE_EPS, 0, &vae.eps)?;
    vae.encode(&mut rec)?;
    vae.sample_latent(&mut rec)?;
    let plan = rec.finish();
    let (mut sum, mut sum_sq, mut count) = (0.0f64, 0.0f64, 0usize);
    for (k, first) in (0..n).step_by(b).enumerate() {
        let digits = &images[first * 784..(first + b) * 784];
        g.write(
            &vae.sample.value,
            &mnist_canvas(digits, b, vae.config.sample_size)?,
        )?;
        // ε from a stream of its own (the seed changed), never one a training step drew.
        write_rng_state(g, &rng, trainer.cfg.seed ^ 0x5CA1E, k as u32)?;
        g.run(&[&plan])?;
        for v in g.read(&vae.latent.value)? {
            let v = v as f64;
            sum += v;
            sum_sq += v * v;
            count += 1;
        }
    }
    let mean = sum / count as f64;
    let std = (sum_sq / count as f64 - mean * mean).max(0.0).sqrt();
    if !(std.is_finite() && std > 0.0) {
        bail!("the latents' standard deviation is {std}: no scaling_factor can be computed");
    }
    Ok(1.0 / std)
}

/// Writes the diffusers directory (config.json + weights) under a temporary name, then renames
/// it into place (replacing the export of an earlier, interrupted end of the same run).
pub fn export_vae(trainer: &VaeTrainer, config: &VaeConfig, dir: &Path) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let tmp = parent.join(".vae.tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    let weights = trainer.gpu.read(trainer.vae.params.params())?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let bytes = serialize_named(&trainer.vae.params, &[("", &weights)], meta)?;
    atomic_write(&tmp.join(MODEL_WEIGHTS), &bytes)?;
    atomic_write(&tmp.join("config.json"), config.to_json().as_bytes())?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    Ok(())
}
