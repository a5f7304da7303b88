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

/// Records one kernel pass into a recorder.
type RecordFn<'a> = Box<dyn Fn(&mut crate::gpu::Recorder) -> crate::ops::OpResult + 'a>;

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
        let passes: [(&'static str, RecordFn); 3] = [
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

#[derive(serde::Serialize)]
pub struct TrainResult {
    pub bench: &'static str,
    pub model: String,
    pub batch: usize,
    pub median_step_s: f64,
    pub min_step_s: f64,
    pub images_per_s: f64,
    pub first_step_s: f64,
    pub path: String,
    pub adapter: String,
}

/// Times whole training steps (submit + wait each, after `warmup` steps) on random data.
pub fn train_steps(
    gpu: &Arc<Gpu>,
    model: &str,
    batch: usize,
    steps: usize,
    warmup: usize,
    profile: bool,
) -> Result<TrainResult> {
    let cfg = crate::train::TrainConfig {
        model: model.to_string(),
        batch_size: batch,
        ..Default::default()
    };
    let unet_cfg = crate::train::resolve_model_config(&cfg)?;
    let t0 = Instant::now();
    let mut trainer = crate::train::Trainer::new(gpu.clone(), cfg.clone(), &unet_cfg)?;
    trainer.set_weights(&crate::nn::init::default_init(&trainer.unet.params, 0))?;
    let numel: usize = trainer.unet.sample.shape().iter().product();
    let data: Vec<f32> = crate::reference::test_data(numel, 1)
        .iter()
        .map(|&v| v as f32)
        .collect();
    trainer.submit_step(std::slice::from_ref(&data), &[])?;
    gpu.wait()?;
    let first_step_s = t0.elapsed().as_secs_f64();
    for _ in 0..warmup {
        trainer.submit_step(std::slice::from_ref(&data), &[])?;
        gpu.wait()?;
    }
    let mut times = Vec::new();
    for _ in 0..steps.max(1) {
        let t = Instant::now();
        trainer.submit_step(std::slice::from_ref(&data), &[])?;
        gpu.wait()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    if profile {
        let prof = trainer.profile_step();
        let total: f64 = prof.iter().map(|p| p.2).sum();
        for (name, n, secs) in prof.iter().take(25) {
            eprintln!(
                "{:>8.2} ms {:>5.1}% {n:>4}x {name}",
                secs * 1e3,
                100.0 * secs / total
            );
        }
        eprintln!(
            "{:>8.2} ms total over {} dispatches and copies (one submit each)",
            total * 1e3,
            prof.iter().map(|p| p.1).sum::<usize>()
        );
    }
    let median = times[times.len() / 2];
    Ok(TrainResult {
        bench: "train_step",
        model: model.to_string(),
        batch,
        median_step_s: median,
        min_step_s: times[0],
        images_per_s: batch as f64 / median,
        first_step_s,
        path: gpu.gemm_path.to_string(),
        adapter: gpu.adapter.name.clone(),
    })
}

#[derive(serde::Serialize)]
pub struct SampleResult {
    pub bench: &'static str,
    pub model: String,
    pub sampler: String,
    pub steps: usize,
    pub evaluations: usize,
    pub batch: usize,
    /// Median over `reps` whole batches (after one warm-up batch that pays the JIT compile).
    pub median_batch_s: f64,
    pub images_per_s: f64,
    pub first_batch_s: f64,
    pub path: String,
    pub adapter: String,
}

/// Times whole sampling batches of a preset (weights from the default initialisation: the
/// arithmetic is the same as a trained model's).
pub fn sample_batches(
    gpu: &Arc<Gpu>,
    model: &str,
    kind: crate::diffusion::scheduler::SamplerKind,
    steps: usize,
    batch: usize,
    reps: usize,
) -> Result<SampleResult> {
    use crate::diffusion::scheduler::{SamplingSchedule, SchedulerConfig};
    use crate::sample::{Noise, Sampler, SamplerOptions};
    let cfg = crate::train::TrainConfig {
        model: model.to_string(),
        ..Default::default()
    };
    let unet_cfg = crate::train::resolve_model_config(&cfg)?;
    let schedule = SamplingSchedule::new(&SchedulerConfig::ddpm_default(), kind, steps, None, 0.0)
        .map_err(anyhow::Error::msg)?;
    let t0 = Instant::now();
    let mut sampler = Sampler::new(gpu, &unet_cfg, schedule, batch, &SamplerOptions::default())?;
    sampler.set_weights(&crate::nn::init::default_init(&sampler.unet.params, 0))?;
    sampler.sample_batch(0, &Noise::Seeded(0), None, &mut |_| {})?;
    let first_batch_s = t0.elapsed().as_secs_f64();
    let mut times = Vec::new();
    for r in 0..reps.max(1) {
        let t = Instant::now();
        sampler.sample_batch((r + 1) * batch, &Noise::Seeded(0), None, &mut |_| {})?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    Ok(SampleResult {
        bench: "sample",
        model: model.to_string(),
        sampler: kind.diffusers_class().to_string(),
        steps,
        evaluations: sampler.evaluations(),
        batch,
        median_batch_s: median,
        images_per_s: batch as f64 / median,
        first_batch_s,
        path: gpu.gemm_path.to_string(),
        adapter: gpu.adapter.name.clone(),
    })
}
