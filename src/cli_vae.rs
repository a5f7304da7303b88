//! `wgpu-diffusion vae --model DIR reconstruct|encode|decode`: look at what an AutoencoderKL
//! keeps. The model is a diffusers VAE directory (`config.json` +
//! `diffusion_pytorch_model.safetensors`, e.g. Stable Diffusion's `vae/`); images go in as the
//! training data does (resized and centre-cropped to `sample_size`, values in [−1, 1]); latents go
//! out and in as a safetensors tensor `latent`, f32 [N, L, h, w] (NCHW, diffusers' layout),
//! unscaled: multiply by the config's `scaling_factor` for a diffusion model, as diffusers'
//! pipelines do. Every input and output path is checked before the GPU starts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use safetensors::{Dtype, tensor::TensorView};

use crate::cli_sample::{check_output_dir, check_output_file};
use crate::gpu::{GemmPathChoice, Gpu, GpuOptions, Precision};
use crate::io::atomic::atomic_write;
use crate::io::images::{save_grid, save_image};
use crate::io::model_dir::read_model_weights;
use crate::io::tensors::LoadedTensors;
use crate::metrics::{psnr, to_unit};
use crate::nn::{Vae, VaeConfig};
use crate::sample::{nchw_to_nhwc, nhwc_to_nchw};
use crate::train::vae_run::{VaeResumePoint, VaeRunOptions, check_vae_run, run_vae};
use crate::train::vae_trainer::{RecLoss, VaeTrainConfig};

#[derive(clap::Args, Clone, Debug)]
pub struct VaeArgs {
    /// A diffusers AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Images per VAE batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[command(subcommand)]
    pub action: VaeAction,
}

#[derive(clap::Subcommand, Clone, Debug)]
pub enum VaeAction {
    /// Encode and decode images (the posterior's mode): writes originals beside their
    /// reconstructions (grid.png, originals on the top row of each pair), one PNG per
    /// reconstruction, and prints the PSNR (images in [0, 1], MAX = 1).
    Reconstruct {
        /// An image or a folder of images.
        #[arg(long)]
        input: PathBuf,
        #[arg(long, default_value = "reconstructions")]
        out: PathBuf,
    },
    /// Encode images to latents: tensor `latent`, f32 [N, L, h, w], the posterior's mode,
    /// unscaled.
    Encode {
        #[arg(long)]
        input: PathBuf,
        /// The .safetensors file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Decode latents (tensor `latent`, f32 [N, L, h, w], unscaled) to PNG images.
    Decode {
        #[arg(long)]
        input: PathBuf,
        #[arg(long, default_value = "decoded")]
        out: PathBuf,
    },
}

/// The VAE's config from its directory, with a warning when it had no `scaling_factor`.
fn read_config(dir: &Path) -> Result<VaeConfig> {
    let vae = crate::sample::LatentVae::from_dir(dir).context("--model")?;
    for n in &vae.notes {
        eprintln!("warning: {n}");
    }
    Ok(vae.config)
}

/// The images of `input` (a file, or a folder's image files in name order), as NHWC values.
fn read_images(input: &Path, config: &VaeConfig) -> Result<(Vec<PathBuf>, Vec<f32>)> {
    let files: Vec<PathBuf> = if input.is_dir() {
        let mut f: Vec<PathBuf> = std::fs::read_dir(input)
            .with_context(|| format!("--input {}", input.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|e| {
                    matches!(
                        e.to_ascii_lowercase().to_str(),
                        Some("png" | "jpg" | "jpeg")
                    )
                })
            })
            .collect();
        f.sort();
        f
    } else {
        vec![input.to_path_buf()]
    };
    if files.is_empty() {
        bail!("--input {}: no PNG or JPEG images there", input.display());
    }
    let mut values = Vec::new();
    for f in &files {
        let img = crate::data::open_image(f)
            .map_err(|e| anyhow!("--input {}: not a readable image: {e}", f.display()))?;
        values.extend(crate::data::to_model_input(
            img,
            config.sample_size,
            config.in_channels,
        ));
    }
    Ok((files, values))
}

/// Latents [N, L, h, w] from `--input`, checked against the VAE.
fn read_latents(input: &Path, config: &VaeConfig) -> Result<(usize, Vec<f32>)> {
    let file =
        LoadedTensors::read(input).with_context(|| format!("--input {}", input.display()))?;
    let (shape, values) = file
        .get("latent")
        .with_context(|| format!("--input {}", input.display()))?;
    let (l, s) = (config.latent_channels, config.latent_size());
    if shape.len() != 4 || shape[1..] != [l, s, s] || shape[0] == 0 {
        bail!(
            "--input {}: tensor `latent` has shape {shape:?}; this VAE decodes [N, {l}, {s}, {s}]",
            input.display()
        );
    }
    if values.iter().any(|v| !v.is_finite()) {
        bail!(
            "--input {}: `latent` holds NaN or infinite values",
            input.display()
        );
    }
    let n = shape[0];
    Ok((n, nchw_to_nhwc(&values, [n, l, s, s])))
}

/// What each batch runs: encode (with ε), decode, or both.
#[derive(Clone, Copy, PartialEq)]
enum Pass {
    Encode,
    Decode,
    Both,
}

/// Runs `pass` over `inputs` (NHWC images or latents) in batches of the VAE, with the
/// posterior's mode (ε = 0); returns the latents (Encode) or images (Decode, Both), NHWC.
fn run_batches(
    gpu: &std::sync::Arc<Gpu>,
    vae: &Vae,
    pass: Pass,
    inputs: &[f32],
) -> Result<Vec<f32>> {
    let b = vae.batch;
    let (in_len, out_len) = match pass {
        Pass::Encode => (vae.sample.value.numel(), vae.latent.value.numel()),
        Pass::Decode => (vae.latent.value.numel(), vae.output.value.numel()),
        Pass::Both => (vae.sample.value.numel(), vae.output.value.numel()),
    };
    let (per_in, per_out) = (in_len / b, out_len / b);
    let n = inputs.len() / per_in;
    let mut out = Vec::with_capacity(n * per_out);
    let mut rec = gpu.recorder();
    match pass {
        Pass::Encode => {
            vae.encode(&mut rec)?;
            vae.sample_latent(&mut rec)?;
        }
        Pass::Decode => vae.decode(&mut rec)?,
        Pass::Both => vae.forward(&mut rec)?,
    }
    let plan = rec.finish();
    // ε = 0: z = μ, the posterior's mode (a new tensor is zero-filled).
    for first in (0..n).step_by(b) {
        let count = (n - first).min(b);
        let mut chunk = inputs[first * per_in..(first + count) * per_in].to_vec();
        chunk.resize(in_len, 0.0);
        let target = if pass == Pass::Decode {
            &vae.latent.value
        } else {
            &vae.sample.value
        };
        gpu.write(target, &chunk)?;
        gpu.run(&[&plan])?;
        let result = if pass == Pass::Encode {
            &vae.latent.value
        } else {
            &vae.output.value
        };
        let values = gpu.read(result)?;
        out.extend_from_slice(&values[..count * per_out]);
    }
    if out.iter().any(|v| !v.is_finite()) {
        bail!("the VAE produced NaN or infinite values: its weights may be damaged");
    }
    Ok(out)
}

pub fn run(opts: &GpuOptions, args: &VaeArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let config = read_config(&args.model)?;
    for (what, c) in [
        ("in_channels", config.in_channels),
        ("out_channels", config.out_channels),
    ] {
        if c != 1 && c != 3 {
            bail!(
                "--model {}: `{what}` is {c}; images go in and out as grey (1) or RGB (3)",
                args.model.display()
            );
        }
    }
    // Inputs and outputs are checked before the GPU starts.
    enum Input {
        Images(Vec<PathBuf>, Vec<f32>),
        Latents(usize, Vec<f32>),
    }
    let input = match &args.action {
        VaeAction::Reconstruct { input, out } => {
            check_output_dir("--out", out)?;
            let (files, values) = read_images(input, &config)?;
            Input::Images(files, values)
        }
        VaeAction::Encode { input, out, .. } => {
            check_output_file("--out", out, "latents.safetensors")?;
            let (files, values) = read_images(input, &config)?;
            Input::Images(files, values)
        }
        VaeAction::Decode { input, out } => {
            check_output_dir("--out", out)?;
            let (n, values) = read_latents(input, &config)?;
            Input::Latents(n, values)
        }
    };
    let n = match &input {
        Input::Images(files, _) => files.len(),
        Input::Latents(n, _) => *n,
    };
    let gpu = Gpu::new(opts)?;
    eprintln!("adapter: {}", gpu.describe());
    let vae = gpu
        .checked_build(|| Vae::new(&gpu, &config, args.batch_size.min(n)))
        .map_err(|e: crate::gpu::GpuError| anyhow!("{e} (try a smaller --batch-size)"))?;
    let weights = read_model_weights(&args.model, &vae.params)?;
    vae.params.write_values(&gpu, &weights)?;
    let (s, ls, l) = (
        config.sample_size,
        config.latent_size(),
        config.latent_channels,
    );
    match (&args.action, input) {
        (VaeAction::Reconstruct { out, .. }, Input::Images(files, images)) => {
            let rec = run_batches(&gpu, &vae, Pass::Both, &images)?;
            write_reconstructions(
                out,
                &files,
                &images,
                &rec,
                [s, config.in_channels, config.out_channels],
            )
        }
        (VaeAction::Encode { out, .. }, Input::Images(_, images)) => {
            let latents = run_batches(&gpu, &vae, Pass::Encode, &images)?;
            write_latents(
                out,
                &nhwc_to_nchw(&latents, [n, ls, ls, l]),
                [n, l, ls, ls],
                &config,
            )
        }
        (VaeAction::Decode { out, .. }, Input::Latents(_, latents)) => {
            let images = run_batches(&gpu, &vae, Pass::Decode, &latents)?;
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
            for (i, img) in images.chunks(s * s * config.out_channels).enumerate() {
                save_image(
                    img,
                    [s, s, config.out_channels],
                    &out.join(format!("{i:05}.png")),
                )?;
            }
            save_grid(
                &images,
                [n, s, s, config.out_channels],
                n.min(8),
                &out.join("grid.png"),
            )?;
            eprintln!("{n} decoded images in {}", out.display());
            Ok(())
        }
        _ => unreachable!("the input matches its action"),
    }
}

/// Writes grid.png (rows of up to 8 originals, each followed by their reconstructions), one PNG
/// per reconstruction, and prints the PSNR per image and overall.
fn write_reconstructions(
    out: &Path,
    files: &[PathBuf],
    images: &[f32],
    recs: &[f32],
    [s, cin, cout]: [usize; 3],
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (per_in, per_out) = (s * s * cin, s * s * cout);
    let mut total = 0.0;
    for (i, (img, rec)) in images.chunks(per_in).zip(recs.chunks(per_out)).enumerate() {
        save_image(rec, [s, s, cout], &out.join(format!("{i:05}.png")))?;
        let p = if cin == cout {
            psnr(&to_unit(img), &to_unit(rec))
        } else {
            f64::NAN
        };
        total += p;
        eprintln!("{}: PSNR {p:.2} dB", files[i].display());
    }
    let n = files.len();
    // Each row: up to 8 originals, then the same count of reconstructions.
    let c = cin.max(cout);
    let widen = |v: &[f32], ch: usize| -> Vec<f32> {
        v.chunks(ch)
            .flat_map(|px| (0..c).map(move |k| px[k.min(ch - 1)]))
            .collect()
    };
    let (wide_in, wide_out) = (widen(images, cin), widen(recs, cout));
    let mut grid = Vec::new();
    let mut rows = 0;
    for first in (0..n).step_by(8) {
        let count = (n - first).min(8);
        let per = s * s * c;
        grid.extend_from_slice(&wide_in[first * per..(first + count) * per]);
        grid.resize(grid.len() + (8 - count) * per, 1.0);
        grid.extend_from_slice(&wide_out[first * per..(first + count) * per]);
        grid.resize(grid.len() + (8 - count) * per, 1.0);
        rows += 2;
    }
    save_grid(&grid, [rows * 8, s, s, c], 8, &out.join("grid.png"))?;
    println!("PSNR {:.2} dB (mean of {n} images)", total / n as f64);
    Ok(())
}

fn write_latents(out: &Path, nchw: &[f32], shape: [usize; 4], config: &VaeConfig) -> Result<()> {
    let mut meta = HashMap::new();
    meta.insert(
        "scaling_factor".to_string(),
        config.scaling_factor.to_string(),
    );
    meta.insert(
        "note".to_string(),
        "unscaled latents: multiply by scaling_factor for a diffusion model".to_string(),
    );
    let view = TensorView::new(Dtype::F32, shape.to_vec(), bytemuck::cast_slice(nchw))?;
    let bytes = safetensors::serialize([("latent", view)], Some(meta))?;
    atomic_write(out, &bytes)?;
    eprintln!("latents {:?} in {}", shape, out.display());
    Ok(())
}

/// `train-vae` flags. With `--resume DIR` a run continues with the options stored in its last
/// checkpoint: the flags that would change its steps' bits are refused there (clap says which),
/// and `--steps`, `--checkpoint-every`, `--keep-checkpoints`, `--sample-every` default to the
/// run's own.
#[derive(clap::Args, Clone, Debug)]
pub struct TrainVaeArgs {
    /// VAE preset (mnist-vae: 1×32×32 → 4×8×8), unless --model-config is given.
    #[arg(long, default_value = "mnist-vae", conflicts_with = "resume")]
    pub model: String,
    /// A diffusers AutoencoderKL config.json instead of a preset (1 input and output channel).
    #[arg(long, conflicts_with = "resume")]
    pub model_config: Option<PathBuf>,
    /// Optimizer steps of the whole run [default: 2000; with --resume: the run's, and a larger
    /// number trains a finished run further].
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long, default_value_t = 16, conflicts_with = "resume")]
    pub batch_size: usize,
    /// Adam's learning rate (betas 0.5, 0.9).
    #[arg(long, default_value_t = 1e-3, conflicts_with = "resume")]
    pub lr: f64,
    /// Weight of the KL term of the loss.
    #[arg(long, default_value_t = 1e-6, conflicts_with = "resume")]
    pub kl_weight: f64,
    /// The reconstruction term, summed over each image and averaged over the batch: l1
    /// (1/B)Σ|x − x̂| (CompVis' autoencoders) or l2 (1/B)Σ(x − x̂)².
    #[arg(long, value_enum, default_value_t = RecLoss::L1, conflicts_with = "resume")]
    pub rec_loss: RecLoss,
    /// Seed of the initial weights, the data order and the posterior's ε.
    #[arg(long, default_value_t = 0, conflicts_with = "resume")]
    pub seed: u64,
    /// Write checkpoints/step-XXXXXXXX.safetensors every N steps, and always at the end (0: only
    /// at the end) [default: 500; with --resume: the run's].
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<u64>,
    /// Checkpoints to keep; older ones are deleted [default: 3; with --resume: the run's].
    #[arg(long, value_name = "N")]
    pub keep_checkpoints: Option<usize>,
    /// Write samples/step-XXXXXXXX.png (held-out test digits above their reconstructions) every
    /// N steps and at the end, and log their PSNR as `test_psnr` in metrics.jsonl (0: off)
    /// [default: 500; with --resume: the run's].
    #[arg(long, value_name = "N")]
    pub sample_every: Option<u64>,
    /// Run folder (default runs/vae-<unix time>): metrics.jsonl, checkpoints/, samples/, vae/,
    /// reconstructions.png, loss.png. A folder that holds a run is refused (resume it instead).
    #[arg(long, conflicts_with = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run in DIR from its last checkpoint (a run killed before its first starts
    /// again from step 0), with the options stored there; gives the same weights as a run never
    /// stopped. Not with --model, --model-config, --batch-size, --lr, --kl-weight, --rec-loss,
    /// --seed or --out. A finished run is an error unless --steps asks for more.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
}

impl TrainVaeArgs {
    /// The VAE config and options of a new run (flags and defaults, `precision` from
    /// `--precision`), checked.
    fn new_run(&self, precision: Precision) -> Result<(VaeConfig, VaeRunOptions, PathBuf)> {
        let config = match &self.model_config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("--model-config {}", path.display()))?;
                VaeConfig::from_json(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?
            }
            None => VaeConfig::preset(&self.model).ok_or_else(|| {
                anyhow!(
                    "unknown VAE preset `{}` (choose {}, or --model-config FILE)",
                    self.model,
                    VaeConfig::PRESETS.join(", ")
                )
            })?,
        };
        let opts = VaeRunOptions {
            steps: self.steps.unwrap_or(2000),
            checkpoint_every: self.checkpoint_every.unwrap_or(500),
            keep_checkpoints: self.keep_checkpoints.unwrap_or(3),
            sample_every: self.sample_every.unwrap_or(500),
            train: VaeTrainConfig {
                batch_size: self.batch_size,
                lr: self.lr,
                kl_weight: self.kl_weight,
                seed: self.seed,
                rec_loss: self.rec_loss,
                precision,
            },
        };
        let out = self.out.clone().unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            PathBuf::from(format!("runs/vae-{t}"))
        });
        check_output_dir("--out", &out)?;
        check_vae_run(&config, &opts, &out)?;
        Ok((config, opts, out))
    }

    /// The resume point of `--resume DIR` with this command's overrides, checked; the GEMM path
    /// set to the run's.
    fn resumed_run(
        &self,
        dir: &Path,
        gpu: &mut GpuOptions,
    ) -> Result<(VaeRunOptions, VaeResumePoint)> {
        let point = VaeResumePoint::read(dir)?;
        let mut opts = point.options.clone();
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { opts.$f = v; } )* };
        }
        set!(steps, checkpoint_every, keep_checkpoints, sample_every);
        opts.validate()?;
        if point.check_steps(&opts)? {
            eprintln!(
                "note: the run in {} reached its last step ({}) but was stopped before writing its end: writing it now",
                dir.display(),
                point.step
            );
        }
        // ... and the precision it started with.
        if opts.train.precision != gpu.precision {
            if point.checkpoint.is_some() {
                eprintln!(
                    "note: --resume {} continues in {}, the precision the run started with",
                    dir.display(),
                    opts.train.precision
                );
            }
            gpu.precision = opts.train.precision;
        }
        if let Some(path) = &point.gemm_path {
            // A resumed run keeps the kernel path it trained with (the same bits).
            let stored = if path == "portable" {
                GemmPathChoice::Portable
            } else {
                GemmPathChoice::Subgroup
            };
            if gpu
                .gemm_path
                .is_some_and(|c| c != GemmPathChoice::Auto && c != stored)
            {
                bail!(
                    "--resume {}: the run trained on the {path} GEMM path, which it keeps (the same bits); drop --gemm-path",
                    dir.display()
                );
            }
            gpu.gemm_path = Some(stored);
        }
        Ok((opts, point))
    }
}

/// `train-vae`: trains an AutoencoderKL on MNIST (or continues a run) and exports it (see
/// `train::vae_run`). Everything is checked before the GPU starts.
pub fn run_train_vae(opts: &GpuOptions, args: &TrainVaeArgs) -> Result<()> {
    let mut gpu_opts = opts.clone();
    let (config, run_opts, out, point) = match &args.resume {
        None => {
            let (config, run_opts, out) = args.new_run(opts.precision)?;
            (config, run_opts, out, None)
        }
        Some(dir) => {
            let (run_opts, point) = args.resumed_run(dir, &mut gpu_opts)?;
            (point.model.clone(), run_opts, dir.clone(), Some(point))
        }
    };
    let gpu = Gpu::new(&gpu_opts)?;
    eprintln!("adapter: {}", gpu.describe());
    let stop = crate::cli_train::stop_on_interrupt()?;
    let summary = run_vae(gpu, &config, &run_opts, &out, point.as_ref(), &stop)?;
    if summary.interrupted {
        println!(
            "stopped at step {}; continue with `wgpu-diffusion train-vae --resume {}`",
            summary.step,
            out.display()
        );
        return Ok(());
    }
    let tail: Vec<f32> = summary.losses.iter().rev().take(100).map(|l| l.1).collect();
    println!(
        "done: {} steps, loss {:.3} (mean of the last {}), scaling_factor {:.5}, test PSNR {:.2} dB; VAE in {}",
        summary.step,
        tail.iter().sum::<f32>() / tail.len().max(1) as f32,
        tail.len(),
        summary.scaling_factor.unwrap_or(f64::NAN),
        summary.test_psnr.unwrap_or(f64::NAN),
        summary.out.join("vae").display()
    );
    Ok(())
}
