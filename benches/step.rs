//! `cargo bench --bench step`: what `wgpu-diffusion bench` and `bench --sample` measure — whole
//! training steps (submit + wait each, after two warm-up steps) and whole DDIM sampling batches of
//! a preset, one JSON line each. `WGPU_DIFFUSION_BENCH_MODEL` (default tiny16),
//! `WGPU_DIFFUSION_BENCH_BATCH` (32) and `WGPU_DIFFUSION_BENCH_STEPS` (5) choose the run; the
//! README's speed table uses the `bench` subcommand with the same code.

use std::time::Instant;

use wgpu_diffusion::diffusion::scheduler::SamplerKind;
use wgpu_diffusion::gpu::{Gpu, GpuOptions};

fn setting(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn main() -> anyhow::Result<()> {
    let start = Instant::now();
    let model = setting("WGPU_DIFFUSION_BENCH_MODEL", "tiny16");
    let batch: usize = setting("WGPU_DIFFUSION_BENCH_BATCH", "32").parse()?;
    let steps: usize = setting("WGPU_DIFFUSION_BENCH_STEPS", "5").parse()?;
    let gpu = Gpu::new(&GpuOptions::default())?;
    eprintln!("adapter: {}", gpu.describe());
    let train = wgpu_diffusion::bench::train_steps(
        &gpu,
        (&model, None),
        batch,
        steps,
        2,
        false,
        false,
        (
            start,
            &std::rc::Rc::new(wgpu_diffusion::dist::World::single()),
        ),
    )?;
    println!("{}", serde_json::to_string(&train)?);
    let sample = wgpu_diffusion::bench::sample_batches(
        &gpu,
        (&model, None),
        SamplerKind::Ddim,
        10,
        batch,
        2,
    )?;
    println!("{}", serde_json::to_string(&sample)?);
    Ok(())
}
