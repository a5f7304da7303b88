//! `wgpu-diffusion sample`: flags, input checks, the batch loop with a progress bar, and the
//! outputs (a grid, one PNG per image, optionally the raw tensor).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use safetensors::{Dtype, tensor::TensorView};

use crate::diffusion::scheduler::{SamplerKind, SamplingSchedule, TimestepSpacing};
use crate::gpu::{Gpu, GpuOptions};
use crate::io::atomic::atomic_write;
use crate::io::images::{save_grid, save_image};
use crate::io::tensors::LoadedTensors;
use crate::sample::{ModelSource, Noise, Sampler, SamplerOptions, nchw_to_nhwc, nhwc_to_nchw};

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
    #[arg(long, value_enum, default_value_t = SamplerKind::Ddim)]
    pub sampler: SamplerKind,
    /// Denoising steps (Heun evaluates the U-Net about twice per step).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// DDIM's η: 0 is deterministic, 1 is DDPM-like.
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// Overrides the scheduler config's timestep_spacing.
    #[arg(long, value_enum)]
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Images to generate (default 16; with `--class all`, per class, default 8).
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
    /// Images per U-Net batch (default: --num, at most 64).
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder: grid.png and one PNG per image.
    #[arg(long, default_value = "samples")]
    pub out: PathBuf,
    /// Initial noise: a safetensors file with tensor `noise`, f32 [N, C, H, W] (before
    /// init_noise_sigma scaling); N images are generated.
    #[arg(long)]
    pub noise: Option<PathBuf>,
    /// Per-step noise for DDPM / DDIM with η > 0: tensor `step_noise`, f32 [steps, N, C, H, W].
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
    #[arg(long)]
    pub mask_invert: bool,
    /// RePaint: steps of each jump back up (diffusers' default 10).
    #[arg(long, default_value_t = 10)]
    pub jump_length: usize,
    /// RePaint: how often each jump point is resampled (1 = no resampling; diffusers' 10).
    #[arg(long, default_value_t = 10)]
    pub jump_n_sample: usize,
    /// `sr` for a super-resolution model (inferred from the model; given, it is checked).
    #[arg(long, value_enum)]
    pub task: Option<crate::train::config::Task>,
    /// Super-resolution: a low-resolution image, or a folder of them (sorted by name); each must
    /// be sample_size / scale pixels square. One output per input.
    #[arg(long)]
    pub lowres: Option<PathBuf>,
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

pub fn run(opts: &GpuOptions, args: &SampleArgs) -> Result<()> {
    // Everything that can be checked without a GPU is checked first.
    let source = match (&args.model, &args.checkpoint) {
        (Some(dir), None) => {
            if args.no_ema {
                bail!(
                    "--no-ema applies to --checkpoint (a model directory holds one set of weights)"
                );
            }
            ModelSource::from_dir(dir)?
        }
        (None, Some(file)) => ModelSource::from_checkpoint(file, args.no_ema)?,
        _ => bail!("give exactly one of --model DIR and --checkpoint FILE"),
    };
    let cfg = &source.config;
    let (c, s) = (cfg.out_channels, cfg.sample_size);
    let lowres = match (cfg.sr_scale, &args.lowres, args.task) {
        (Some(k), Some(path), _) => Some(read_lowres(path, s, k, c)?),
        (Some(k), None, _) => bail!(
            "{} is a x{k} super-resolution model: give the low-resolution input with --lowres IMAGE|DIR ({}x{} pixels)",
            source.description,
            s / k,
            s / k
        ),
        (None, _, Some(crate::train::config::Task::Sr)) | (None, Some(_), _) => bail!(
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
    let inpaint = read_inpaint(args, s, c)?;
    let schedule = match &inpaint {
        None => SamplingSchedule::new(
            &source.scheduler,
            args.sampler,
            args.steps,
            args.timestep_spacing,
            args.eta,
        ),
        Some(_) => {
            if args.timestep_spacing.is_some() {
                bail!("--timestep-spacing does not apply to inpainting (RePaint steps by T/N)");
            }
            SamplingSchedule::repaint(
                &source.scheduler,
                args.sampler,
                args.steps,
                args.eta,
                args.jump_length,
                args.jump_n_sample,
            )
        }
    }
    .map_err(|e| anyhow!("{e} (scheduler settings from {})", source.scheduler_origin))?;
    // Classes: which label each image gets.
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
    if args.guidance_scale.is_some() && cfg.num_class_embeds.is_none() {
        bail!(
            "--guidance-scale: {} is not class-conditional, there is nothing to guide",
            source.description
        );
    }
    let guidance = args.guidance_scale.filter(|&g| g != 1.0);
    let all_classes = args.class.as_deref() == Some("all");
    let per_class = args.num.unwrap_or(if all_classes { 8 } else { 16 });
    let mut num = match (&classes, &lowres) {
        (_, Some((files, _))) => files.len(),
        (Some(list), _) if all_classes => list.len() * per_class,
        _ => per_class,
    };
    let noise = match &args.noise {
        Some(path) => {
            let (shape, v) =
                read_tensor(path, "noise", "--noise", &[None, Some(c), Some(s), Some(s)])?;
            num = shape[0];
            if num == 0 {
                bail!("--noise {}: the tensor holds no images", path.display());
            }
            Some(nchw_to_nhwc(&v, [num, c, s, s]))
        }
        None => None,
    };
    if num == 0 {
        bail!("--num must be at least 1");
    }
    let step_noise = match &args.step_noise {
        Some(path) => {
            if noise.is_none() {
                bail!("--step-noise needs --noise (the initial noise of the same images)");
            }
            let (_, v) = read_tensor(
                path,
                "step_noise",
                "--step-noise",
                &[Some(args.steps), Some(num), Some(c), Some(s), Some(s)],
            )?;
            let per = num * c * s * s;
            Some(
                v.chunks(per)
                    .map(|chunk| nchw_to_nhwc(chunk, [num, c, s, s]))
                    .collect::<Vec<_>>(),
            )
        }
        None => None,
    };
    if noise.is_some() && step_noise.is_none() && schedule.uses_step_noise() {
        bail!(
            "--sampler {:?} adds fresh noise at every step: with --noise, also give --step-noise (or drop --noise to use the seeded GPU noise)",
            args.sampler
        );
    }
    let batch = args.batch_size.unwrap_or(num.min(64));
    if batch == 0 {
        bail!("--batch-size must be at least 1");
    }
    let batch = batch.min(num);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating the output folder {}", args.out.display()))?;

    let gpu: Arc<Gpu> = Gpu::new(opts)?;
    eprintln!("device: {}", gpu.describe());
    eprintln!("model: {}", source.description);
    for n in &source.notes {
        eprintln!("note: {n}");
    }
    eprintln!(
        "sampler: {} ({} steps, {} U-Net evaluations per batch, timesteps {}…{}), scheduler settings from {}",
        args.sampler.diffusers_class(),
        args.steps,
        schedule.evals.len(),
        schedule.timesteps.first().copied().unwrap_or(0.0),
        schedule.timesteps.last().copied().unwrap_or(0.0),
        source.scheduler_origin
    );
    if inpaint.is_some() && noise.is_some() {
        bail!("inpainting draws fresh noise at every step from the seeded GPU RNG: drop --noise");
    }
    let mut sampler = gpu.checked_build(|| {
        Sampler::new(
            &gpu,
            cfg,
            schedule,
            batch,
            &SamplerOptions { guidance, inpaint },
        )
    })?;
    if let Some(list) = &classes {
        eprintln!(
            "classes: {}{}",
            if all_classes {
                "all, one row each".to_string()
            } else {
                source.class_label(list[0])
            },
            match guidance {
                Some(g) => format!(", classifier-free guidance scale {g}"),
                None => String::new(),
            }
        );
    }
    // Image k's label: its row's class with --class all, else the one class.
    let label_of = |k: usize| -> u32 {
        match &classes {
            Some(list) if all_classes => list[(k / per_class).min(list.len() - 1)],
            Some(list) => list[0],
            None => 0,
        }
    };
    sampler.set_weights(&source.weights(&sampler.unet.params)?)?;
    let per_image = c * s * s;
    let batches = num.div_ceil(batch);
    let evals = sampler.evaluations();
    let mut progress = StepProgress::new((batches * evals) as u64);
    let start = Instant::now();
    let mut images: Vec<f32> = Vec::with_capacity(num * per_image);
    for b in 0..batches {
        let first = b * batch;
        let take = batch.min(num - first);
        let pad = |v: &[f32]| {
            let mut out = v[first * per_image..(first + take) * per_image].to_vec();
            out.resize(batch * per_image, 0.0);
            out
        };
        let given_initial = noise.as_ref().map(|v| pad(v));
        let given_steps: Option<Vec<Vec<f32>>> = step_noise
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
        if let Some((_, low)) = &lowres {
            let per_low = low.len() / num;
            let mut chunk = low[first * per_low..(first + take) * per_low].to_vec();
            chunk.resize(batch * per_low, 0.0);
            sampler.set_lowres(&chunk)?;
        }
        let labels: Vec<u32> = (first..first + batch).map(label_of).collect();
        let labels = classes.as_ref().map(|_| labels.as_slice());
        let out = sampler.sample_batch(first, &source_noise, labels, &mut |e| {
            progress.set((b * evals + e + 1) as u64)
        })?;
        images.extend_from_slice(&out[..take * per_image]);
    }
    progress.finish();
    let secs = start.elapsed().as_secs_f64();

    let shape = [num, s, s, c];
    let cols = if all_classes {
        per_class
    } else {
        (num as f64).sqrt().ceil() as usize
    };
    let grid = args.out.join("grid.png");
    save_grid(&images, shape, cols.max(1), &grid)?;
    for (k, img) in images.chunks(per_image).enumerate() {
        save_image(img, [s, s, c], &args.out.join(format!("{k:05}.png")))?;
    }
    if let Some(path) = &args.save_tensor {
        let nchw = nhwc_to_nchw(&images, shape);
        let mut meta = HashMap::new();
        meta.insert(
            "sampler".to_string(),
            args.sampler.diffusers_class().to_string(),
        );
        meta.insert("steps".to_string(), args.steps.to_string());
        meta.insert("seed".to_string(), args.seed.to_string());
        meta.insert("model".to_string(), source.description.clone());
        let view = TensorView::new(Dtype::F32, vec![num, c, s, s], bytemuck::cast_slice(&nchw))?;
        let bytes = safetensors::serialize([("sample", view)], Some(meta))?;
        atomic_write(path, &bytes)?;
        eprintln!("raw samples: {}", path.display());
    }
    eprintln!(
        "{num} images in {secs:.1} s ({:.2} images/s): {} and {}/00000.png…",
        num as f64 / secs,
        grid.display(),
        args.out.display()
    );
    Ok(())
}

/// A bar over U-Net evaluations on terminals; a line every few seconds otherwise.
struct StepProgress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    last_line: Instant,
    unit: &'static str,
}

impl StepProgress {
    fn new(total: u64) -> StepProgress {
        Self::with_unit(total, "U-Net evaluations")
    }

    fn with_unit(total: u64, unit: &'static str) -> StepProgress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(&format!(
                    "{{bar:30.cyan/blue}} {{pos}}/{{len}} {unit} [{{elapsed_precise}}<{{eta_precise}}]"
                ))
                .expect("template")
                .progress_chars("=> "),
            );
            bar
        });
        StepProgress {
            bar,
            total,
            last_line: Instant::now(),
            unit,
        }
    }

    fn set(&mut self, done: u64) {
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None => {
                if self.last_line.elapsed().as_secs_f64() >= 5.0 || done == self.total {
                    self.last_line = Instant::now();
                    eprintln!("sampling: {done}/{} {}", self.total, self.unit);
                }
            }
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}

/// `wgpu-diffusion eval-sr`: a super-resolution model on the MNIST test digits.
#[derive(clap::Args, Clone, Debug)]
pub struct EvalSrArgs {
    /// The super-resolution model (a model directory or run folder).
    #[arg(long)]
    pub model: PathBuf,
    /// Evaluate the first N test digits (default: all 10,000).
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, value_enum, default_value_t = SamplerKind::Ddim)]
    pub sampler: SamplerKind,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
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

pub fn run_eval_sr(opts: &GpuOptions, args: &EvalSrArgs) -> Result<()> {
    use crate::data::resize::{avg_pool, upsample_bicubic};
    let source = ModelSource::from_dir(&args.model)?;
    let cfg = &source.config;
    let Some(k) = cfg.sr_scale else {
        bail!(
            "{} is not a super-resolution model (no _sr_scale in its config)",
            source.description
        );
    };
    if (cfg.sample_size, cfg.out_channels) != (28, 1) {
        bail!(
            "eval-sr measures on the MNIST test digits (28x28, 1 channel); this model makes {}x{} images with {} channels",
            cfg.sample_size,
            cfg.sample_size,
            cfg.out_channels
        );
    }
    let schedule = SamplingSchedule::new(&source.scheduler, args.sampler, args.steps, None, 0.0)
        .map_err(anyhow::Error::msg)?;
    let (total, images) = crate::data::mnist::test_images()?;
    let n = args.limit.unwrap_or(total).min(total);
    if n == 0 || args.batch_size == 0 {
        bail!("--limit and --batch-size must be at least 1");
    }
    let gpu: Arc<Gpu> = Gpu::new(opts)?;
    eprintln!("device: {}", gpu.describe());
    eprintln!(
        "model: {} (x{k}); {} test digits, {} {} steps, seed {}",
        source.description,
        n,
        args.sampler.diffusers_class(),
        args.steps,
        args.seed
    );
    let batch = args.batch_size.min(n);
    let mut sampler =
        gpu.checked_build(|| Sampler::new(&gpu, cfg, schedule, batch, &SamplerOptions::default()))?;
    sampler.set_weights(&source.weights(&sampler.unet.params)?)?;
    let (low_n, per) = ((28 / k) * (28 / k), 28 * 28);
    let mut ours = SrScores::default();
    let mut bicubic = SrScores::default();
    let mut picture: Vec<Vec<f32>> = vec![Vec::new(); 4];
    let mut progress = StepProgress::with_unit(n.div_ceil(batch) as u64, "batches");
    let start = Instant::now();
    for (b, first) in (0..n).step_by(batch).enumerate() {
        let take = batch.min(n - first);
        let hr = &images[first * per..(first + take) * per];
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
        progress.set(b as u64 + 1);
    }
    progress.finish();
    for sc in [&mut ours, &mut bicubic] {
        sc.psnr /= n as f64;
        sc.ssim /= n as f64;
        sc.consistency_psnr /= n as f64;
    }
    println!("| x{k}, {n} MNIST test digits | PSNR (dB) | SSIM | consistency PSNR (dB) |");
    println!("|---|---|---|---|");
    println!(
        "| bicubic | {:.2} | {:.3} | {:.2} |",
        bicubic.psnr, bicubic.ssim, bicubic.consistency_psnr
    );
    println!(
        "| {} ({} {} steps) | {:.2} | {:.3} | {:.2} |",
        source.description,
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
