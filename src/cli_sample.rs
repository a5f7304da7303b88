//! `wgpu-diffusion sample` and `eval-sr`: flags; [`plan`], which checks every input (flags,
//! files, output paths) without a GPU and returns what to do; the batch loop with a progress
//! bar; and the outputs (a grid, one PNG per image, optionally the raw tensor), written only
//! once every sample is finite.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use safetensors::{Dtype, tensor::TensorView};

use crate::diffusion::scheduler::{SamplerKind, SamplingSchedule, TimestepSpacing};
use crate::gpu::{FIT_ADVICE, Gpu, GpuOptions};
use crate::io::atomic::atomic_write;
use crate::io::images::{save_grid, save_image};
use crate::io::tensors::LoadedTensors;
use crate::progress::ConsoleProgress;
use crate::sample::{
    LatentVae, ModelSource, Noise, Sampler, SamplerOptions, TextConditioning, nchw_to_nhwc,
    nhwc_to_nchw,
};

#[derive(clap::Args, Clone, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["model", "checkpoint"])))]
pub struct SampleArgs {
    /// A diffusers model directory (config.json + diffusion_pytorch_model.safetensors [+
    /// scheduler_config.json]), a pipeline directory (unet/ + scheduler/), or a run folder.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// One of our training checkpoints (runs/…/checkpoints/step-*.safetensors).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// With --checkpoint: the raw weights instead of the EMA ones.
    #[arg(long)]
    pub no_ema: bool,
    /// The sampler: ddim by default, pndm when the scheduler config names PNDMScheduler, ddpm
    /// for a text-to-image pipeline naming DDPMScheduler (as StableDiffusionPipeline samples
    /// it); an EDM model's are euler (its default) and heun; a VE-SDE model's pc
    /// (predictor-corrector, its default) and ode (probability flow).
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerKind>,
    /// VE-SDE predictor-corrector: the corrector's signal-to-noise ratio r (overrides the
    /// scheduler config's `snr`, default 0.15).
    #[arg(long)]
    pub snr: Option<f64>,
    /// VE-SDE predictor-corrector: Langevin corrector steps before each predictor step
    /// (overrides the scheduler config's `correct_steps`, default 1).
    #[arg(long)]
    pub correct_steps: Option<usize>,
    /// Denoising steps (Heun evaluates the U-Net about twice per step); `--steps` is the same.
    #[arg(long = "sample-steps", visible_alias = "steps", default_value_t = 50)]
    pub steps: usize,
    /// DDIM's η, in [0, 1]: 0 is deterministic, 1 is DDPM-like.
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// Overrides the scheduler config's timestep_spacing.
    #[arg(long, value_enum)]
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Images to generate (default 16; with `--class all`, per class, default 8; with --noise,
    /// the noise's N).
    #[arg(long)]
    pub num: Option<usize>,
    /// Class-conditional models: a class index, a class name (class_names.json), or `all` (a
    /// grid with one row per class).
    #[arg(long)]
    pub class: Option<String>,
    /// Classifier-free guidance scale s: ε̂ = ε_uncond + s·(ε_cond − ε_uncond); 1 = conditional
    /// only, 0 = unconditional (needs a model trained with --cond-drop).
    #[arg(long)]
    pub guidance_scale: Option<f32>,
    /// Text-to-image models (a Stable Diffusion pipeline directory): what to draw. Guidance
    /// defaults to 7.5 for them, and applies when above 1, as in StableDiffusionPipeline.
    #[arg(long)]
    pub prompt: Option<String>,
    /// With guidance: the prompt whose direction is subtracted [default: the empty prompt].
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Images per U-Net batch (default: --num, at most 64); the images do not depend on it.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Seed of the GPU noise (image k's noise depends only on the seed and k).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder: grid.png and one PNG per image (00000.png, …). Those of an earlier run
    /// there are replaced; other files are left alone.
    #[arg(long, default_value = "samples")]
    pub out: PathBuf,
    /// Initial noise: a safetensors file with tensor `noise`, f32 [N, C, H, W] (before
    /// init_noise_sigma scaling); N images are generated.
    #[arg(long)]
    pub noise: Option<PathBuf>,
    /// Per-step noise for DDPM / DDIM with η > 0: tensor `step_noise`, f32 [steps, N, C, H, W]
    /// (VE-SDE pc: one per U-Net evaluation, as diffusers draws them, [evaluations, N, C, H, W]).
    #[arg(long)]
    pub step_noise: Option<PathBuf>,
    /// Also write the raw final samples: tensor `sample`, f32 [N, C, H, W], no clamping.
    #[arg(long)]
    pub save_tensor: Option<PathBuf>,
    /// Inpainting (RePaint, with --sampler ddpm or ddim): the image to complete, resized and
    /// centre-cropped like training data.
    #[arg(long, requires = "mask")]
    pub inpaint: Option<PathBuf>,
    /// The inpainting mask, the image's size: white = regenerate, black = keep.
    #[arg(long, requires = "inpaint")]
    pub mask: Option<PathBuf>,
    /// Masks in diffusers' RePaint convention (white = keep, black = regenerate).
    #[arg(long, requires = "inpaint")]
    pub mask_invert: bool,
    /// RePaint (with --inpaint): steps of each jump back up [default: 10, diffusers']
    #[arg(long, requires = "inpaint")]
    pub jump_length: Option<usize>,
    /// RePaint (with --inpaint): how often each jump point is resampled (1 = no resampling)
    /// [default: 10, diffusers']
    #[arg(long, requires = "inpaint")]
    pub jump_n_sample: Option<usize>,
    /// Latent diffusion: the AutoencoderKL directory that decodes the samples (default: the
    /// model's `vae/`, or for a checkpoint its run folder's).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Image height in pixels [default: the model's size]. Any multiple of 2^(U-Net levels − 1)
    /// (for a latent model: of the VAE's downscale times that, 64 for SD 1.x); not for
    /// super-resolution or inpainting, whose input fixes the size.
    #[arg(long)]
    pub height: Option<usize>,
    /// Image width in pixels [default: the model's size]; as --height.
    #[arg(long)]
    pub width: Option<usize>,
    /// `sr` for a super-resolution model (inferred from the model; given, it is checked).
    #[arg(long, value_enum)]
    pub task: Option<crate::train::config::Task>,
    /// Super-resolution: a low-resolution image, or a folder of them (sorted by name); each must
    /// be sample_size / scale pixels square. One output per input.
    #[arg(long)]
    pub lowres: Option<PathBuf>,
    /// Instead of sampling: time each kernel of one U-Net evaluation (and of a latent model's
    /// decode) in its own submit and print where the time goes, costliest first.
    #[arg(long)]
    pub profile: bool,
}

/// The low-resolution inputs of a super-resolution model, NHWC in [-1, 1], with their paths.
fn read_lowres(
    path: &Path,
    size: usize,
    scale: usize,
    channels: usize,
) -> Result<(Vec<PathBuf>, Vec<f32>)> {
    let mut files = Vec::new();
    if path.is_dir() {
        for e in std::fs::read_dir(path).with_context(|| format!("--lowres {}", path.display()))? {
            let p = e?.path();
            let ext = p
                .extension()
                .and_then(|e| e.to_str())
                .map(|e| e.to_ascii_lowercase());
            if matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg")) {
                files.push(p);
            }
        }
        files.sort();
        if files.is_empty() {
            bail!(
                "--lowres {}: no PNG or JPEG images in the folder",
                path.display()
            );
        }
    } else {
        files.push(path.to_path_buf());
    }
    let low = size / scale;
    let mut values = Vec::new();
    for f in &files {
        let img = crate::data::open_image(f)
            .map_err(|e| anyhow!("--lowres: not a readable image: {e}"))?;
        if (img.width(), img.height()) != (low as u32, low as u32) {
            bail!(
                "--lowres {} is {}x{}; this x{scale} model of sample_size {size} needs {low}x{low} inputs",
                f.display(),
                img.width(),
                img.height()
            );
        }
        values.extend(crate::data::to_model_input(img, low, channels));
    }
    Ok((files, values))
}

/// The inpainting inputs at the model's size: the image in [-1, 1] and the keep mask (1 = keep),
/// both NHWC [S, S, C].
fn read_inpaint(
    args: &SampleArgs,
    size: usize,
    channels: usize,
) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
    let (Some(image_path), Some(mask_path)) = (&args.inpaint, &args.mask) else {
        return Ok(None);
    };
    let open = |p: &Path, what: &str| {
        crate::data::open_image(p).map_err(|e| anyhow!("{what}: not a readable image: {e}"))
    };
    let image = open(image_path, "--inpaint")?;
    let mask = open(mask_path, "--mask")?;
    if (image.width(), image.height()) != (mask.width(), mask.height()) {
        bail!(
            "--mask {} is {}x{} but the image is {}x{}: the mask must cover the image pixel for pixel",
            mask_path.display(),
            mask.width(),
            mask.height(),
            image.width(),
            image.height()
        );
    }
    let known = crate::data::to_model_input(image, size, channels);
    let grey = crate::data::to_model_input(mask, size, 1);
    // Binarised at mid-grey (as diffusers' RePaint pipeline does); white = regenerate.
    let keep: Vec<f32> = grey
        .iter()
        .flat_map(|&v| {
            let white = v > 0.0;
            let k = if white == args.mask_invert { 1.0 } else { 0.0 };
            std::iter::repeat_n(k, channels)
        })
        .collect();
    if keep.iter().all(|&k| k == 1.0) {
        bail!(
            "--mask {}: nothing to regenerate (the mask keeps every pixel{})",
            mask_path.display(),
            if args.mask_invert {
                "; --mask-invert is set"
            } else {
                ""
            }
        );
    }
    Ok(Some((known, keep)))
}

/// Reads one f32 tensor of a safetensors file, checking its shape.
fn read_tensor(
    path: &Path,
    name: &str,
    flag: &str,
    expect: &[Option<usize>],
) -> Result<(Vec<usize>, Vec<f32>)> {
    let file = LoadedTensors::read(path).with_context(|| format!("{flag} {}", path.display()))?;
    let (shape, values) = file
        .get(name)
        .with_context(|| format!("{flag} {}", path.display()))?;
    let fits = shape.len() == expect.len()
        && shape
            .iter()
            .zip(expect)
            .all(|(&s, e)| e.is_none_or(|e| e == s));
    if !fits {
        let want: Vec<String> = expect
            .iter()
            .map(|e| e.map(|v| v.to_string()).unwrap_or_else(|| "N".into()))
            .collect();
        bail!(
            "{flag} {}: tensor `{name}` has shape {shape:?}; expected [{}]",
            path.display(),
            want.join(", ")
        );
    }
    Ok((shape, values))
}

/// What `sample` will do, every input checked and read: built by [`plan`] without a GPU.
pub struct SamplePlan {
    pub source: ModelSource,
    pub schedule: SamplingSchedule,
    /// Inpainting: the image and its keep mask (NHWC [S, S, C]).
    pub inpaint: Option<(Vec<f32>, Vec<f32>)>,
    /// Super-resolution: the input files and their pixels (NHWC).
    pub lowres: Option<(Vec<PathBuf>, Vec<f32>)>,
    /// The class of each row (`--class all`) or the one class.
    pub classes: Option<Vec<u32>>,
    pub all_classes: bool,
    /// Images per class with `--class all`, else the number of images.
    pub per_class: usize,
    pub guidance: Option<f32>,
    /// A text-to-image model's prompt and negative prompt.
    pub prompt: Option<(String, String)>,
    pub num: usize,
    pub batch: usize,
    /// Given initial noise (NHWC, all images) and per-step noise (one NHWC block per step).
    pub noise: Option<Vec<f32>>,
    pub step_noise: Option<Vec<Vec<f32>>>,
    /// `--height/--width`, when either is given: the images' (height, width).
    pub size: Option<(usize, usize)>,
}

impl SamplePlan {
    /// [height, width, channels] of the images written: the VAE's decoded images for a latent
    /// model.
    pub fn image_dims(&self) -> [usize; 3] {
        let [s, c] = model_image_dims(&self.source);
        let (h, w) = self.size.unwrap_or((s, s));
        [h, w, c]
    }
}

/// [square size, channels] of a model's images (its VAE's for a latent model).
fn model_image_dims(source: &ModelSource) -> [usize; 2] {
    match &source.vae {
        Some(vae) => [vae.config.sample_size, vae.config.out_channels],
        None => [source.config.sample_size, source.config.out_channels],
    }
}

/// `--height/--width` (either defaults to the model's size), checked as far as the flags go:
/// the sampler checks them against the U-Net and the VAE.
fn requested_size(args: &SampleArgs, source: &ModelSource) -> Result<Option<(usize, usize)>> {
    if args.height.is_none() && args.width.is_none() {
        return Ok(None);
    }
    let [s, _] = model_image_dims(source);
    Ok(Some((args.height.unwrap_or(s), args.width.unwrap_or(s))))
}

/// How to make sampling fit when a tensor is past the adapter's limits.
const SAMPLE_FIT_ADVICE: &str = "use a smaller --batch-size (the images do not depend on it; guidance runs twice the batch), or a smaller model";

/// Puts sampling's advice (sampling flags) in place of training's in an error about sizes.
fn with_sampling_advice(e: anyhow::Error) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains(FIT_ADVICE) {
        anyhow!(text.replace(FIT_ADVICE, SAMPLE_FIT_ADVICE))
    } else {
        e
    }
}

/// Creates a file in `dir` and removes it: the one sure test that the folder takes files.
fn probe_writable(flag: &str, dir: &Path) -> Result<()> {
    let probe = dir.join(format!(".wgpu-diffusion-probe-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| {
            anyhow!(
                "{flag}: the folder {} is not writable ({e}); choose another {flag}",
                dir.display()
            )
        })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Checks that `dir` is a writable folder, or can be created as one, creating nothing.
pub fn check_output_dir(flag: &str, dir: &Path) -> Result<()> {
    if dir.exists() {
        if !dir.is_dir() {
            bail!(
                "{flag} {} is a file, not a folder: choose a folder",
                dir.display()
            );
        }
        return probe_writable(flag, dir);
    }
    // The nearest ancestor that exists must be a writable folder (`create_dir_all` makes the
    // rest).
    let existing = dir
        .ancestors()
        .skip(1)
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .find(|p| p.exists())
        .unwrap_or(Path::new("."));
    if !existing.is_dir() {
        bail!(
            "{flag} {}: {} is a file, so no folder can be made there",
            dir.display(),
            existing.display()
        );
    }
    probe_writable(flag, existing)
}

/// Checks that a file can be written (atomically, through a temporary file beside it) at `path`;
/// `example` names a file for the advice when `path` is a folder.
pub fn check_output_file(flag: &str, path: &Path, example: &str) -> Result<()> {
    if path.is_dir() {
        bail!(
            "{flag} {} is a folder: give a file path (e.g. {})",
            path.display(),
            path.join(example).display()
        );
    }
    if path.file_name().is_none() {
        bail!("{flag} {}: give a file path", path.display());
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    check_output_dir(flag, parent)
}

/// The model of `--model DIR` or `--checkpoint FILE`.
fn model_source(
    model: Option<&Path>,
    checkpoint: Option<&Path>,
    no_ema: bool,
) -> Result<ModelSource> {
    match (model, checkpoint) {
        (Some(dir), None) => {
            if no_ema {
                bail!(
                    "--no-ema applies to --checkpoint (a model directory holds one set of weights)"
                );
            }
            ModelSource::from_dir(dir)
        }
        (None, Some(file)) => ModelSource::from_checkpoint(file, no_ema),
        _ => bail!("give exactly one of --model DIR and --checkpoint FILE"),
    }
}

/// The VAE of a latent diffusion model (`--vae`, or the one the model came with), checked
/// against the U-Net; inpainting is refused in latent space.
fn latent_vae(args: &SampleArgs, source: &mut ModelSource) -> Result<()> {
    if let Some(dir) = &args.vae {
        source.vae = Some(LatentVae::from_dir(dir).context("--vae")?);
    }
    let Some(vae) = &source.vae else {
        if source.latent {
            bail!(
                "{} is a latent diffusion model, and its VAE was not found beside it: give it with --vae DIR",
                source.description
            );
        }
        return Ok(());
    };
    vae.check_fits(&source.config)?;
    if args.inpaint.is_some() {
        bail!(
            "--inpaint works on images, not on a VAE's latents: it is not supported for latent diffusion models"
        );
    }
    Ok(())
}

/// The flags that need no file: ranges, and flags that only apply with others.
fn check_flags(args: &SampleArgs) -> Result<()> {
    // η > 1 makes DDIM's σ_t exceed the noise the step may remove: √(1 − ᾱ_prev − σ_t²) is the
    // square root of a negative number (NaN in diffusers too).
    if !(0.0..=1.0).contains(&args.eta) {
        bail!(
            "--eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), is {}",
            args.eta
        );
    }
    if let Some(kind) = args.sampler
        && args.eta > 0.0
        && kind != SamplerKind::Ddim
    {
        bail!(
            "--eta applies to --sampler ddim only, not {}",
            kind.diffusers_class()
        );
    }
    if let Some(g) = args.guidance_scale
        && !g.is_finite()
    {
        bail!("--guidance-scale must be a finite number, is {g}");
    }
    if args.batch_size == Some(0) {
        bail!("--batch-size must be at least 1");
    }
    if args.num == Some(0) {
        bail!("--num must be at least 1");
    }
    if args.step_noise.is_some() && args.noise.is_none() {
        bail!("--step-noise needs --noise (the initial noise of the same images)");
    }
    if args.inpaint.is_some() && args.noise.is_some() {
        bail!("inpainting draws fresh noise at every step from the seeded GPU RNG: drop --noise");
    }
    if args.inpaint.is_some() && args.timestep_spacing.is_some() {
        bail!("--timestep-spacing does not apply to inpainting (RePaint steps by T/N)");
    }
    Ok(())
}

/// The super-resolution input, checked against the model and `--task`.
fn lowres_input(
    args: &SampleArgs,
    source: &ModelSource,
) -> Result<Option<(Vec<PathBuf>, Vec<f32>)>> {
    use crate::train::config::Task;
    let cfg = &source.config;
    let (c, s) = (cfg.out_channels, cfg.sample_size);
    let lowres = match (cfg.sr_scale, &args.lowres, args.task) {
        (Some(k), _, Some(Task::Generate)) => bail!(
            "--task generate: {} is a x{k} super-resolution model (it upsamples --lowres images); drop --task or give --task sr",
            source.description
        ),
        (Some(k), Some(path), _) => Some(read_lowres(path, s, k, c)?),
        (Some(k), None, _) => bail!(
            "{} is a x{k} super-resolution model: give the low-resolution input with --lowres IMAGE|DIR ({}x{} pixels)",
            source.description,
            s / k,
            s / k
        ),
        (None, _, Some(Task::Sr)) | (None, Some(_), _) => bail!(
            "{} is not a super-resolution model (its config has no _sr_scale)",
            source.description
        ),
        (None, None, _) => None,
    };
    if lowres.is_some()
        && (args.num.is_some()
            || args.noise.is_some()
            || args.inpaint.is_some()
            || args.class.is_some())
    {
        bail!(
            "with --lowres there is one output per low-resolution image: --num, --noise, --inpaint and --class do not apply"
        );
    }
    Ok(lowres)
}

/// The sampling schedule (RePaint's when inpainting); long lists in its errors are shortened.
fn sampling_schedule(
    args: &SampleArgs,
    source: &ModelSource,
    inpaint: bool,
) -> Result<SamplingSchedule> {
    let edm = source.scheduler.edm().map_err(|e| anyhow!(e))?.is_some();
    let ve = source.scheduler.ve().map_err(|e| anyhow!(e))?.is_some();
    // The model's own scheduler when we run it (Stable Diffusion 1.x names PNDMScheduler); a
    // text-to-image pipeline naming DDPMScheduler (what `train --text-conditional` exports) is
    // sampled with it, ancestrally, as StableDiffusionPipeline would: under guidance 3 the
    // deterministic DDIM turns these models' digits into blobs (README, Training text to image).
    let class = source.scheduler.get("_class_name").and_then(|c| c.as_str());
    let pndm = class == Some("PNDMScheduler");
    let text_ddpm = source.text.is_some() && class == Some("DDPMScheduler");
    if let Some(c) = source.scheduler.unknown_class()
        && args.sampler.is_none()
    {
        bail!(
            "the scheduler config ({}) names `{c}`, a scheduler class wgpu-diffusion does not know: choose a sampler with --sampler (the config's noise schedule is read as diffusers' from_config would)",
            source.scheduler_origin
        );
    }
    let kind = args.sampler.unwrap_or(match (edm, ve) {
        (true, _) => SamplerKind::Euler,
        (_, true) => SamplerKind::Pc,
        _ if pndm => SamplerKind::Pndm,
        _ if text_ddpm => SamplerKind::Ddpm,
        _ => SamplerKind::Ddim,
    });
    let mut overrides = Vec::new();
    if let Some(r) = args.snr {
        if !(r.is_finite() && r > 0.0) {
            bail!("--snr must be a finite number > 0, is {r}");
        }
        overrides.push(("snr", serde_json::Value::from(r)));
    }
    if let Some(k) = args.correct_steps {
        overrides.push(("correct_steps", serde_json::Value::from(k)));
    }
    if !overrides.is_empty() && kind != SamplerKind::Pc {
        bail!(
            "--snr and --correct-steps apply to a VE-SDE model's --sampler pc only, not {}",
            kind.cli_name()
        );
    }
    let scheduler = source
        .scheduler
        .with_overrides(&overrides)
        .map_err(|e| anyhow!(e))?;
    let schedule = if inpaint {
        SamplingSchedule::repaint(
            &scheduler,
            kind,
            args.steps,
            args.eta,
            args.jump_length.unwrap_or(10),
            args.jump_n_sample.unwrap_or(10),
        )
    } else {
        SamplingSchedule::new(
            &scheduler,
            kind,
            args.steps,
            args.timestep_spacing,
            args.eta,
        )
    };
    schedule.map_err(|e| {
        anyhow!(
            "{} (scheduler settings from {})",
            e,
            source.scheduler_origin
        )
    })
}

/// Which label each image gets: (classes, `--class all`), checked against the model.
fn class_labels(args: &SampleArgs, source: &ModelSource) -> Result<(Option<Vec<u32>>, bool)> {
    let cfg = &source.config;
    let classes: Option<Vec<u32>> = match (cfg.num_class_embeds, &args.class) {
        (None, Some(_)) => bail!(
            "--class: {} is not class-conditional (no num_class_embeds)",
            source.description
        ),
        (None, None) => None,
        (Some(_), None) => bail!(
            "{} is class-conditional: choose --class (0..{}{}) or --class all",
            source.description,
            source.real_classes() - 1,
            if source.class_names.is_empty() {
                String::new()
            } else {
                format!(", or a name: {}", source.class_names.join(", "))
            }
        ),
        (Some(_), Some(spec)) if spec == "all" => Some((0..source.real_classes() as u32).collect()),
        (Some(_), Some(spec)) => Some(vec![source.class_index(spec)?]),
    };
    if args.guidance_scale.is_some()
        && cfg.num_class_embeds.is_none()
        && cfg.cross_attention.is_none()
    {
        bail!(
            "--guidance-scale: {} is neither class- nor text-conditional, there is nothing to guide",
            source.description
        );
    }
    Ok((classes, args.class.as_deref() == Some("all")))
}

/// `--noise` (which sets the number of images) and `--step-noise`, NHWC, checked: shapes, finite
/// values, and a sampler that uses them.
#[allow(clippy::type_complexity)]
fn given_noise(
    args: &SampleArgs,
    source: &ModelSource,
    schedule: &SamplingSchedule,
    (num, (h, w)): (usize, (usize, usize)),
) -> Result<(usize, Option<Vec<f32>>, Option<Vec<Vec<f32>>>)> {
    let c = source.config.out_channels;
    let Some(path) = &args.noise else {
        return Ok((num, None, None));
    };
    let (shape, v) = read_tensor(path, "noise", "--noise", &[None, Some(c), Some(h), Some(w)])?;
    let num = shape[0];
    if num == 0 {
        bail!("--noise {}: the tensor holds no images", path.display());
    }
    if let Some(n) = args.num
        && n != num
    {
        bail!(
            "--num {n}, but --noise {} holds {num} images, which sets the number: drop --num",
            path.display()
        );
    }
    if v.iter().any(|x| !x.is_finite()) {
        bail!(
            "--noise {}: tensor `noise` holds non-finite values (NaN or infinite)",
            path.display()
        );
    }
    let noise = nchw_to_nhwc(&v, [num, c, h, w]);
    let uses = schedule.uses_step_noise();
    let step_noise = match &args.step_noise {
        Some(path) if !uses => bail!(
            "--step-noise {}: --sampler {} {}adds no noise between steps, so it would not be used; drop it",
            path.display(),
            schedule.settings.class_name(),
            if schedule.settings.kind == SamplerKind::Ddim {
                "with --eta 0 "
            } else {
                ""
            }
        ),
        Some(path) => {
            let (_, v) = read_tensor(
                path,
                "step_noise",
                "--step-noise",
                &[
                    Some(schedule.noise_draws()),
                    Some(num),
                    Some(c),
                    Some(h),
                    Some(w),
                ],
            )?;
            if v.iter().any(|x| !x.is_finite()) {
                bail!(
                    "--step-noise {}: tensor `step_noise` holds non-finite values (NaN or infinite)",
                    path.display()
                );
            }
            let per = num * c * h * w;
            Some(
                v.chunks(per)
                    .map(|chunk| nchw_to_nhwc(chunk, [num, c, h, w]))
                    .collect::<Vec<_>>(),
            )
        }
        None if uses => bail!(
            "--sampler {} adds fresh noise at every step: with --noise, also give --step-noise (or drop --noise to use the seeded GPU noise)",
            schedule.settings.kind.cli_name()
        ),
        None => None,
    };
    Ok((num, Some(noise), step_noise))
}

/// Checks every input of `sample` — flags, files, output paths — without a GPU, and returns what
/// to do. Nothing is created.
pub fn plan(args: &SampleArgs) -> Result<SamplePlan> {
    check_flags(args)?;
    check_output_dir("--out", &args.out)?;
    if let Some(path) = &args.save_tensor {
        check_output_file("--save-tensor", path, "samples.safetensors")?;
    }
    let mut source = model_source(
        args.model.as_deref(),
        args.checkpoint.as_deref(),
        args.no_ema,
    )?;
    latent_vae(args, &mut source)?;
    if source.vae.is_some()
        && source.scheduler.get("clip_sample") == Some(&serde_json::Value::Bool(true))
    {
        source.notes.push(format!(
            "the scheduler config ({}) clips the x0 estimates to [-1, 1] (clip_sample true), which distorts a VAE's latents (they range wider): set \"clip_sample\": false there, as latent diffusion exports now write it",
            source.scheduler_origin
        ));
    }
    let (c, s) = (source.config.out_channels, source.config.sample_size);
    let lowres = lowres_input(args, &source)?;
    let inpaint = read_inpaint(args, s, c)?;
    let schedule = sampling_schedule(args, &source, inpaint.is_some())?;
    let prompt = text_prompt(args, &source)?;
    let (classes, all_classes) = class_labels(args, &source)?;
    let per_class = args.num.unwrap_or(if all_classes { 8 } else { 16 });
    let num = match (&classes, &lowres) {
        (_, Some((files, _))) => files.len(),
        (Some(list), _) if all_classes => list.len() * per_class,
        _ => per_class,
    };
    let size = requested_size(args, &source)?;
    // The U-Net's input: the image size, over the VAE's downscale for a latent model.
    let (ih, iw) = size.unwrap_or((s, s));
    let latent_hw = match &source.vae {
        Some(vae) if size.is_some() => (ih / vae.config.downscale(), iw / vae.config.downscale()),
        _ => size.unwrap_or((s, s)),
    };
    let (num, noise, step_noise) = given_noise(args, &source, &schedule, (num, latent_hw))?;
    let batch = args.batch_size.unwrap_or(num.min(64)).min(num);
    // StableDiffusionPipeline: guidance 7.5 unless given, and only above 1.
    let guidance = match &prompt {
        Some(_) => Some(args.guidance_scale.unwrap_or(7.5)).filter(|&g| g > 1.0),
        None => args.guidance_scale.filter(|&g| g != 1.0),
    };
    Ok(SamplePlan {
        guidance,
        prompt,
        source,
        schedule,
        inpaint,
        lowres,
        classes,
        all_classes,
        per_class,
        num,
        batch,
        noise,
        step_noise,
        size,
    })
}

pub fn run(opts: &GpuOptions, args: &SampleArgs) -> Result<()> {
    let mut plan = plan(args)?;
    let gpu: Arc<Gpu> = Gpu::new(opts)?;
    eprintln!("device: {}", gpu.describe());
    eprintln!("model: {}", plan.source.description);
    let vae_notes = plan.source.vae.iter().flat_map(|v| v.notes.iter());
    for n in plan.source.notes.iter().chain(vae_notes) {
        eprintln!("note: {n}");
    }
    if let Some(vae) = &plan.source.vae {
        eprintln!(
            "latent diffusion: decoding with the VAE {} (scaling_factor {})",
            vae.dir.display(),
            vae.config.scaling_factor
        );
    }
    let schedule = &plan.schedule;
    eprintln!(
        "sampler: {} ({} steps, {} U-Net evaluations per batch, timesteps {}…{}), scheduler settings from {}",
        schedule.settings.class_name(),
        args.steps,
        schedule.evals.len(),
        schedule.timesteps.first().copied().unwrap_or(0.0),
        schedule.timesteps.last().copied().unwrap_or(0.0),
        plan.source.scheduler_origin
    );
    if let Some(list) = &plan.classes {
        eprintln!(
            "classes: {}{}",
            if plan.all_classes {
                "all, one row each".to_string()
            } else {
                plan.source.class_label(list[0])
            },
            match plan.guidance {
                Some(g) => format!(", classifier-free guidance scale {g}"),
                None => String::new(),
            }
        );
    }
    let options = SamplerOptions {
        guidance: plan.guidance,
        inpaint: plan.inpaint.take(),
        vae: plan.source.vae.clone(),
        context_tokens: plan.source.text.as_ref().map(|t| t.context_tokens()),
        size: plan.size,
    };
    let mut sampler = gpu
        .checked_build(|| {
            Sampler::new(
                &gpu,
                &plan.source.config,
                plan.schedule.clone(),
                plan.batch,
                &options,
            )
        })
        .map_err(with_sampling_advice)?;
    sampler.set_weights(&plan.source.weights(&sampler.unet.params)?)?;
    if let (Some(text), Some(prompt)) = (&plan.source.text, &plan.prompt) {
        set_prompt(&gpu, text, &sampler, prompt)?;
    }
    let memory = crate::gpu::human_bytes(gpu.allocated_bytes());
    if args.profile {
        sampler.profile().print(30, 30);
        eprintln!("GPU memory allocated: {memory}");
        return Ok(());
    }
    let start = Instant::now();
    let images = sample_all(args, &plan, &mut sampler)?;
    let secs = start.elapsed().as_secs_f64();
    write_outputs(args, &plan, &images)?;
    eprintln!(
        "{} images in {secs:.1} s ({:.2} images/s, GPU memory allocated {memory}): {} and {}/00000.png…",
        plan.num,
        plan.num as f64 / secs,
        args.out.join("grid.png").display(),
        args.out.display()
    );
    Ok(())
}

/// A text-to-image model's prompt (and, when the model is not one, no prompt flags): the
/// pipeline's text encoder and tokenizer must be there and fit the U-Net.
fn text_prompt(args: &SampleArgs, source: &ModelSource) -> Result<Option<(String, String)>> {
    let Some(_) = &source.config.cross_attention else {
        if args.prompt.is_some() || args.negative_prompt.is_some() {
            bail!(
                "--prompt and --negative-prompt are for text-to-image models (a Stable Diffusion pipeline directory); {} has no cross-attention",
                source.description
            );
        }
        return Ok(None);
    };
    let Some(text) = &source.text else {
        bail!(
            "{} attends to text (UNet2DConditionModel), but no text_encoder/ and tokenizer/ were found beside it: give the pipeline directory (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), or a checkpoint inside its run folder (RUN/checkpoints/, beside RUN/tokenizer/ and RUN/text_encoder/)",
            source.description
        );
    };
    text.check_fits(&source.config)?;
    if args.class.is_some() {
        bail!("--class is for class-conditional models; a text-to-image model takes --prompt");
    }
    let Some(prompt) = &args.prompt else {
        bail!(
            "{} is a text-to-image model: give --prompt \"…\"",
            source.description
        );
    };
    let negative = args.negative_prompt.clone().unwrap_or_default();
    Ok(Some((prompt.clone(), negative)))
}

/// Encodes the prompt (and with guidance the negative prompt) once and gives the U-Net its
/// context for every batch.
fn set_prompt(
    gpu: &Arc<Gpu>,
    text: &TextConditioning,
    sampler: &Sampler,
    (prompt, negative): &(String, String),
) -> Result<()> {
    let guided = sampler.guidance.is_some();
    let prompts: Vec<&str> = if guided {
        vec![prompt, negative]
    } else {
        vec![prompt]
    };
    for n in &text.notes {
        eprintln!("note: {n}");
    }
    if !guided && !negative.is_empty() {
        eprintln!("note: --negative-prompt is unused without guidance (--guidance-scale above 1)");
    }
    let encoder = text.load(gpu, prompts.len())?;
    for w in encoder.encode(&prompts)? {
        eprintln!("warning: {w}");
    }
    eprintln!(
        "prompt: \"{prompt}\"{}",
        if guided {
            format!(", negative prompt \"{negative}\"")
        } else {
            String::new()
        }
    );
    let out = encoder.output();
    let row = [1, out.shape()[1], out.shape()[2]];
    let cond = out.view(0, &row, "prompt");
    let uncond = guided.then(|| out.view(row[1] * row[2], &row, "negative prompt"));
    sampler.set_context(&cond, uncond.as_ref())
}

/// The settings that shaped a batch, for an error about its samples.
fn settings_text(args: &SampleArgs, plan: &SamplePlan) -> String {
    let kind = plan.schedule.settings.kind;
    let mut s = format!("--sampler {} --steps {}", kind.cli_name(), args.steps);
    if kind == SamplerKind::Ddim {
        s += &format!(" --eta {}", args.eta);
    }
    if let Some(g) = plan.guidance {
        s += &format!(" --guidance-scale {g}");
    }
    if let Some((p, n)) = &plan.prompt {
        s += &format!(" --prompt \"{p}\" --negative-prompt \"{n}\"");
    }
    if let Some(p) = &args.noise {
        s += &format!(" --noise {}", p.display());
    }
    format!("{s}, model {}", plan.source.description)
}

/// Every batch of the plan through the sampler, with a progress bar; the images, NHWC. A batch
/// with a non-finite value is an error naming the settings.
fn sample_all(args: &SampleArgs, plan: &SamplePlan, sampler: &mut Sampler) -> Result<Vec<f32>> {
    let [_, h, w, c] = sampler.image_shape();
    let per_image = h * w * c;
    let [_, lh, lw, lc] = sampler.latent_shape();
    let per_latent = lh * lw * lc;
    let (num, batch) = (plan.num, plan.batch);
    let batches = num.div_ceil(batch);
    let evals = sampler.evaluations();
    let mut progress = ConsoleProgress::new("sampling", "U-Net evaluations");
    progress.start(0, (batches * evals) as u64);
    // Image k's label: its row's class with --class all, else the one class.
    let label_of = |k: usize| -> u32 {
        match &plan.classes {
            Some(list) if plan.all_classes => list[(k / plan.per_class).min(list.len() - 1)],
            Some(list) => list[0],
            None => 0,
        }
    };
    let mut images: Vec<f32> = Vec::with_capacity(num * per_image);
    for b in 0..batches {
        let first = b * batch;
        let take = batch.min(num - first);
        let pad = |v: &[f32]| {
            let mut out = v[first * per_latent..(first + take) * per_latent].to_vec();
            out.resize(batch * per_latent, 0.0);
            out
        };
        let given_initial = plan.noise.as_ref().map(|v| pad(v));
        let given_steps: Option<Vec<Vec<f32>>> = plan
            .step_noise
            .as_ref()
            .map(|steps| steps.iter().map(|v| pad(v)).collect());
        let source_noise = match &given_initial {
            Some(initial) => Noise::Given {
                initial,
                steps: given_steps
                    .as_ref()
                    .map(|v| v.iter().map(|x| x.as_slice()).collect()),
            },
            None => Noise::Seeded(args.seed),
        };
        if let Some((_, low)) = &plan.lowres {
            let per_low = low.len() / num;
            let mut chunk = low[first * per_low..(first + take) * per_low].to_vec();
            chunk.resize(batch * per_low, 0.0);
            sampler.set_lowres(&chunk)?;
        }
        let labels: Vec<u32> = (first..first + batch).map(label_of).collect();
        let labels = plan.classes.as_ref().map(|_| labels.as_slice());
        let out = sampler.sample_batch(first, &source_noise, labels, &mut |e| {
            progress.set((b * evals + e + 1) as u64, true)
        })?;
        let out = &out[..take * per_image];
        if out.iter().any(|v| !v.is_finite()) {
            progress.finish();
            bail!(
                "images {first}..{} came out non-finite (NaN or infinite), so nothing was written; the settings were {}: change them (a smaller --eta or --guidance-scale, other --noise, another sampler) or check the model",
                first + take - 1,
                settings_text(args, plan)
            );
        }
        images.extend_from_slice(out);
    }
    progress.finish();
    Ok(images)
}

/// Our own files in an output folder: `grid.png` and `NNNNN.png` (and their temporary files).
fn is_our_output(name: &str) -> bool {
    let name = name
        .strip_prefix('.')
        .and_then(|n| n.strip_suffix(".tmp"))
        .unwrap_or(name);
    let digits = name.strip_suffix(".png").unwrap_or("");
    name == "grid.png" || (digits.len() >= 5 && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes the outputs of an earlier run in `dir` that this one does not replace (so `--num 2`
/// after `--num 8` leaves no 00002..00007.png); other files are never touched. Returns their
/// names.
fn remove_stale_outputs(dir: &Path, keep: &[String]) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(removed);
    };
    for e in entries {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().to_string();
        if is_our_output(&name) && !keep.contains(&name) && e.file_type()?.is_file() {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing the earlier output {}", e.path().display()))?;
            removed.push(name);
        }
    }
    removed.sort();
    Ok(removed)
}

/// The grid, one PNG per image, the raw tensor: an earlier run's images in the folder are
/// removed first (with a note).
fn write_outputs(args: &SampleArgs, plan: &SamplePlan, images: &[f32]) -> Result<()> {
    let (num, [h, w, c]) = (plan.num, plan.image_dims());
    let per_image = c * h * w;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating the output folder {}", args.out.display()))?;
    let names: Vec<String> = std::iter::once("grid.png".to_string())
        .chain((0..num).map(|k| format!("{k:05}.png")))
        .collect();
    let removed = remove_stale_outputs(&args.out, &names)?;
    if !removed.is_empty() {
        eprintln!(
            "note: removed {} image(s) of an earlier run from {} ({}{}); other files there are left alone",
            removed.len(),
            args.out.display(),
            removed[..removed.len().min(3)].join(", "),
            if removed.len() > 3 { ", …" } else { "" }
        );
    }
    let shape = [num, h, w, c];
    let cols = if plan.all_classes {
        plan.per_class
    } else {
        (num as f64).sqrt().ceil() as usize
    };
    save_grid(images, shape, cols.max(1), &args.out.join("grid.png"))?;
    for (k, img) in images.chunks(per_image).enumerate() {
        save_image(img, [h, w, c], &args.out.join(format!("{k:05}.png")))?;
    }
    if let Some(path) = &args.save_tensor {
        let nchw = nhwc_to_nchw(images, shape);
        let mut meta = HashMap::new();
        meta.insert(
            "sampler".to_string(),
            plan.schedule.settings.class_name().to_string(),
        );
        meta.insert("steps".to_string(), args.steps.to_string());
        meta.insert("seed".to_string(), args.seed.to_string());
        meta.insert("model".to_string(), plan.source.description.clone());
        let view = TensorView::new(Dtype::F32, vec![num, c, h, w], bytemuck::cast_slice(&nchw))?;
        let bytes = safetensors::serialize([("sample", view)], Some(meta))?;
        atomic_write(path, &bytes)?;
        eprintln!("raw samples: {}", path.display());
    }
    Ok(())
}

/// `wgpu-diffusion eval-sr`: a super-resolution model on the MNIST test digits.
#[derive(clap::Args, Clone, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["model", "checkpoint"])))]
pub struct EvalSrArgs {
    /// The super-resolution model (a model directory or run folder).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// One of our training checkpoints (runs/…/checkpoints/step-*.safetensors).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// With --checkpoint: the raw weights instead of the EMA ones.
    #[arg(long)]
    pub no_ema: bool,
    /// Evaluate the first N test digits (default: all 10,000).
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, value_enum, default_value_t = SamplerKind::Ddim)]
    pub sampler: SamplerKind,
    /// Denoising steps per digit; `--steps` is the same.
    #[arg(long = "sample-steps", visible_alias = "steps", default_value_t = 50)]
    pub steps: usize,
    /// Seed of the GPU noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Digits per U-Net batch (the scores do not depend on it).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Also write a comparison picture (rows: LR, bicubic, ours, ground truth) of the first 8.
    #[arg(long)]
    pub picture: Option<PathBuf>,
}

/// Mean PSNR / SSIM against the ground truth and the consistency PSNR (avg_pool(SR) vs LR).
#[derive(Default, serde::Serialize)]
pub struct SrScores {
    pub psnr: f64,
    pub ssim: f64,
    pub consistency_psnr: f64,
}

fn score(sr: &[f32], hr: &[f32], lr: &[f32], k: usize, totals: &mut SrScores) {
    use crate::metrics::{psnr, ssim, to_unit};
    let (a, b) = (to_unit(sr), to_unit(hr));
    totals.psnr += psnr(&a, &b);
    totals.ssim += ssim(&a, &b, 28, 28, 1);
    let pooled = crate::data::resize::avg_pool(&a, [1, 28 / k, 28 / k, 1], k);
    totals.consistency_psnr += psnr(&pooled, &to_unit(lr));
}

/// What `eval-sr` measures, checked without a GPU: the model (a x`scale` model of 28x28
/// digits), its schedule, and the test digits.
struct EvalSrPlan {
    source: ModelSource,
    schedule: SamplingSchedule,
    scale: usize,
    /// The first `n` test digits, 28x28 in [-1, 1].
    images: Vec<f32>,
    n: usize,
    batch: usize,
}

fn eval_sr_plan(args: &EvalSrArgs) -> Result<EvalSrPlan> {
    if args.batch_size == 0 || args.limit == Some(0) {
        bail!("--limit and --batch-size must be at least 1");
    }
    if let Some(path) = &args.picture {
        check_output_file("--picture", path, "sr.png")?;
    }
    let source = model_source(
        args.model.as_deref(),
        args.checkpoint.as_deref(),
        args.no_ema,
    )?;
    let cfg = &source.config;
    let Some(k) = cfg.sr_scale else {
        bail!(
            "{} is not a super-resolution model (no _sr_scale in its config)",
            source.description
        );
    };
    if (cfg.sample_size, cfg.out_channels) != (28, 1) {
        bail!(
            "eval-sr measures on the MNIST test digits (28x28, 1 channel); this model makes {}x{} images with {} channels (train it with --task sr on a 28x28 preset, e.g. --model tiny28)",
            cfg.sample_size,
            cfg.sample_size,
            cfg.out_channels
        );
    }
    let schedule = SamplingSchedule::new(&source.scheduler, args.sampler, args.steps, None, 0.0)
        .map_err(|e| {
            anyhow!(
                "{} (scheduler settings from {})",
                e,
                source.scheduler_origin
            )
        })?;
    let (total, images) = crate::data::mnist::test_images()?;
    let n = args.limit.unwrap_or(total).min(total);
    Ok(EvalSrPlan {
        source,
        schedule,
        scale: k,
        images,
        n,
        batch: args.batch_size.min(n),
    })
}

pub fn run_eval_sr(opts: &GpuOptions, args: &EvalSrArgs) -> Result<()> {
    let plan = eval_sr_plan(args)?;
    let (k, n) = (plan.scale, plan.n);
    let gpu: Arc<Gpu> = Gpu::new(opts)?;
    eprintln!("device: {}", gpu.describe());
    eprintln!(
        "model: {} (x{k}); {} test digits, {} {} steps, seed {}",
        plan.source.description,
        n,
        args.sampler.diffusers_class(),
        args.steps,
        args.seed
    );
    let mut sampler = gpu
        .checked_build(|| {
            Sampler::new(
                &gpu,
                &plan.source.config,
                plan.schedule.clone(),
                plan.batch,
                &SamplerOptions::default(),
            )
        })
        .map_err(with_sampling_advice)?;
    sampler.set_weights(&plan.source.weights(&sampler.unet.params)?)?;
    let start = Instant::now();
    let (ours, bicubic, picture) = eval_sr_batches(args, &plan, &mut sampler)?;
    println!("| x{k}, {n} MNIST test digits | PSNR (dB) | SSIM | consistency PSNR (dB) |");
    println!("|---|---|---|---|");
    println!(
        "| bicubic | {:.2} | {:.3} | {:.2} |",
        bicubic.psnr, bicubic.ssim, bicubic.consistency_psnr
    );
    println!(
        "| {} ({} {} steps) | {:.2} | {:.3} | {:.2} |",
        plan.source.description,
        args.sampler.diffusers_class(),
        args.steps,
        ours.psnr,
        ours.ssim,
        ours.consistency_psnr
    );
    eprintln!(
        "{:.1} s ({:.2} images/s)",
        start.elapsed().as_secs_f64(),
        n as f64 / start.elapsed().as_secs_f64()
    );
    println!(
        "{}",
        serde_json::json!({"eval": "sr", "scale": k, "images": n, "sampler": args.sampler.diffusers_class(), "steps": args.steps, "seed": args.seed, "ours": ours, "bicubic": bicubic})
    );
    if let Some(path) = &args.picture {
        let per = 28 * 28;
        let cols = picture[3].len() / per;
        let all: Vec<f32> = picture.concat();
        save_grid(&all, [4 * cols, 28, 28, 1], cols, path)?;
        eprintln!(
            "picture: {} (rows: LR, bicubic, ours, ground truth)",
            path.display()
        );
    }
    Ok(())
}

/// Every batch of test digits: mean scores of ours and of bicubic, and the picture's rows (LR,
/// bicubic, ours, ground truth) of the first 8.
fn eval_sr_batches(
    args: &EvalSrArgs,
    plan: &EvalSrPlan,
    sampler: &mut Sampler,
) -> Result<(SrScores, SrScores, Vec<Vec<f32>>)> {
    use crate::data::resize::{avg_pool, upsample_bicubic};
    let (k, n, batch) = (plan.scale, plan.n, plan.batch);
    let (low_n, per) = ((28 / k) * (28 / k), 28 * 28);
    let mut ours = SrScores::default();
    let mut bicubic = SrScores::default();
    let mut picture: Vec<Vec<f32>> = vec![Vec::new(); 4];
    let mut progress = ConsoleProgress::new("eval-sr", "batches");
    progress.start(0, n.div_ceil(batch) as u64);
    for (b, first) in (0..n).step_by(batch).enumerate() {
        let take = batch.min(n - first);
        let hr = &plan.images[first * per..(first + take) * per];
        let mut low: Vec<f32> = Vec::with_capacity(batch * low_n);
        for img in hr.chunks(per) {
            let hr64: Vec<f64> = img.iter().map(|&v| v as f64).collect();
            low.extend(
                avg_pool(&hr64, [1, 28 / k, 28 / k, 1], k)
                    .iter()
                    .map(|&v| v as f32),
            );
        }
        let mut padded = low.clone();
        padded.resize(batch * low_n, 0.0);
        sampler.set_lowres(&padded)?;
        let sr = sampler.sample_batch(first, &Noise::Seeded(args.seed), None, &mut |_| {})?;
        if sr[..take * per].iter().any(|v| !v.is_finite()) {
            progress.finish();
            bail!(
                "digits {first}..{} came out non-finite (NaN or infinite) with --sampler {:?} --steps {}, model {}: nothing was scored; check the model",
                first + take - 1,
                args.sampler,
                args.steps,
                plan.source.description
            );
        }
        for i in 0..take {
            let (h, l, o) = (
                &hr[i * per..(i + 1) * per],
                &low[i * low_n..(i + 1) * low_n],
                &sr[i * per..(i + 1) * per],
            );
            score(o, h, l, k, &mut ours);
            let l64: Vec<f64> = l.iter().map(|&v| v as f64).collect();
            let up: Vec<f32> = upsample_bicubic(&l64, [1, 28 / k, 28 / k, 1], k)
                .iter()
                .map(|&v| v as f32)
                .collect();
            score(&up, h, l, k, &mut bicubic);
            if first + i < 8 {
                // Nearest-neighbour view of the LR input at full size.
                let nn: Vec<f32> = (0..per)
                    .map(|p| l[((p / 28) / k) * (28 / k) + (p % 28) / k])
                    .collect();
                picture[0].extend(nn);
                picture[1].extend(up);
                picture[2].extend_from_slice(o);
                picture[3].extend_from_slice(h);
            }
        }
        progress.set(b as u64 + 1, true);
    }
    progress.finish();
    for sc in [&mut ours, &mut bicubic] {
        sc.psnr /= n as f64;
        sc.ssim /= n as f64;
        sc.consistency_psnr /= n as f64;
    }
    Ok((ours, bicubic, picture))
}
