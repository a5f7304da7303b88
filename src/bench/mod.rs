//! `wgpu-diffusion bench --kernels`: GFLOP/s of the GEMM-shaped kernels at U-Net shapes, one
//! JSON line per case. Timing is wall clock around submit + wait (lavapipe's timestamp queries
//! report CPU times and are unreliable), median of `reps` runs after a warm-up that also pays
//! the driver's JIT compile.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;

use crate::dist::World;
use crate::gpu::{Gpu, Plan};
use crate::ops::conv2d::{
    Conv2dGeometry, ConvDims, conv_dims, conv2d_backward_input, conv2d_backward_weight,
    conv2d_forward,
};
use crate::ops::gemm::{GemmShape, MatRef, gemm};
use crate::sample::LatentVae;

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
    let data: Vec<f32> = crate::rng::test_data(n, seed)
        .iter()
        .map(|&v| v as f32)
        .collect();
    Ok(gpu.tensor_from(shape, &data, label)?)
}

/// Times recorded passes and reports each result as it is measured.
struct KernelBench<'g, 'e> {
    gpu: &'g Arc<Gpu>,
    reps: usize,
    path: String,
    adapter: String,
    emit: &'e mut dyn FnMut(&KernelResult),
    results: Vec<KernelResult>,
}

impl KernelBench<'_, '_> {
    /// Records one pass in its own plan, times it (median of `reps`) and reports it.
    fn measure(
        &mut self,
        kernel: &'static str,
        shape: String,
        flops: f64,
        record: RecordFn,
    ) -> Result<()> {
        let mut rec = self.gpu.recorder();
        record(&mut rec)?;
        let s = time_plan(self.gpu, &rec.finish(), self.reps)?;
        let r = KernelResult {
            kernel,
            shape,
            gflops: flops / s / 1e9,
            median_ms: s * 1e3,
            path: self.path.clone(),
            adapter: self.adapter.clone(),
        };
        (self.emit)(&r);
        self.results.push(r);
        Ok(())
    }
}

/// Runs the kernel benchmark; `emit` receives each result as it is measured.
pub fn kernels(
    gpu: &Arc<Gpu>,
    reps: usize,
    mut emit: impl FnMut(&KernelResult),
) -> Result<Vec<KernelResult>> {
    let mut bench = KernelBench {
        gpu,
        reps,
        path: gpu.gemm_path.to_string(),
        adapter: gpu.adapter.name.clone(),
        emit: &mut emit,
        results: Vec::new(),
    };
    bench_gemms(&mut bench)?;
    bench_dispatch_overhead(&mut bench)?;
    bench_convs(&mut bench)?;
    bench_fused_attention(&mut bench)?;
    Ok(bench.results)
}

/// SGEMM 1024³, then the GEMMs of a 14 x 14 attention block at batch 32 (64 channels, one
/// head): a Q/K/V/out projection (K = 64, with bias) and the batched scores Q·Kᵀ. Small-K
/// GEMMs show what a tile's prologue and epilogue cost, which 1024³ hides.
fn bench_gemms(bench: &mut KernelBench) -> Result<()> {
    let gpu = bench.gpu;
    for &(label, m, n, k, batches, bias_trans_b) in &[
        ("sgemm", 1024, 1024, 1024, 1, false),
        ("linear", 32 * 196, 64, 64, 1, true),
        ("attention_scores", 196, 196, 64, 32, true),
    ] {
        let (a, b, c) = (
            fill(gpu, &[batches * m, k], "A", 1)?,
            fill(gpu, &[batches * k * n], "B", 2)?,
            gpu.tensor(&[batches * m, n], "C"),
        );
        let bias = fill(gpu, &[n], "bias", 3)?;
        let shape = GemmShape::new(m, n, k).batches(batches, 1);
        let (a_ref, c_ref) = (
            MatRef::dense(&a, k).batched(m * k, 0),
            MatRef::dense(&c, n).batched(m * n, 0),
        );
        // The projection's B is the [out, in] weight used transposed, as Linear stores it; the
        // scores' B is K [tokens, dh] used transposed.
        let b_ref = if bias_trans_b {
            MatRef::dense(&b, k).batched(k * n, 0).t()
        } else {
            MatRef::dense(&b, n)
        };
        let with_bias = label == "linear";
        let case = if batches > 1 {
            format!("{batches}x {m}x{n}x{k}")
        } else {
            format!("{m}x{n}x{k}")
        };
        bench.measure(
            label,
            case,
            shape.flops(),
            Box::new(|rec| gemm(rec, shape, a_ref, b_ref, with_bias.then_some(&bias), c_ref)),
        )?;
    }
    Ok(())
}

/// What one dispatch costs beyond its work: a plan of 1000 axpby passes over 64 floats
/// (median_ms is the whole plan; divide by 1000).
fn bench_dispatch_overhead(bench: &mut KernelBench) -> Result<()> {
    let gpu = bench.gpu;
    let (x, y) = (fill(gpu, &[64], "x", 11)?, fill(gpu, &[64], "y", 12)?);
    bench.measure(
        "dispatch_overhead",
        "1000 dispatches (axpby of 64 floats)".into(),
        1000.0 * 3.0 * 64.0,
        Box::new(|rec| {
            for _ in 0..1000 {
                crate::ops::elementwise::axpby(rec, 0.5, &x, 0.5, &y)?;
            }
            Ok(())
        }),
    )
}

/// conv2d's three passes (forward, backward input, backward weight) at U-Net shapes.
fn bench_convs(bench: &mut KernelBench) -> Result<()> {
    let gpu = bench.gpu;
    // (N, Ci, Co, H = W)
    for &(n, ci, co, hw) in &[
        (32, 64, 64, 14),
        (32, 64, 64, 28),
        (32, 32, 32, 28),
        (32, 96, 32, 28),
        (32, 32, 1, 28),
        (8, 256, 256, 8),
    ] {
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
            bench.measure(kernel, shape.clone(), d.flops(), record)?;
        }
    }
    Ok(())
}

/// The fused attention core (the kernel of this adapter's path): (samples, query tokens,
/// key tokens, channels, head_dim) of mnist28's 14 x 14 and 8 x 8 self-attentions with 8-wide
/// heads, a cross-attention of 49 pixels to 16 text tokens, and SD 1.x's 40-wide heads over a
/// 32 x 32 latent. GFLOP/s counts the unfused GEMMs' work (QKᵀ and PV; four GEMMs backward), as
/// the step does.
fn bench_fused_attention(bench: &mut KernelBench) -> Result<()> {
    use crate::ops::attention::{
        AttentionGrads, AttentionShape, attention_backward, attention_forward, stats_len,
    };
    let gpu = bench.gpu;
    let cases = [
        (32, 196, 196, 64, 8),
        (32, 64, 64, 64, 8),
        (32, 49, 16, 64, 16),
        (2, 1024, 1024, 320, 40),
    ];
    for (n, tq, tk, c, head_dim) in cases {
        if crate::ops::attention::fused_kernel(gpu, head_dim, c).is_none() {
            continue;
        }
        let heads = c / head_dim;
        let shape = AttentionShape {
            samples: n,
            query_tokens: tq,
            key_tokens: tk,
            heads,
            causal: false,
        };
        let (rows_q, rows_k) = ([n * tq, c], [n * tk, c]);
        let (q, k, v, d_o) = (
            fill(gpu, &rows_q, "q", 7)?,
            fill(gpu, &rows_k, "k", 8)?,
            fill(gpu, &rows_k, "v", 9)?,
            fill(gpu, &rows_q, "dO", 10)?,
        );
        let o = gpu.tensor(&rows_q, "o");
        let stats = gpu.tensor(&[stats_len(n, heads, tq)], "stats");
        let (dq, dk, dv) = (
            gpu.tensor(&rows_q, "dq"),
            gpu.tensor(&rows_k, "dk"),
            gpu.tensor(&rows_k, "dv"),
        );
        let grads = AttentionGrads {
            q: &q,
            k: &k,
            v: &v,
            o: &o,
            d_o: &d_o,
            dq: &dq,
            dk: &dk,
            dv: &dv,
        };
        let scale = 1.0 / (head_dim as f32).sqrt();
        let gemm_flops = 2.0 * (n * heads * tq * tk * head_dim) as f64;
        let label = format!("N{n} Tq{tq} Tk{tk} C{c} heads of {head_dim}");
        let passes: [(&'static str, f64, RecordFn); 2] = [
            (
                "attention_forward",
                2.0 * gemm_flops,
                Box::new(|rec| attention_forward(rec, shape, &q, &k, &v, &o, &stats, scale)),
            ),
            (
                "attention_backward",
                4.0 * gemm_flops,
                Box::new(|rec| attention_backward(rec, shape, &grads, &stats, scale)),
            ),
        ];
        // The backward reads the forward's statistics: run the forward once first.
        let mut rec = gpu.recorder();
        attention_forward(&mut rec, shape, &q, &k, &v, &o, &stats, scale)?;
        gpu.run(&[&rec.finish()])?;
        for (kernel, flops, record) in passes {
            bench.measure(kernel, label.clone(), flops, record)?;
        }
    }
    Ok(())
}

/// One line of `bench --model M --batch-size B --steps N`: the training step, the sampling
/// step, and what they cost. Keys are shared with `tools/peer_pytorch.py`, so a table can be made
/// from runs side by side.
#[derive(serde::Serialize)]
pub struct TrainResult {
    pub model: String,
    pub batch_size: usize,
    pub adapter: String,
    pub backend: String,
    pub path: String,
    /// GEMM and conv operands: f32 or f16 (`--precision`).
    pub precision: String,
    /// Clipping and EMA off (the like-for-like row against Burn, which has neither).
    pub minimal: bool,
    /// Median of the timed steps (after warm-up), each submit + wait.
    pub train_step_s: f64,
    pub train_step_min_s: f64,
    pub train_img_per_s: f64,
    /// One U-Net forward + one DDIM update at the same batch (median over a DDIM-10 loop).
    pub sample_step_s: f64,
    /// FLOPs of the step's GEMMs and convolutions, 2 per multiply-add (PyTorch FlopCounter's
    /// convention), counted from the recorded plan.
    pub gflops_per_train_step: f64,
    pub achieved_gflops: f64,
    pub dispatches_per_step: usize,
    pub submits_per_step: f64,
    /// Every buffer and texture the benchmark allocated (our own accounting).
    pub peak_gpu_bytes: u64,
    /// Process start (main) to the end of the first training step: pipeline compiles, plan,
    /// first step. Cold with `MESA_SHADER_CACHE_DISABLE=true`.
    pub time_to_first_step_s: f64,
    pub timed_steps: usize,
    /// The machine's 1-minute load average when the timing ended (compare only quiet runs).
    pub loadavg: f64,
    /// Under mpirun: the job's ranks and what data parallelism cost (absent for one process).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub data_parallel: Option<DataParallelResult>,
}

/// What `bench` measures under `mpirun -np N` besides one rank's step.
#[derive(serde::Serialize)]
pub struct DataParallelResult {
    pub ranks: usize,
    /// Images per second of the whole job: N · batch / the median step.
    pub job_img_per_s: f64,
    /// Seconds per step spent reading the gradients back, all-reducing them across ranks and
    /// uploading the sum (mean over the timed steps, rank 0).
    pub comm_s_per_step: f64,
    /// The same step on every rank at once without the all-reduce (each rank trains alone,
    /// sharing the machine as in the job): what the job would take with free communication.
    pub rank_compute_step_s: f64,
    /// job_img_per_s / (N · batch / rank_compute_step_s): 1 when communication costs nothing.
    pub scaling_efficiency: f64,
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// Times `steps` training steps (submit + wait each, after `warmup` steps) on one batch of
/// random data; the step times, sorted.
fn time_steps(
    trainer: &mut crate::train::Trainer,
    warmup: usize,
    steps: usize,
) -> Result<Vec<f64>> {
    // A batch of data: images of the U-Net's size, or of a latent model's VAE.
    let numel: usize = match &trainer.latent {
        Some(codec) => codec.vae.sample.value.numel(),
        None => trainer.unet.sample.shape().iter().product(),
    };
    let data: Vec<f32> = crate::rng::test_data(numel, 1)
        .iter()
        .map(|&v| v as f32)
        .collect();
    // A text-conditional step captions its images by their labels (digits here).
    let labels = match &trainer.text {
        Some(_) => vec![(0..trainer.cfg.batch_size as u32).map(|i| i % 10).collect()],
        None => Vec::new(),
    };
    for _ in 0..warmup {
        trainer.submit_step(std::slice::from_ref(&data), &labels)?;
        trainer.gpu.wait()?;
    }
    let mut times = Vec::new();
    for _ in 0..steps {
        let t = Instant::now();
        trainer.submit_step(std::slice::from_ref(&data), &labels)?;
        trainer.gpu.wait()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// Under mpirun: the job's step, timed on every rank at once, against `compute`, each rank's
/// step without communication timed the same way (rank 0's figures are reported).
fn data_parallel_cost(
    gpu: &Arc<Gpu>,
    cfg: &crate::train::TrainConfig,
    (unet_cfg, vae): (&crate::nn::UNetConfig, Option<&LatentVae>),
    world: &Rc<World>,
    (steps, compute): (usize, f64),
) -> Result<DataParallelResult> {
    let mut trainer = gpu.checked_build(|| {
        crate::train::Trainer::data_parallel(gpu.clone(), cfg.clone(), unet_cfg, vae, world.clone())
    })?;
    trainer.set_weights(&crate::nn::init::default_init(&trainer.unet.params, 0))?;
    time_steps(&mut trainer, 2, 0)?;
    trainer.comm_seconds = 0.0;
    let job_times = time_steps(&mut trainer, 0, steps.max(1))?;
    let job = job_times[job_times.len() / 2];
    let ranks = world.size();
    let batch = (cfg.batch_size * ranks) as f64;
    Ok(DataParallelResult {
        ranks,
        job_img_per_s: batch / job,
        comm_s_per_step: trainer.comm_seconds / job_times.len() as f64,
        rank_compute_step_s: compute,
        scaling_efficiency: compute / job,
    })
}

/// Times whole training steps (submit + wait each, after `warmup` steps) on random data, then
/// the sampling step at the same batch. `process_start` is when `main` began. Under mpirun
/// (`world` of several ranks) it adds what data parallelism costs ([`DataParallelResult`]).
#[allow(clippy::too_many_arguments)]
pub fn train_steps(
    gpu: &Arc<Gpu>,
    (model, vae): (&str, Option<&LatentVae>),
    batch: usize,
    steps: usize,
    warmup: usize,
    minimal: bool,
    profile: bool,
    (process_start, world): (Instant, &Rc<World>),
) -> Result<TrainResult> {
    let mut cfg = crate::train::TrainConfig {
        model: model.to_string(),
        batch_size: batch,
        // As `train --precision f16` runs it.
        grad_scaler: gpu.precision == crate::gpu::Precision::F16,
        ..Default::default()
    };
    if minimal {
        cfg.max_grad_norm = 0.0;
        cfg.ema = false;
    }
    let unet_cfg = crate::train::resolve_model_config(&cfg)?;
    // A text-to-image U-Net trains with the text encoder `train --text-conditional` builds.
    let text = match &unet_cfg.cross_attention {
        Some(x) => Some(crate::train::text::TextTraining::mnist_scratch(
            x.cross_attention_dim,
        )?),
        None => None,
    };
    let mut trainer = gpu.checked_build(|| {
        let cfg = cfg.clone();
        let single = Rc::new(World::single());
        crate::train::Trainer::build(gpu.clone(), cfg, (&unet_cfg, text), vae, single)
    })?;
    trainer.set_weights(&crate::nn::init::default_init(&trainer.unet.params, 0))?;
    time_steps(&mut trainer, 1, 0)?;
    let time_to_first_step_s = process_start.elapsed().as_secs_f64();
    time_steps(&mut trainer, warmup, 0)?;
    // Under mpirun every rank times its own step at once, sharing the machine as in the job.
    world.barrier();
    let submits_before = gpu.submit_count();
    let times = time_steps(&mut trainer, 0, steps.max(1))?;
    let submits_per_step = (gpu.submit_count() - submits_before) as f64 / times.len() as f64;
    let load = loadavg();
    if profile {
        let top = std::env::var("WGPU_DIFFUSION_PROFILE_TOP")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30);
        trainer.profile_step().print(25, top);
    }
    let flops = trainer.step_plan_flops();
    let dispatches = trainer.step_dispatches();
    drop(trainer);
    let data_parallel = match world.is_parallel() {
        true => Some(data_parallel_cost(
            gpu,
            &cfg,
            (&unet_cfg, vae),
            world,
            (steps, times[times.len() / 2]),
        )?),
        false => None,
    };
    // The sampling step: DDIM over 10 steps, per evaluation.
    let sample = sample_batches(
        gpu,
        (model, vae),
        crate::diffusion::scheduler::SamplerKind::Ddim,
        10,
        batch,
        3,
    )?;
    let median = times[times.len() / 2];
    Ok(TrainResult {
        model: model.to_string(),
        batch_size: batch,
        adapter: gpu.adapter.name.clone(),
        backend: gpu.adapter.backend.clone(),
        path: gpu.gemm_path.to_string(),
        precision: gpu.precision.to_string(),
        minimal,
        train_step_s: median,
        train_step_min_s: times[0],
        train_img_per_s: batch as f64 / median,
        sample_step_s: sample.median_batch_s / sample.evaluations as f64,
        gflops_per_train_step: flops / 1e9,
        achieved_gflops: flops / 1e9 / median,
        dispatches_per_step: dispatches,
        submits_per_step,
        peak_gpu_bytes: gpu.allocated_bytes(),
        time_to_first_step_s,
        timed_steps: times.len(),
        loadavg: load,
        data_parallel,
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
    /// GEMM and conv operands: f32 or f16 (`--precision`).
    pub precision: String,
    pub adapter: String,
}

/// Times whole sampling batches of a preset (weights from the default initialisation: the
/// arithmetic is the same as a trained model's).
pub fn sample_batches(
    gpu: &Arc<Gpu>,
    (model, vae): (&str, Option<&LatentVae>),
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
    // A text-to-image U-Net attends to MNIST captions' context length (zeros: the speed is
    // the same).
    let context_tokens = match &unet_cfg.cross_attention {
        Some(x) => Some(
            crate::train::text::TextTraining::mnist_scratch(x.cross_attention_dim)?
                .context_tokens(),
        ),
        None => None,
    };
    let options = SamplerOptions {
        vae: vae.cloned(),
        context_tokens,
        ..Default::default()
    };
    let mut sampler = Sampler::new(gpu, &unet_cfg, schedule, batch, &options)?;
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
        precision: gpu.precision.to_string(),
        adapter: gpu.adapter.name.clone(),
    })
}
