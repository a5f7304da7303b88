//! Masks the right half of an MNIST test digit and lets a trained model regenerate it (RePaint
//! with DDIM, the library calls behind `sample --inpaint`).
//!
//!     cargo run --release --example inpaint_digit -- runs/<run>/model [test index] [out.png]
//!
//! The model is any model directory `sample --model` takes (a run folder works too), trained on
//! MNIST. Writes `out.png` (default `inpaint.png`): the original digit, the masked input (the
//! region to regenerate in mid-grey), then 6 completions; prints the path and the time.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use wgpu_diffusion::data::mnist::{decode_idx3, gunzip};
use wgpu_diffusion::diffusion::scheduler::{SamplerKind, SamplingSchedule};
use wgpu_diffusion::gpu::{Gpu, GpuOptions};
use wgpu_diffusion::io::images::save_grid;
use wgpu_diffusion::sample::{ModelSource, Noise, Sampler, SamplerOptions};

const COMPLETIONS: usize = 6;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(model) = args.first() else {
        bail!("usage: inpaint_digit MODEL_DIR [test index] [out.png]");
    };
    let index: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(0);
    let out = PathBuf::from(args.get(2).map(String::as_str).unwrap_or("inpaint.png"));
    let source = ModelSource::from_dir(&PathBuf::from(model))?;
    let (s, c) = (source.config.sample_size, source.config.in_channels);

    // The MNIST test set that ships with the project (data/mnist/, CC BY-SA 3.0).
    let gz = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/mnist/t10k-images.idx3-ubyte.gz"),
    )
    .context("reading the MNIST test images")?;
    let (n, rows, cols, pixels) = decode_idx3(&gunzip(&gz)?)?;
    if index >= n {
        bail!("test index {index} is out of range (0..{n})");
    }
    let digit = image::GrayImage::from_raw(
        cols as u32,
        rows as u32,
        pixels[index * rows * cols..(index + 1) * rows * cols].to_vec(),
    )
    .context("digit size")?;
    let known = wgpu_diffusion::data::to_model_input(image::DynamicImage::ImageLuma8(digit), s, c);
    // Keep the left half, regenerate the right half.
    let keep: Vec<f32> = (0..s * s * c)
        .map(|i| if (i / c) % s < s / 2 { 1.0 } else { 0.0 })
        .collect();

    let gpu = Gpu::new(&GpuOptions::default())?;
    let schedule = SamplingSchedule::repaint(&source.scheduler, SamplerKind::Ddim, 50, 0.0, 10, 10)
        .map_err(anyhow::Error::msg)?;
    let evals = schedule.evals.len();
    let options = SamplerOptions {
        guidance: None,
        inpaint: Some((known.clone(), keep.clone())),
        vae: None,
        context_tokens: None,
        size: None,
    };
    let mut sampler = Sampler::new(&gpu, &source.config, schedule, COMPLETIONS, &options)?;
    sampler.set_weights(&source.weights(&sampler.unet.params)?)?;
    let labels = source
        .config
        .num_class_embeds
        .map(|_| vec![0u32; COMPLETIONS]);
    let t = Instant::now();
    let completions = sampler.sample_batch(0, &Noise::Seeded(0), labels.as_deref(), &mut |_| {})?;

    let masked: Vec<f32> = known
        .iter()
        .zip(&keep)
        .map(|(&v, &k)| if k == 1.0 { v } else { 0.0 })
        .collect();
    let strip = [known, masked, completions].concat();
    save_grid(&strip, [COMPLETIONS + 2, s, s, c], COMPLETIONS + 2, &out)?;
    println!(
        "{}: original, masked input, {COMPLETIONS} completions ({evals} U-Net evaluations, {:.1} s on {})",
        out.display(),
        t.elapsed().as_secs_f64(),
        gpu.describe()
    );
    Ok(())
}
