//! `wgpu-diffusion bench --kernels`: GFLOP/s of the GEMM-shaped kernels at U-Net shapes, one
//! JSON line per case. Timing is wall clock around submit + wait (lavapipe's timestamp queries
//! report CPU times and are unreliable), median of `reps` runs after a warm-up that also pays
//! the driver's JIT compile.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;

use crate::gpu::{Gpu, Plan};
use crate::ops::conv2d::{
    Conv2dGeometry, ConvDims, conv_dims, conv2d_backward_input, conv2d_backward_weight,
    conv2d_forward,
};
use crate::ops::gemm::{GemmShape, MatRef, gemm};

#[derive(serde::Serialize)]
pub struct KernelResult {
    pub kernel: &'static str,
    pub shape: String,
    pub gflops: f64,
    pub median_ms: f64,
    pub path: String,
    pub adapter: String,
}

fn time_plan(gpu: &Gpu, plan: &Plan, reps: usize) -> Result<f64> {
    gpu.run(&[plan])?;
    gpu.run(&[plan])?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        gpu.run(&[plan])?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn fill(gpu: &Gpu, shape: &[usize], label: &str, seed: u64) -> Result<crate::gpu::Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = crate::reference::test_data(n, seed)
        .iter()
        .map(|&v| v as f32)
        .collect();
    Ok(gpu.tensor_from(shape, &data, label)?)
}

/// Runs the kernel benchmark; `emit` receives each result as it is measured.
pub fn kernels(
    gpu: &Arc<Gpu>,
    reps: usize,
    mut emit: impl FnMut(&KernelResult),
) -> Result<Vec<KernelResult>> {
    let mut results = Vec::new();
    let mut push = |r: KernelResult, results: &mut Vec<KernelResult>| {
        emit(&r);
        results.push(r);
    };
    let path = gpu.gemm_path.to_string();
    let adapter = gpu.adapter.name.clone();

    // SGEMM 1024³
    {
        let n = 1024;
        let (a, b, c) = (
            fill(gpu, &[n, n], "A", 1)?,
            fill(gpu, &[n, n], "B", 2)?,
            gpu.tensor(&[n, n], "C"),
        );
        let shape = GemmShape::new(n, n, n);
        let mut rec = gpu.recorder();
        gemm(
            &mut rec,
            shape,
            MatRef::dense(&a, n),
            MatRef::dense(&b, n),
            None,
            MatRef::dense(&c, n),
        )?;
        let plan = rec.finish();
        let s = time_plan(gpu, &plan, reps)?;
        push(
            KernelResult {
                kernel: "sgemm",
                shape: format!("{n}x{n}x{n}"),
                gflops: shape.flops() / s / 1e9,
                median_ms: s * 1e3,
                path: path.clone(),
                adapter: adapter.clone(),
            },
            &mut results,
        );
    }

    // conv2d at U-Net shapes: (N, Ci, Co, H, W)
    for &(n, ci, co, hw) in &[(32, 64, 64, 14), (32, 32, 32, 28), (8, 256, 256, 8)] {
        let geo = Conv2dGeometry::same(1, 1);
        let x = fill(gpu, &[n, hw, hw, ci], "x", 3)?;
        let w = fill(gpu, &[co, ci, 3, 3], "w", 4)?;
        let b = fill(gpu, &[co], "b", 5)?;
        let d: ConvDims = conv_dims("bench", x.shape(), &w, &geo)?;
        let y = gpu.tensor(&[n, d.oh, d.ow, co], "y");
        let dy = fill(gpu, &[n, d.oh, d.ow, co], "dy", 6)?;
        let dx = gpu.tensor(&[n, hw, hw, ci], "dx");
        let dw = gpu.tensor(&[co, ci, 3, 3], "dw");
        let shape = format!("N{n} C{ci}->{co} {hw}x{hw} k3");
        let passes: [(
            &'static str,
            Box<dyn Fn(&mut crate::gpu::Recorder) -> crate::ops::OpResult>,
        ); 3] = [
            (
                "conv2d_forward",
                Box::new(|rec| conv2d_forward(rec, &x, &w, Some(&b), &y, &geo)),
            ),
            (
                "conv2d_backward_input",
                Box::new(|rec| conv2d_backward_input(rec, &dy, &w, &dx, &geo, false)),
            ),
            (
                "conv2d_backward_weight",
                Box::new(|rec| conv2d_backward_weight(rec, &x, &dy, &dw, None, &geo, false)),
            ),
        ];
        for (kernel, record) in passes {
            let mut rec = gpu.recorder();
            record(&mut rec)?;
            let plan = rec.finish();
            let s = time_plan(gpu, &plan, reps)?;
            push(
                KernelResult {
                    kernel,
                    shape: shape.clone(),
                    gflops: d.flops() / s / 1e9,
                    median_ms: s * 1e3,
                    path: path.clone(),
                    adapter: adapter.clone(),
                },
                &mut results,
            );
        }
    }
    Ok(results)
}
