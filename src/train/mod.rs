//! The training loop: AdamW with warmup + constant/cosine LR, global-norm clipping on the GPU,
//! EMA (diffusers EMAModel), gradient accumulation, one queue submit per step, losses read back
//! asynchronously, a background data thread, seeded DDIM sample grids, atomic checkpoints and
//! resume. The step itself lives in [`trainer`], the run folder in [`run_dir`].

mod all_reduce;
pub mod config;
pub mod loss_scaling;
pub mod plot;
pub mod run_dir;
pub mod text;
pub mod trainer;
pub mod vae_run;
pub mod vae_trainer;

pub use config::{LrSchedule, TrainConfig};
pub use run_dir::RunDir;
pub use trainer::Trainer;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};

use crate::data::{Dataset, Loader};
use crate::diffusion::Objective;
use crate::diffusion::scheduler::{SamplerKind, SamplingSchedule, SchedulerConfig};
use crate::dist::World;
use crate::gpu::Gpu;
use crate::io::atomic::atomic_write;
use crate::io::model_dir::{CLASS_NAMES, MODEL_WEIGHTS, save_model_dir};
use crate::io::tensors::{LoadedTensors, read_metadata};
use crate::nn::UNetConfig;
use crate::sample::{LatentVae, ModelSource, Noise, Sampler, SamplerOptions};
use run_dir::{default_run_dir, truncate_metrics};
use text::TextTraining;

/// Micro-batches per step that dropout's random streams can address (`nn::unet`: 2^24 values
/// per micro-batch in a 2^32 stream).
const MAX_DROPOUT_MICRO_BATCHES: usize = 256;

/// Images in a training sample grid.
pub const GRID_IMAGES: usize = 16;

/// Sets the class embedding of a class-conditional run from the data's classes (+ a null class
/// for label dropout), or checks that a model loaded from elsewhere already fits them. Returns
/// the class names.
fn configure_classes(
    cfg: &TrainConfig,
    data: &Dataset,
    model: &mut UNetConfig,
) -> Result<Vec<String>> {
    if !cfg.class_conditional {
        if model.num_class_embeds.is_some() {
            bail!(
                "the model is class-conditional (num_class_embeds {}): train it with --class-conditional",
                model.num_class_embeds.unwrap_or(0)
            );
        }
        return Ok(Vec::new());
    }
    if data.labels.is_none() || data.class_names.is_empty() {
        bail!(
            "--class-conditional needs labelled data: the embedded MNIST, or --data with one sub-folder per class ({} has images outside any sub-folder)",
            data.description
        );
    }
    let k = data.class_names.len();
    let (want, null) = if cfg.cond_drop > 0.0 {
        (k + 1, Some(k))
    } else {
        (k, None)
    };
    match model.num_class_embeds {
        None => {
            model.num_class_embeds = Some(want);
            model.null_class = null;
        }
        Some(have) if have == want && model.null_class == null => {}
        Some(have) => bail!(
            "the model has num_class_embeds {have} (null class {:?}), the data {k} classes{}: they do not fit",
            model.null_class,
            if null.is_some() {
                " + a null class for --cond-drop"
            } else {
                ""
            }
        ),
    }
    model.validate().map_err(|e| anyhow!(e))?;
    Ok(data.class_names.clone())
}

/// The VE-SDE needs a fourier U-Net (it takes σ and divides its output by it): a preset becomes
/// one; a given config must already be one, and the other objectives refuse it.
fn configure_objective(cfg: &TrainConfig, model: &mut UNetConfig) -> Result<()> {
    let from_preset = cfg.model_config.is_none() && cfg.init.is_none();
    match (cfg.objective, model.is_fourier()) {
        (Objective::VeSde, false) if from_preset => {
            model.time_embedding_type = "fourier".into();
            model.validate().map_err(|e| anyhow!(e))
        }
        (Objective::VeSde, false) => bail!(
            "objective ve-sde needs a U-Net with time_embedding_type \"fourier\" (it takes σ and returns the score); this config has \"{}\"",
            model.time_embedding_type
        ),
        (Objective::Ddpm | Objective::Edm, true) => bail!(
            "a fourier U-Net (time_embedding_type \"fourier\") divides its output by its timestep: train it with --objective ve-sde, not {}",
            cfg.objective_name()
        ),
        _ => Ok(()),
    }
}

/// A super-resolution run doubles the U-Net's input channels (noisy image + upsampled LR) and
/// records the factor; a model from elsewhere must already fit.
fn configure_task(cfg: &TrainConfig, model: &mut UNetConfig) -> Result<()> {
    configure_objective(cfg, model)?;
    match (cfg.task, model.sr_scale) {
        (config::Task::Generate, None) => Ok(()),
        (config::Task::Generate, Some(k)) => {
            bail!("the model is a x{k} super-resolution model: train it with --task sr --scale {k}")
        }
        (config::Task::Sr, Some(k)) if k == cfg.scale => Ok(()),
        (config::Task::Sr, Some(k)) => {
            bail!("the model super-resolves by {k}, not --scale {}", cfg.scale)
        }
        (config::Task::Sr, None) => {
            if model.in_channels != model.out_channels {
                bail!(
                    "--task sr builds its input from a model with in_channels = out_channels (the preset's); this config has {} and {}",
                    model.in_channels,
                    model.out_channels
                );
            }
            model.in_channels = 2 * model.out_channels;
            model.sr_scale = Some(cfg.scale);
            model.validate().map_err(|e| anyhow!(e))
        }
    }
}

/// Whether a sample grid is drawn after optimizer step `step`: early at 100, 250 and 500 (so a
/// default run shows digits within minutes), then every `sample_every` steps, and at the end;
/// never with `sample_every` = 0.
pub fn is_grid_step(step: u64, sample_every: u64, total: u64) -> bool {
    if sample_every == 0 {
        return false;
    }
    let early = [100, 250, 500].contains(&step) && step < sample_every;
    early || step.is_multiple_of(sample_every) || step == total
}

/// Resolves the model config of a run.
pub fn resolve_model_config(cfg: &TrainConfig) -> Result<UNetConfig> {
    if let Some(init) = &cfg.init {
        return Ok(ModelSource::from_dir(init)?.config);
    }
    if let Some(path) = &cfg.model_config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --model-config {}", path.display()))?;
        return UNetConfig::from_json(&text).map_err(|e| anyhow!("{}: {e}", path.display()));
    }
    UNetConfig::preset(&cfg.model).ok_or_else(|| {
        anyhow!(
            "unknown model preset `{}` (choose {}); a model directory goes to --init DIR, a run folder to --resume DIR",
            cfg.model,
            UNetConfig::PRESETS.join(", ")
        )
    })
}

/// Images whose pairwise distances give a VE-SDE run's σ_max (all pairs: ~2 s for MNIST).
const SIGMA_MAX_IMAGES: usize = 2048;

/// A VE-SDE run without `ve_sigma_max` gets the largest pairwise distance of its training
/// images in [0, 1] (Song & Ermon 2020, technique 1), over the first [`SIGMA_MAX_IMAGES`];
/// config.toml records it, so a resumed run keeps it.
fn measure_ve_sigma_max(cfg: &mut TrainConfig, data: &Dataset, progress: &mut dyn Progress) {
    if cfg.objective != Objective::VeSde || cfg.ve_sigma_max > 0.0 {
        return;
    }
    let d = crate::diffusion::ve::max_pairwise_distance(
        &data.images,
        data.image_len(),
        SIGMA_MAX_IMAGES,
    );
    // Never below σ_min (a data set of one image), rounded up to 0.01.
    cfg.ve_sigma_max = ((d * 100.0).ceil() / 100.0).max(2.0 * cfg.ve_sigma_min);
    progress.message(&format!(
        "VE-SDE σ_max = {} (the largest pairwise distance among the first {} training images in [0, 1])",
        cfg.ve_sigma_max,
        data.len.min(SIGMA_MAX_IMAGES)
    ));
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
    /// GradScaler runs: the loss scale and the steps skipped so far, as of the last readback.
    fn loss_scale(&mut self, _scale: f32, _skipped: u32) {}
    fn message(&mut self, text: &str);
    fn finish(&mut self);
}

/// A run folder to resume, read without its tensors: its options (`config.toml`) and its last
/// checkpoint's header.
pub struct ResumePoint {
    pub config: TrainConfig,
    /// The last checkpoint (none when the run was killed before its first).
    pub checkpoint: Option<PathBuf>,
    /// The step that checkpoint holds (0 without one).
    pub step: u64,
    /// The GEMM path the run started with (the checkpoint's `gemm_path`).
    pub gemm_path: Option<String>,
    /// The precision the run started with (the checkpoint's `precision`; f32 before it was
    /// recorded).
    pub precision: Option<String>,
}

impl ResumePoint {
    pub fn read(dir: &Path) -> Result<ResumePoint> {
        let path = dir.join("config.toml");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow!(
                    "--resume {}: no run there (no config.toml; a run killed before it wrote one left nothing to resume): start it with `train --out {}`",
                    dir.display(),
                    dir.display()
                )
            } else {
                anyhow!("--resume {}: {e}", path.display())
            }
        })?;
        let config: TrainConfig =
            toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let (checkpoint, step, meta) = last_checkpoint(dir)?;
        Ok(ResumePoint {
            config,
            checkpoint,
            step,
            gemm_path: meta.get("gemm_path").cloned(),
            precision: meta.get("precision").cloned(),
        })
    }
}

/// The last checkpoint of the run in `dir`, the step it holds and its header's metadata
/// (None, 0, nothing without one).
fn last_checkpoint(
    dir: &Path,
) -> Result<(
    Option<PathBuf>,
    u64,
    std::collections::HashMap<String, String>,
)> {
    let rd = RunDir {
        root: dir.to_path_buf(),
    };
    let Some(last) = rd.list_checkpoints().pop() else {
        return Ok((None, 0, Default::default()));
    };
    let meta = read_metadata(&last)?;
    let step = meta
        .get("step")
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| anyhow!("{}: no step in its metadata", last.display()))?;
    Ok((Some(last), step, meta))
}

/// The run folder of a new run (refused when it holds a run) or of a resumed one, with its last
/// checkpoint read. Only rank 0 (`writer`) checks a new run's folder: it alone writes there.
fn open_run(
    cfg: &TrainConfig,
    resume: Option<&Path>,
    writer: bool,
) -> Result<(RunDir, Option<LoadedTensors>)> {
    let Some(dir) = resume else {
        let root = cfg.out.clone().unwrap_or_else(default_run_dir);
        let rd = RunDir { root: root.clone() };
        if !writer {
            return Ok((rd, None));
        }
        // A folder left by a run that failed or was killed before its first checkpoint and
        // first logged loss holds nothing to resume: it is free.
        let has_metrics = std::fs::metadata(rd.metrics()).is_ok_and(|m| m.len() > 0);
        if !rd.list_checkpoints().is_empty() || has_metrics {
            bail!(
                "{} already holds a run; use `train --resume {}` or another --out",
                root.display(),
                root.display()
            );
        }
        return Ok((rd, None));
    };
    let (last, step, _) = last_checkpoint(dir)?;
    let finished = (RunDir {
        root: dir.to_path_buf(),
    })
    .finished_at(step);
    // A run at its last step whose end was interrupted (export, grid, plot) writes its end again.
    if step > cfg.steps || step == cfg.steps && finished {
        bail!(
            "the run in {} is finished (step {step} of {}): give more steps to train further",
            dir.display(),
            cfg.steps
        );
    }
    // A run killed before its first checkpoint starts again from step 0 (with the options of
    // its config.toml, which the caller merged).
    let checkpoint = match &last {
        Some(last) => Some(LoadedTensors::read(last)?),
        None => None,
    };
    let rd = RunDir {
        root: dir.to_path_buf(),
    };
    Ok((rd, checkpoint))
}

/// The VAE of a latent diffusion run (`--vae`): for a new run the given directory, copied
/// into the run folder's `vae/` by [`write_run_files`]; a resumed run uses that copy, so it goes
/// on with the VAE it started with even if the original moved.
fn latent_vae(
    cfg: &TrainConfig,
    run_dir: &RunDir,
    resumed: bool,
    progress: &mut dyn Progress,
) -> Result<Option<LatentVae>> {
    let Some(given) = &cfg.vae else {
        return Ok(None);
    };
    let copy = run_dir.root.join("vae");
    let dir = if resumed && copy.join("config.json").is_file() {
        copy
    } else {
        given.clone()
    };
    let vae = LatentVae::from_dir(&dir).context("--vae")?;
    for n in &vae.notes {
        progress.message(&format!("note: {n}"));
    }
    progress.message(&format!(
        "latent diffusion: VAE {} ({}×{}×{} images → {:?} latents, scaling_factor {})",
        dir.display(),
        vae.config.in_channels,
        vae.config.sample_size,
        vae.config.sample_size,
        vae.latent_shape(),
        vae.config.scaling_factor
    ));
    Ok(Some(vae))
}

/// Checks a new run's U-Net against its objective and task, and a latent diffusion run's VAE
/// against the U-Net, so that a misfit is refused before the GPU starts. (Class labels, which
/// need the data, are checked once it is loaded.)
pub fn check_new_run(cfg: &TrainConfig) -> Result<()> {
    let mut model = resolve_model_config(cfg)?;
    configure_task(cfg, &mut model)?;
    let Some(dir) = &cfg.vae else {
        return Ok(());
    };
    let vae = LatentVae::from_dir(dir).context("--vae")?;
    vae.check_fits(&model)
}

/// (size, channels) of the training images: the U-Net's, or a latent model's VAE's.
fn data_dims(model: &UNetConfig, vae: Option<&LatentVae>) -> (usize, usize) {
    match vae {
        Some(v) => (v.config.sample_size, v.config.in_channels),
        None => (model.sample_size, model.out_channels),
    }
}

/// The data set of a run, decoded once (a warning names skipped images). MNIST for a VAE
/// larger than its digits is padded with the background value, as `train-vae` trained it.
fn load_data(
    cfg: &TrainConfig,
    (size, channels): (usize, usize),
    progress: &mut dyn Progress,
) -> Result<Arc<Dataset>> {
    let data = match &cfg.data {
        None if cfg.vae.is_some() && channels == 1 && size > 28 && (size - 28) % 2 == 0 => {
            let mut d = crate::data::mnist::load(28, 1)?;
            d.images = vae_trainer::pad_digits(&d.images, d.len, 28, (size - 28) / 2);
            d.size = size;
            d.description = format!("{} (padded to {size}×{size})", d.description);
            d
        }
        None => crate::data::mnist::load(size, channels)?,
        Some(dir) => {
            let (d, skipped) =
                crate::data::folder::load(dir, size, channels, cfg.hflip, cfg.strict)?;
            if !skipped.is_empty() {
                progress.message(&format!(
                    "warning: skipped {} unreadable image(s), e.g. {}",
                    skipped.len(),
                    skipped[0]
                ));
            }
            d
        }
    };
    // Text-conditional runs on a captioned folder: each image's label is its caption's index.
    let mut data = data;
    if cfg.text_conditional && data.captions.is_some() {
        data.labels = Some((0..data.len as u32).collect());
    }
    progress.message(&format!("data: {}", data.description));
    Ok(Arc::new(data))
}

/// The trainer with its starting weights: the checkpoint's, `init`'s, or fresh ones.
fn start_trainer(
    gpu: &Arc<Gpu>,
    cfg: &TrainConfig,
    (model, vae, text): (&UNetConfig, Option<&LatentVae>, Option<TextTraining>),
    checkpoint: Option<&LoadedTensors>,
    (class_names, world): (Vec<String>, Rc<World>),
    progress: &mut dyn Progress,
) -> Result<Trainer> {
    let mut trainer = gpu.checked_build(|| {
        Trainer::build(gpu.clone(), cfg.clone(), (model, text), vae, world.clone())
    })?;
    trainer.class_names = class_names;
    match checkpoint {
        Some(ck) => {
            trainer.restore(ck)?;
            progress.message(&format!(
                "resumed from {} at step {}",
                ck.path.display(),
                trainer.step
            ));
            let ranks = trainer.world.size();
            let was: usize = ck
                .metadata()
                .get("ranks")
                .and_then(|r| r.parse().ok())
                .unwrap_or(1);
            if was != ranks {
                progress.message(&format!(
                    "note: the run was trained on {was} rank(s) and continues on {ranks}: each step now takes {ranks}·{} micro-batches (the effective batch changes; the steps after this one differ from a run that kept {was})",
                    cfg.grad_accum
                ));
            }
        }
        None => trainer.set_weights(&initial_weights(&trainer, cfg, progress)?)?,
    }
    // Data parallel: every rank starts from rank 0's state.
    trainer.broadcast_state()?;
    Ok(trainer)
}

/// A new run's starting weights: `init`'s U-Net or fresh ones; a text-conditional run's text
/// encoder the given one or transformers' CLIP initialisation.
fn initial_weights(
    trainer: &Trainer,
    cfg: &TrainConfig,
    progress: &mut dyn Progress,
) -> Result<Vec<f32>> {
    let store = &trainer.unet.params;
    let unet_range = match &trainer.text {
        Some(t) => t.joint.unet_range(&trainer.unet),
        None => 0..store.len,
    };
    let unet_part = store.part(unet_range.clone(), "");
    let mut flat = match &cfg.init {
        Some(dir) => {
            let w = ModelSource::from_dir(dir)?.weights(&unet_part)?;
            progress.message(&format!("initialised from {}", dir.display()));
            w
        }
        None => crate::nn::init::default_init(&unet_part, cfg.seed),
    };
    if let Some(t) = &trainer.text {
        flat.extend(t.setup.initial_weights(&t.part(&trainer.unet), cfg.seed)?);
    }
    Ok(flat)
}

/// The sampler of the run's sample grids (none with `sample_every` = 0); a text-conditional
/// model's attends to `context_tokens` rows.
fn grid_sampler(
    gpu: &Arc<Gpu>,
    cfg: &TrainConfig,
    (model, context_tokens): (&UNetConfig, Option<usize>),
    vae: Option<&LatentVae>,
) -> Result<Option<Sampler>> {
    if cfg.sample_every == 0 {
        return Ok(None);
    }
    let json = cfg.scheduler_config_json().map_err(|e| anyhow!(e))?;
    let scheduler = SchedulerConfig::from_json(&json).map_err(|e| anyhow!(e))?;
    // Each objective's default sampler: DDIM, EDM Euler, VE-SDE predictor–corrector.
    let kind = match cfg.objective {
        Objective::Ddpm => SamplerKind::Ddim,
        Objective::Edm => SamplerKind::Euler,
        Objective::VeSde => SamplerKind::Pc,
    };
    let schedule = SamplingSchedule::new(&scheduler, kind, cfg.sample_steps, None, 0.0)
        .map_err(|e| anyhow!("sample grids: {e}"))?;
    Ok(Some(gpu.checked_build(|| {
        Sampler::new(
            gpu,
            model,
            schedule,
            GRID_IMAGES,
            &SamplerOptions {
                vae: vae.cloned(),
                context_tokens,
                ..Default::default()
            },
        )
    })?))
}

/// Creates the run folder and writes its options (and class names, and a latent model's VAE:
/// a copy in `vae/`, which resuming, sampling a checkpoint and every export use).
fn write_run_files(
    run_dir: &RunDir,
    cfg: &TrainConfig,
    trainer: &Trainer,
    vae: Option<&LatentVae>,
) -> Result<()> {
    std::fs::create_dir_all(run_dir.checkpoints())
        .with_context(|| format!("creating {}", run_dir.root.display()))?;
    std::fs::create_dir_all(run_dir.samples())?;
    run_dir.remove_partial_files();
    let copy = run_dir.root.join("vae");
    if let Some(v) = vae.filter(|v| v.dir != copy) {
        // The run folder's copy has the layout of an export's: `vae/…`.
        for (name, bytes) in vae_files(&v.dir)? {
            atomic_write(&run_dir.root.join(name), &bytes)?;
        }
    }
    atomic_write(&run_dir.config(), toml::to_string(cfg)?.as_bytes())?;
    if let Some(text) = &trainer.text {
        for (name, bytes) in text.setup.run_files() {
            let path = run_dir.root.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            atomic_write(&path, &bytes)?;
        }
    }
    if !trainer.class_names.is_empty() {
        atomic_write(
            &run_dir.root.join(CLASS_NAMES),
            serde_json::to_string_pretty(&trainer.class_names)?.as_bytes(),
        )?;
    }
    Ok(())
}

/// Super-resolution grids upsample the first images of the data set (the same every time).
fn grid_lowres(model: &UNetConfig, data: &Dataset) -> Option<Vec<f32>> {
    model.sr_scale.map(|k| {
        let (s, c) = (model.sample_size, model.out_channels);
        (0..GRID_IMAGES)
            .flat_map(|i| {
                let hr: Vec<f64> = data.image(i % data.len).iter().map(|&v| v as f64).collect();
                crate::data::resize::avg_pool(&hr, [1, s / k, s / k, c], k)
            })
            .map(|v| v as f32)
            .collect()
    })
}

/// Whatever stopped the run (a lost device, a full disk, a non-finite loss), the last
/// checkpoint is intact: the error says where it is and how to go on.
fn with_resume_hint(e: anyhow::Error, gpu: &Gpu, run_dir: &RunDir) -> anyhow::Error {
    let resume_hint = match run_dir.list_checkpoints().pop() {
        Some(last) => format!(
            "the last complete checkpoint is {}; continue with `wgpu-diffusion train --resume {}`",
            last.display(),
            run_dir.root.display()
        ),
        None => format!(
            "no checkpoint was written yet; `wgpu-diffusion train --resume {}` starts it again from step 0",
            run_dir.root.display()
        ),
    };
    match gpu.check() {
        Err(gpu_err) if !format!("{e:#}").contains(&gpu_err.to_string()) => {
            e.context(gpu_err.to_string()).context(resume_hint)
        }
        _ => e.context(resume_hint),
    }
}

/// Runs (or resumes) training. `stop` is raised by Ctrl-C: the loop then writes a checkpoint and
/// returns cleanly. A resumed run that is already finished is an error (nothing is written).
pub fn run(
    gpu: Arc<Gpu>,
    cfg: TrainConfig,
    resume: Option<&Path>,
    stop: Arc<AtomicBool>,
    progress: &mut dyn Progress,
) -> Result<RunSummary> {
    run_ranks(gpu, cfg, resume, stop, progress, Rc::new(World::single()))
}

/// [`run`] as one rank of `world`: with several ranks each trains on its share of every step's
/// micro-batches and rank 0 alone writes the run folder (checkpoints, samples, metrics, export).
pub fn run_ranks(
    gpu: Arc<Gpu>,
    mut cfg: TrainConfig,
    resume: Option<&Path>,
    stop: Arc<AtomicBool>,
    progress: &mut dyn Progress,
    world: Rc<World>,
) -> Result<RunSummary> {
    let writer = world.is_root();
    if resume.is_none() && world.is_parallel() {
        // Every rank names rank 0's folder (the default one is stamped with each rank's clock).
        let out = cfg.out.clone().unwrap_or_else(default_run_dir);
        let bytes = world.broadcast_bytes(out.to_string_lossy().as_bytes().to_vec());
        cfg.out = Some(PathBuf::from(String::from_utf8_lossy(&bytes).into_owned()));
    }
    let (run_dir, checkpoint) = open_run(&cfg, resume, writer)?;
    let mut model = match &checkpoint {
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
    // The random streams are addressed by the step's micro-batches over every rank.
    let micro_batches = cfg.grad_accum * world.size();
    let job = TrainConfig {
        grad_accum: micro_batches,
        ..cfg.clone()
    };
    job.validate_rng_range(model.out_channels * model.sample_size * model.sample_size)
        .map_err(|e| match world.size() {
            1 => anyhow!("invalid training options: {e}"),
            n => anyhow!(
                "invalid training options for {n} ranks (grad_accum counts every rank's micro-batches): {e}"
            ),
        })?;
    if model.dropout > 0.0 && micro_batches > MAX_DROPOUT_MICRO_BATCHES {
        bail!(
            "{micro_batches} micro-batches per step (grad_accum {} x {} rank(s)): dropout's random streams hold at most {MAX_DROPOUT_MICRO_BATCHES}; lower --grad-accum",
            cfg.grad_accum,
            world.size()
        );
    }

    // Everything is checked before the run folder is created, so a bad input leaves nothing
    // behind: the data (decoded once), the classes, the task, the step's sizes against the
    // adapter's limits (the plan is built, nothing runs), the weights to start from.
    let vae = latent_vae(&cfg, &run_dir, resume.is_some(), progress)?;
    let data = load_data(&cfg, data_dims(&model, vae.as_ref()), progress)?;
    let class_names = configure_classes(&cfg, &data, &mut model)?;
    let text = TextTraining::prepare(&cfg, &data, &run_dir.root, resume.is_some(), &mut model)?;
    configure_task(&cfg, &mut model)?;
    if let Some(v) = &vae {
        v.check_fits(&model)?;
    }
    measure_ve_sigma_max(&mut cfg, &data, progress);
    cfg.out = Some(run_dir.root.clone());
    let mut trainer = start_trainer(
        &gpu,
        &cfg,
        (&model, vae.as_ref(), text),
        checkpoint.as_ref(),
        (class_names, world.clone()),
        progress,
    )?;
    let context_tokens = trainer.text.as_ref().map(|t| t.setup.context_tokens());
    let mut sampler = match writer {
        true => grid_sampler(&gpu, &cfg, (&model, context_tokens), vae.as_ref())?,
        false => None,
    };

    if writer {
        write_run_files(&run_dir, &cfg, &trainer, vae.as_ref())?;
    }
    let grid_lowres = grid_lowres(&model, &data);
    let ranks = match (world.size(), trainer.all_reduce_shape()) {
        (n, Some((buckets, segments))) => format!(
            " x {n} ranks (gradients all-reduced in {buckets} bucket(s) of at most {} MB, the backward pass submitted in {segments} segment(s))",
            cfg.bucket_mb
        ),
        _ => String::new(),
    };
    progress.message(&format!(
        "model: {} parameters, batch {} x {} accumulation{ranks}, {} dispatches per step",
        trainer.unet.params.count(),
        cfg.batch_size,
        cfg.grad_accum,
        trainer.step_dispatches()
    ));
    train_loop(
        &gpu,
        &cfg,
        &model,
        &mut trainer,
        sampler.as_mut(),
        grid_lowres.as_deref(),
        data,
        &run_dir,
        &stop,
        progress,
    )
    .map_err(|e| with_resume_hint(e, &gpu, &run_dir))
}

/// The steps of a run, from the trainer's step to `cfg.steps` (or a stop), with loss readback,
/// sample grids, checkpoints and the final export.
#[allow(clippy::too_many_arguments)]
fn train_loop(
    gpu: &Arc<Gpu>,
    cfg: &TrainConfig,
    model: &UNetConfig,
    trainer: &mut Trainer,
    mut sampler: Option<&mut Sampler>,
    grid_lowres: Option<&[f32]>,
    data: Arc<Dataset>,
    run_dir: &RunDir,
    stop: &AtomicBool,
    progress: &mut dyn Progress,
) -> Result<RunSummary> {
    let loader = Loader::start(
        data.clone(),
        cfg.batch_size,
        cfg.seed,
        trainer.data_position,
    );
    let writer = trainer.world.is_root();
    let (mut history, mut metrics) = open_metrics(trainer, run_dir)?;
    let mut losses = LossLog {
        pending: None,
        next_first: trainer.step + 1,
        window_start: (trainer.step, Instant::now()),
        run_start: Instant::now(),
        first_step: trainer.step,
    };
    let mut inflight: std::collections::VecDeque<wgpu::SubmissionIndex> = Default::default();
    let mut interrupted = false;
    progress.start(trainer.step, cfg.steps);

    while trainer.step < cfg.steps {
        if stop_now(trainer, stop) {
            interrupted = true;
            break;
        }
        let (batches, labels) = next_batches(&loader, trainer, cfg.grad_accum);
        let idx = trainer.submit_step(&batches, &labels)?;
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

        // Losses, read back asynchronously: a finished readback is recorded as soon as it is
        // seen; at each window's end the previous one is waited for, so no step is ever lost.
        // (Data-parallel ranks average their losses, a collective: only at the windows' ends,
        // which every rank reaches at the same step.)
        if !trainer.world.is_parallel()
            && losses
                .pending
                .as_ref()
                .is_some_and(|p| p.ready.load(Ordering::Acquire))
        {
            losses.finish(trainer, &mut history, &mut metrics, progress)?;
        }
        if step.is_multiple_of(cfg.log_every) {
            losses.finish(trainer, &mut history, &mut metrics, progress)?;
            losses.request(trainer, step);
        }
        progress.update(step, None, lr, 0.0);

        if let Some(sampler) = sampler.as_deref_mut()
            && is_grid_step(step, cfg.sample_every, cfg.steps)
            && step < cfg.steps
        {
            write_samples(trainer, sampler, grid_lowres, run_dir, step, progress)?;
        }
        if step.is_multiple_of(cfg.checkpoint_every) && step < cfg.steps {
            // Every loss up to the checkpoint is checked and logged first: a checkpoint never
            // follows a non-finite loss, and a run resumed from it has no gap in metrics.jsonl.
            losses.drain(trainer, &mut history, &mut metrics, progress)?;
            checkpoint_all_ranks(trainer, model, run_dir, progress)?;
        }
    }
    // Drain the last window and the steps after it (a run need not end on a window's end):
    // every loss is checked before the final checkpoint is written.
    losses.drain(trainer, &mut history, &mut metrics, progress)?;
    checkpoint_all_ranks(trainer, model, run_dir, progress)?;
    if let Some(sampler) = sampler
        && !interrupted
    {
        write_samples(
            trainer,
            sampler,
            grid_lowres,
            run_dir,
            trainer.step,
            progress,
        )?;
    }
    if writer {
        plot::loss_plot(&history, &run_dir.root.join("loss.png"))?;
    }
    if !interrupted && writer {
        let marker = serde_json::json!({ "step": trainer.step }).to_string();
        atomic_write(&run_dir.finished_marker(), marker.as_bytes())?;
    }
    progress.finish();
    Ok(RunSummary {
        run_dir: run_dir.root.clone(),
        steps: trainer.step,
        interrupted,
        losses: history,
    })
}

/// (step, loss) of every logged step.
type LossHistory = Vec<(u64, f32)>;

/// The run's loss history so far and metrics.jsonl opened for appending (rank 0; other ranks
/// write nothing). Rows past the checkpoint's step (written before a kill or a stop that lost
/// them) and a torn last row are dropped, so a resumed run never logs a step twice.
fn open_metrics(
    trainer: &Trainer,
    run_dir: &RunDir,
) -> Result<(LossHistory, Option<std::fs::File>)> {
    if !trainer.world.is_root() {
        return Ok((Vec::new(), None));
    }
    let history = truncate_metrics(&run_dir.metrics(), trainer.step).context("metrics.jsonl")?;
    let metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.metrics())
        .with_context(|| format!("opening {}", run_dir.metrics().display()))?;
    Ok((history, Some(metrics)))
}

/// The micro-batches of one optimizer step, and their labels for a class-conditional model.
/// Every rank draws all N·A micro-batches of the step from the same stream and keeps its own A
/// (r·A … r·A + A − 1), so the ranks together see what one process with N·A would.
fn next_batches(
    loader: &Loader,
    trainer: &mut Trainer,
    grad_accum: usize,
) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
    let first = trainer.world.rank() * grad_accum;
    let all = grad_accum * trainer.world.size();
    let (batches, labels): (Vec<Vec<f32>>, Vec<Vec<u32>>) = (0..all)
        .filter_map(|i| {
            let b = loader.next();
            trainer.data_position = b.position;
            (first..first + grad_accum)
                .contains(&i)
                .then_some((b.data, b.labels))
        })
        .unzip();
    if trainer.unet.class_labels.is_some() || trainer.text.is_some() {
        (batches, labels)
    } else {
        (batches, Vec::new())
    }
}

/// The asynchronous loss readback of a run: at most one window in flight.
struct LossLog {
    pending: Option<PendingLosses>,
    /// First step of the next window to request.
    next_first: u64,
    /// (last step, time) of the last window recorded, for images/s.
    window_start: (u64, Instant),
    run_start: Instant,
    /// The step the run (or this resumed part of it) started from.
    first_step: u64,
}

struct PendingLosses {
    ready: Arc<AtomicBool>,
    submission: wgpu::SubmissionIndex,
    first: u64,
    last: u64,
}

impl LossLog {
    /// Requests the losses of steps `next_first..=last` (no window may be pending).
    fn request(&mut self, trainer: &Trainer, last: u64) {
        debug_assert!(self.pending.is_none());
        let (ready, submission) = trainer.request_losses();
        self.pending = Some(PendingLosses {
            ready,
            submission,
            first: self.next_first,
            last,
        });
        self.next_first = last + 1;
    }

    /// Reads, checks and records every loss up to the trainer's step: the pending window, then
    /// the steps after it (a checkpoint or the run's end need not fall on a window's end).
    fn drain(
        &mut self,
        trainer: &mut Trainer,
        history: &mut Vec<(u64, f32)>,
        metrics: &mut Option<std::fs::File>,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        self.finish(trainer, history, metrics, progress)?;
        if self.next_first <= trainer.step {
            self.request(trainer, trainer.step);
            self.finish(trainer, history, metrics, progress)?;
        }
        Ok(())
    }

    /// Waits for the pending window (if any), checks every loss and records it.
    fn finish(
        &mut self,
        trainer: &mut Trainer,
        history: &mut Vec<(u64, f32)>,
        metrics: &mut Option<std::fs::File>,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        if !p.ready.load(Ordering::Acquire) {
            trainer
                .gpu
                .device
                .poll(wgpu::PollType::Wait {
                    submission_index: Some(p.submission),
                    timeout: None,
                })
                .map_err(|e| anyhow!("GPU error while reading the loss back: {e}"))?;
        }
        // The map callback runs in a later maintenance pass than the one that saw the copy
        // finish when the process is starved of CPU: wait for everything queued, a few times,
        // before calling the readback failed.
        for _ in 0..3 {
            if p.ready.load(Ordering::Acquire) {
                break;
            }
            trainer
                .gpu
                .device
                .poll(wgpu::PollType::Wait {
                    submission_index: None,
                    timeout: None,
                })
                .map_err(|e| anyhow!("GPU error while reading the loss back: {e}"))?;
        }
        if !p.ready.load(Ordering::Acquire) {
            bail!("the loss readback of steps {}..={} failed", p.first, p.last);
        }
        let slots = trainer.read_losses()?;
        let cfg = &trainer.cfg;
        let now = Instant::now();
        // The whole job's images: every rank's micro-batches.
        let per_step = cfg.batch_size * cfg.grad_accum * trainer.world.size();
        let images = (p.last - self.window_start.0) * per_step as u64;
        let ips = images as f64
            / now
                .duration_since(self.window_start.1)
                .as_secs_f64()
                .max(1e-9);
        self.window_start = (p.last, now);
        let mut last_loss = None;
        for s in p.first..=p.last {
            let logged = slots[((s - 1) % cfg.log_every) as usize];
            let loss = logged.loss;
            // With a GradScaler a step with inf/NaN gradients is skipped, not the run's end;
            // the run stops on its rules (loss_scaling::check_health).
            let skipped = match (logged.scaler, trainer.scaler.as_mut()) {
                (Some(state), Some(scaler)) => {
                    scaler.note(s, state)?;
                    progress.loss_scale(state.scale, state.skipped_total);
                    let skipped = state.skipped_in_row > 0;
                    if skipped {
                        progress.message(&format!(
                            "step {s}: inf/NaN gradients, optimizer step skipped ({} skipped so far); loss scale now {}",
                            state.skipped_total, state.scale
                        ));
                    }
                    Some((state, skipped))
                }
                _ => None,
            };
            if !loss.is_finite() && skipped.is_none_or(|(_, skipped)| !skipped) {
                bail!(
                    "the loss became non-finite ({loss}) at step {s}; training stopped. Lower --lr or set --max-grad-norm."
                );
            }
            if loss.is_finite() {
                history.push((s, loss));
            }
            if let Some(metrics) = metrics.as_mut() {
                let mut row = serde_json::json!({"step": s, "loss": loss, "lr": cfg.lr_at(s), "img_per_s": ips, "elapsed_s": self.run_start.elapsed().as_secs_f64()});
                if let Some((state, _)) = skipped {
                    row["loss_scale"] = state.scale.into();
                    row["skipped_steps"] = state.skipped_total.into();
                }
                if trainer.world.is_parallel() {
                    // Seconds per step in the gradient readback, all-reduce and upload.
                    let steps = (trainer.step - self.first_step).max(1) as f64;
                    row["ranks"] = trainer.world.size().into();
                    row["comm_s_per_step"] = (trainer.comm_seconds / steps).into();
                }
                writeln!(metrics, "{row}")?;
            }
            // After its row is written: the step that stops the run is in metrics.jsonl.
            if let Some((state, _)) = skipped {
                loss_scaling::check_health(s, &state, loss_scaling::UNET_ADVICE)?;
            }
            last_loss = loss.is_finite().then_some(loss).or(last_loss);
        }
        progress.update(p.last, last_loss, cfg.lr_at(p.last), ips);
        Ok(())
    }
}

/// Whether the loop stops before the next step (Ctrl-C or SIGTERM raised `stop`). Data-parallel
/// ranks may see the signal at different moments, so they agree before every step (8 bytes per
/// rank): all stop if any was asked to, and none waits alone in a collective.
fn stop_now(trainer: &Trainer, stop: &AtomicBool) -> bool {
    let asked = stop.load(Ordering::Relaxed);
    if !trainer.world.is_parallel() {
        return asked;
    }
    trainer.world.gather_u64(asked as u64).contains(&1)
}

/// A checkpoint of a run on any number of ranks: the ranks' parameters are compared first (a
/// divergence stops the run before it is saved), rank 0 writes, the others wait for it.
fn checkpoint_all_ranks(
    trainer: &Trainer,
    model: &UNetConfig,
    run_dir: &RunDir,
    progress: &mut dyn Progress,
) -> Result<()> {
    trainer.check_ranks_agree()?;
    if trainer.world.is_root() {
        save_checkpoint(trainer, model, run_dir, progress)?;
    }
    trainer.world.barrier();
    Ok(())
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
        trainer.unet.params.params()
    })?;
    let names = if trainer.class_names.is_empty() {
        None
    } else {
        Some(serde_json::to_string_pretty(&trainer.class_names)?)
    };
    let vae = match &trainer.latent {
        Some(_) => vae_files(&run_dir.root.join("vae"))?,
        None => Vec::new(),
    };
    // A text-conditional model: the U-Net's part of the joint store, and the text encoder and
    // tokenizer beside it (a pipeline directory).
    let (unet_store, text_files) = match &trainer.text {
        Some(t) => (
            trainer
                .unet
                .params
                .part(t.joint.unet_range(&trainer.unet), ""),
            t.export_files(&trainer.unet, &weights, &run_dir.root)?,
        ),
        None => (trainer.unet.params.clone(), Vec::new()),
    };
    let extra: Vec<(&str, &[u8])> = names
        .iter()
        .map(|n| (CLASS_NAMES, n.as_bytes()))
        .chain(vae.iter().map(|(name, b)| (*name, b.as_slice())))
        .chain(
            text_files
                .iter()
                .map(|(name, b)| (name.as_str(), b.as_slice())),
        )
        .collect();
    save_model_dir(
        &run_dir.model(),
        model,
        &unet_store,
        &weights[..unet_store.len],
        &trainer
            .cfg
            .scheduler_config_json()
            .map_err(|e| anyhow!(e))?,
        &extra,
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

/// A VAE directory's two files, under their names in an exported model (`vae/…`).
fn vae_files(dir: &Path) -> Result<Vec<(&'static str, Vec<u8>)>> {
    [
        ("vae/config.json", "config.json"),
        (VAE_WEIGHTS, MODEL_WEIGHTS),
    ]
    .into_iter()
    .map(|(name, file)| {
        let path = dir.join(file);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok((name, bytes))
    })
    .collect()
}

/// The VAE's weights in an exported latent model.
const VAE_WEIGHTS: &str = "vae/diffusion_pytorch_model.safetensors";

fn write_samples(
    trainer: &Trainer,
    sampler: &mut Sampler,
    lowres: Option<&[f32]>,
    run_dir: &RunDir,
    step: u64,
    progress: &mut dyn Progress,
) -> Result<()> {
    let t = Instant::now();
    let weights = if trainer.cfg.ema {
        &trainer.ema
    } else {
        trainer.unet.params.params()
    };
    // Text-conditional runs: image i is drawn from the grid's i-th prompt (no guidance).
    let _context = match &trainer.text {
        Some(text) => {
            let unet_len = text.joint.unet_range(&trainer.unet).len();
            sampler.copy_weights_from(&weights.view(0, &[unet_len], "U-Net weights"));
            let prompts = text.setup.grid_prompts(GRID_IMAGES);
            let encoder = text.encode_prompts(&trainer.gpu, &trainer.unet, weights, &prompts)?;
            sampler.set_context(&encoder.last_hidden_state, None)?;
            Some(encoder)
        }
        None => {
            sampler.copy_weights_from(weights);
            None
        }
    };
    // The same seeded noise at every grid, so grids show the model's progress, not new noise.
    if let Some(low) = lowres {
        sampler.set_lowres(low)?;
    }
    // Class-conditional runs: image i shows class i mod K (conditional, no guidance).
    let labels: Option<Vec<u32>> = trainer.unet.class_labels.as_ref().map(|_| {
        let k = trainer.class_names.len().max(1) as u32;
        (0..GRID_IMAGES as u32).map(|i| i % k).collect()
    });
    let images = sampler.sample_batch(
        0,
        &Noise::Seeded(trainer.cfg.seed),
        labels.as_deref(),
        &mut |_| {},
    )?;
    let path = run_dir.samples().join(format!("step-{step:08}.png"));
    crate::io::images::save_grid(&images, sampler.image_shape(), 4, &path)?;
    progress.message(&format!(
        "samples {} ({} {} steps, {:.1} s)",
        path.display(),
        sampler.schedule.settings.class_name(),
        sampler.schedule.num_inference_steps,
        t.elapsed().as_secs_f64()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_grid_step;

    #[test]
    fn grids_early_then_every_n_and_at_the_end() {
        let steps: Vec<u64> = (1..=3000)
            .filter(|&s| is_grid_step(s, 1000, 3000))
            .collect();
        assert_eq!(steps, vec![100, 250, 500, 1000, 2000, 3000]);
        let frequent: Vec<u64> = (1..=300).filter(|&s| is_grid_step(s, 100, 300)).collect();
        assert_eq!(frequent, vec![100, 200, 300]);
        assert!((1..=3000).all(|s| !is_grid_step(s, 0, 3000)));
        assert!(is_grid_step(37, 1000, 37));
    }
}
