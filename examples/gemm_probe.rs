//! Times the pieces of the subgroup SGEMM separately (packing vs the GEMM kernel).
//!
//!     cargo run --release --example gemm_probe
//!
//! Prints milliseconds per run of: the two operand packs alone, and pack + GEMM.
use std::time::Instant;

use wgpu_diffusion::gpu::{Gpu, GpuOptions};
use wgpu_diffusion::ops::gemm::{GemmShape, MatRef, gemm};
use wgpu_diffusion::ops::pack::pack_matrix;

fn main() -> anyhow::Result<()> {
    let gpu = Gpu::new(&GpuOptions::default())?;
    println!("{}", gpu.describe());
    let n = 1024;
    let a = gpu.tensor(&[n, n], "A");
    let b = gpu.tensor(&[n, n], "B");
    let c = gpu.tensor(&[n, n], "C");
    let mut rec = gpu.recorder();
    pack_matrix(&mut rec, &MatRef::dense(&a, n), n, n, n, 1, 1, "A")?;
    pack_matrix(&mut rec, &MatRef::dense(&b, n), n, n, n, 1, 1, "B")?;
    let packs = rec.finish();
    let mut rec = gpu.recorder();
    gemm(
        &mut rec,
        GemmShape::new(n, n, n),
        MatRef::dense(&a, n),
        MatRef::dense(&b, n),
        None,
        MatRef::dense(&c, n),
    )?;
    let full = rec.finish();
    for (name, plan) in [("packs", &packs), ("pack+gemm", &full)] {
        gpu.run(&[plan])?;
        let t = Instant::now();
        for _ in 0..5 {
            gpu.run(&[plan])?;
        }
        println!("{name}: {:.2} ms", t.elapsed().as_secs_f64() * 1e3 / 5.0);
    }
    Ok(())
}
