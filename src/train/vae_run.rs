//! A VAE training run on MNIST (issue 22's `train-vae`, first form): steps of [`VaeTrainer`] over
//! seeded epoch permutations of the training digits (padded to the VAE's size with the
//! background value), `metrics.jsonl`, then `scaling_factor` by Rombach's scale_by_std (1 / std
//! of sampled latents of ≥ 1024 training digits), the exported diffusers directory `vae/`
//! (config.json + diffusion_pytorch_model.safetensors, written under a temporary name and renamed
//! into place) and `reconstructions.png` (held-out test digits above their reconstructions) with
//! their PSNR on the 28×28 crop. Not yet: checkpoints and resume, latent diffusion on top.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};

use super::vae_trainer::{VaeTrainConfig, VaeTrainer, crop_psnr, pad_digits};
use crate::data::epoch_order;
use crate::gpu::Gpu;
use crate::io::atomic::atomic_write;
use crate::io::images::save_grid;
use crate::io::model_dir::MODEL_WEIGHTS;
use crate::io::tensors::serialize_named;
use crate::nn::VaeConfig;
use crate::ops::noise::{purpose, random_normal, write_rng_state};
use crate::progress::ConsoleProgress;

/// What a finished VAE run reports.
#[derive(Debug)]
pub struct VaeRunSummary {
    pub out: PathBuf,
    /// (step, loss) of every step.
    pub losses: Vec<(u64, f32)>,
    pub scaling_factor: f64,
    /// Mean PSNR of the held-out reconstructions (28×28 crop, [0, 1]).
    pub test_psnr: f64,
}

/// Digits on the VAE's canvas: MNIST's 28×28 padded to `size` (≥ 28) with the background.
fn canvas(images: &[f32], n: usize, size: usize) -> Result<Vec<f32>> {
    if size < 28 || !(size - 28).is_multiple_of(2) {
        bail!(
            "the VAE's sample_size {size} cannot hold MNIST's 28×28 digits with equal padding (28, 30, 32, …)"
        );
    }
    Ok(pad_digits(images, n, 28, (size - 28) / 2))
}

/// Everything a run needs checked before the GPU starts: the options, a VAE that fits MNIST's
/// digits, and an `out` that holds no VAE run yet.
pub fn check_vae_run(model: &VaeConfig, cfg: &VaeTrainConfig, out: &Path) -> Result<()> {
    cfg.validate()?;
    if model.in_channels != 1 || model.out_channels != 1 {
        bail!("train-vae trains on MNIST: the VAE needs 1 input and 1 output channel");
    }
    canvas(&[], 0, model.sample_size)?;
    if cfg.batch_size > MNIST_TRAIN_IMAGES {
        bail!(
            "--batch-size {} is larger than the data set ({MNIST_TRAIN_IMAGES} digits)",
            cfg.batch_size
        );
    }
    if out.join("vae").exists() || out.join("metrics.jsonl").exists() {
        bail!(
            "{} already holds a VAE run; choose another --out",
            out.display()
        );
    }
    Ok(())
}

/// MNIST's training digits.
const MNIST_TRAIN_IMAGES: usize = 60_000;

/// Runs `steps` optimizer steps and writes the run into `out` (which must not hold a run).
pub fn run_vae(
    gpu: Arc<Gpu>,
    model: &VaeConfig,
    cfg: VaeTrainConfig,
    steps: u64,
    out: &Path,
) -> Result<VaeRunSummary> {
    check_vae_run(model, &cfg, out)?;
    let data = crate::data::mnist::load(28, 1)?;
    let (b, size, per) = (cfg.batch_size, model.sample_size, 28 * 28);
    let mut trainer = gpu
        .checked_build(|| VaeTrainer::new(gpu.clone(), cfg.clone(), model))
        .map_err(|e| anyhow!("{e} (try a smaller --batch-size)"))?;
    trainer.set_weights(&crate::nn::init::default_init(
        &trainer.vae.params,
        cfg.seed,
    ))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut metrics = std::fs::File::create(out.join("metrics.jsonl"))
        .with_context(|| format!("creating {}", out.join("metrics.jsonl").display()))?;
    let mut progress = ConsoleProgress::new("train-vae", "steps");
    progress.start(0, steps);
    let per_epoch = (data.len / b) as u64;
    let mut losses = Vec::new();
    let mut order = (u64::MAX, Vec::new());
    for step in 0..steps {
        let (epoch, k) = (step / per_epoch, (step % per_epoch) as usize);
        if order.0 != epoch {
            order = (epoch, epoch_order(data.len, cfg.seed, epoch));
        }
        let order = &order.1;
        let mut batch = Vec::with_capacity(b * per);
        for &i in &order[k * b..(k + 1) * b] {
            batch.extend_from_slice(&data.images[i as usize * per..(i as usize + 1) * per]);
        }
        let (loss, rec, kl) = trainer.train_step(&canvas(&batch, b, size)?)?;
        losses.push((step + 1, loss));
        writeln!(
            metrics,
            "{}",
            serde_json::json!({"step": step + 1, "loss": loss, "rec_loss": rec, "kl": kl})
        )?;
        progress.set_message(format!("loss {loss:.2}"));
        progress.set(step + 1, true);
    }
    progress.finish();
    let scaling_factor = scale_by_std(&trainer, &data.images, data.len)?;
    let mut exported = model.clone();
    exported.scaling_factor = scaling_factor;
    exported.scaling_factor_defaulted = false;
    export_vae(&trainer, &exported, &out.join("vae"))?;
    let test_psnr = write_reconstructions(&trainer, out)?;
    Ok(VaeRunSummary {
        out: out.to_path_buf(),
        losses,
        scaling_factor,
        test_psnr,
    })
}

/// 1 / std of z = μ + σ·ε over (at least) the first 1024 training digits (Rombach et al. 2022,
/// appendix G, `scale_by_std`), ε from the run's RNG.
fn scale_by_std(trainer: &VaeTrainer, images: &[f32], len: usize) -> Result<f64> {
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
            &canvas(digits, b, vae.config.sample_size)?,
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
/// it into place.
fn export_vae(trainer: &VaeTrainer, config: &VaeConfig, dir: &Path) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let tmp = parent.join(".vae.tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    let weights = trainer.gpu.read(&trainer.vae.params.params)?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let bytes = serialize_named(&trainer.vae.params, &[("", &weights)], meta)?;
    atomic_write(&tmp.join(MODEL_WEIGHTS), &bytes)?;
    atomic_write(&tmp.join("config.json"), config.to_json().as_bytes())?;
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    Ok(())
}

/// Reconstructs the first test digits (the posterior's mode), writes them under their originals
/// to `reconstructions.png`, and returns their mean PSNR on the 28×28 crop.
fn write_reconstructions(trainer: &VaeTrainer, out: &Path) -> Result<f64> {
    let vae = &trainer.vae;
    let (g, b, size) = (&trainer.gpu, vae.batch, vae.config.sample_size);
    let (n_test, test) = crate::data::mnist::test_images().map_err(|e| anyhow!(e))?;
    let n = b.min(n_test);
    let mut digits = canvas(&test[..n * 784], n, size)?;
    digits.resize(b * size * size, -1.0);
    g.write(&vae.sample.value, &digits)?;
    g.write(&vae.eps, &vec![0.0; vae.eps.numel()])?;
    let mut rec = g.recorder();
    vae.forward(&mut rec)?;
    g.run(&[&rec.finish()])?;
    let recon = g.read(&vae.output.value)?;
    let psnr = crop_psnr(&digits, &recon, n, size, 28);
    let per = size * size;
    let mut grid = digits[..n * per].to_vec();
    grid.extend_from_slice(&recon[..n * per]);
    save_grid(
        &grid,
        [2 * n, size, size, 1],
        n,
        &out.join("reconstructions.png"),
    )?;
    Ok(psnr)
}
