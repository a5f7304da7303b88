//! `cargo bench --bench kernels`: what `wgpu-diffusion bench --kernels` measures — GFLOP/s of the
//! GEMM, conv and attention kernels at U-Net shapes, one JSON line each, on the adapter
//! `Gpu::new` picks (set `WGPU_DIFFUSION_BENCH_REPS`, default 3, for the median's repetitions).

use wgpu_diffusion::gpu::{Gpu, GpuOptions};

fn main() -> anyhow::Result<()> {
    let reps = std::env::var("WGPU_DIFFUSION_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3usize);
    let gpu = Gpu::new(&GpuOptions::default())?;
    eprintln!("adapter: {}", gpu.describe());
    let results = wgpu_diffusion::bench::kernels(&gpu, reps.max(1), |r| {
        println!(
            "{}",
            serde_json::to_string(r).expect("a kernel result serializes")
        );
    })?;
    eprintln!("{} kernel benchmarks", results.len());
    Ok(())
}
