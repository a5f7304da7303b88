use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wgpu_diffusion::gpu::{
    BackendChoice, GemmPathChoice, Gpu, GpuOptions, Precision, configure_llvmpipe_environment,
    list_adapters, summarize,
};

/// Train and sample DDPM diffusion models with every op a WGSL compute shader (wgpu).
#[derive(Parser)]
#[command(name = "wgpu-diffusion", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct DeviceArgs {
    /// Graphics API to use.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Use the adapter whose name contains this (case-insensitive); see `devices`.
    #[arg(long)]
    adapter: Option<String>,
    /// GEMM/conv kernel path: auto picks subgroup on lavapipe, portable on GPUs.
    #[arg(long, value_enum, default_value_t = GemmPathChoice::Auto)]
    gemm_path: GemmPathChoice,
    /// f16: GEMM and conv operands rounded to half precision with f32 accumulation (autocast's
    /// matmul numerics; rgba16float packs on the subgroup path, half their memory); `train` and
    /// `train-vae` then scale the loss (GradScaler). Activations stay f32 for now.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
}

impl DeviceArgs {
    fn options(&self) -> GpuOptions {
        GpuOptions {
            backend: self.backend,
            adapter: self.adapter.clone(),
            gemm_path: Some(self.gemm_path),
            precision: self.precision,
            ..Default::default()
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// List the GPU adapters wgpu can see, with backend, type, driver, features and limits.
    Devices {
        #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
        backend: BackendChoice,
        /// Print one JSON object per adapter.
        #[arg(long)]
        json: bool,
    },
    /// Train a diffusion U-Net (default: tiny16 on the embedded MNIST).
    Train {
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        args: Box<wgpu_diffusion::cli_train::TrainArgs>,
    },
    /// Generate images from a trained model (DDPM, DDIM, DPM-Solver++ 2M, Euler, Heun).
    Sample {
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        args: Box<wgpu_diffusion::cli_sample::SampleArgs>,
    },
    /// Train an AutoencoderKL (default: mnist-vae on the embedded MNIST) and export it as a
    /// diffusers directory with its scaling_factor.
    TrainVae {
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        args: wgpu_diffusion::cli_vae::TrainVaeArgs,
    },
    /// Look at what a VAE (a diffusers AutoencoderKL directory) keeps: reconstruct images
    /// (with PSNR), encode them to latents, decode latents.
    Vae {
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        args: wgpu_diffusion::cli_vae::VaeArgs,
    },
    /// Super-resolution quality on the MNIST test digits: PSNR, SSIM, consistency, beside bicubic.
    EvalSr {
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        args: Box<wgpu_diffusion::cli_sample::EvalSrArgs>,
    },
    /// Benchmarks. By default the training step of `--model` at `--batch-size` (one JSON line:
    /// step time, sampling step, GFLOP/s, dispatches, memory, time to first step); `--kernels`:
    /// GFLOP/s of the GEMM/conv kernels; `--sample`: whole sampling loops (images/s).
    Bench {
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        args: BenchArgs,
    },
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Kernel GFLOP/s at U-Net shapes instead.
    #[arg(long)]
    kernels: bool,
    /// Whole sampling batches (images/s) of a preset instead.
    #[arg(long)]
    sample: bool,
    /// Sampler for --sample.
    #[arg(long, value_enum, default_value_t = wgpu_diffusion::diffusion::scheduler::SamplerKind::Ddim)]
    sampler: wgpu_diffusion::diffusion::scheduler::SamplerKind,
    /// Sampling steps for --sample (`sample --sample-steps`).
    #[arg(long, default_value_t = 50)]
    sample_steps: usize,
    /// Model preset.
    #[arg(long, default_value = "tiny16")]
    model: String,
    /// Latent diffusion: a VAE directory (e.g. a train-vae run's vae/) around the preset
    /// (mnist-ldm): training encodes, sampling decodes.
    #[arg(long)]
    vae: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Timed training steps (median reported), after 2 warm-up steps.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// No gradient clipping and no EMA (the like-for-like row against Burn).
    #[arg(long)]
    minimal: bool,
    /// A per-kernel time table of one training step, then its largest single dispatches
    /// (stderr; WGPU_DIFFUSION_PROFILE_TOP=N lists N of them, default 30).
    #[arg(long)]
    profile: bool,
    /// Timed repetitions per --kernels / --sample case (median reported).
    #[arg(long, default_value_t = 10)]
    reps: usize,
}

fn main() -> ExitCode {
    let process_start = std::time::Instant::now();
    configure_llvmpipe_environment();
    let cli = Cli::parse();
    match run(cli, process_start) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, process_start: std::time::Instant) -> anyhow::Result<()> {
    // Only `train` and `bench` spread work over ranks: N copies of any other command would do
    // the same work N times and write the same files.
    let data_parallel = matches!(cli.command, Command::Train { .. } | Command::Bench { .. });
    if let Some(n) = wgpu_diffusion::dist::launcher_world_size().filter(|&n| n > 1)
        && !data_parallel
    {
        anyhow::bail!(
            "started by an MPI launcher as one of {n} processes: only `train` and `bench` run data-parallel; run this command without mpirun"
        );
    }
    match cli.command {
        Command::Devices { backend, json } => print_devices(backend, json),
        Command::EvalSr { device, args } => {
            wgpu_diffusion::cli_sample::run_eval_sr(&device.options(), &args)
        }
        Command::TrainVae { device, args } => {
            wgpu_diffusion::cli_vae::run_train_vae(&device.options(), &args)
        }
        Command::Vae { device, args } => wgpu_diffusion::cli_vae::run(&device.options(), &args),
        Command::Sample { device, args } => {
            wgpu_diffusion::cli_sample::run(&device.options(), &args)
        }
        Command::Train { device, args } => wgpu_diffusion::cli_train::run(device.options(), &args),
        Command::Bench { device, args } => run_bench(device, args, process_start),
    }
}

/// `devices`: every adapter wgpu sees, with its driver, features, subgroup sizes and limits.
fn print_devices(backend: BackendChoice, json: bool) -> anyhow::Result<()> {
    let adapters = list_adapters(backend);
    if adapters.is_empty() {
        return Err(wgpu_diffusion::gpu::GpuError::NoAdapter {
            backend,
            filter: String::new(),
            available: Vec::new(),
        }
        .into());
    }
    for a in &adapters {
        let s = summarize(a);
        if json {
            println!("{}", serde_json::to_string(&s)?);
        } else {
            println!("{} [{} / {}]", s.name, s.backend, s.device_type);
            println!("  driver: {} ({})", s.driver, s.driver_info);
            println!(
                "  features: {}",
                if s.features.is_empty() {
                    "-".to_string()
                } else {
                    s.features.join(", ")
                }
            );
            println!(
                "  subgroup size: {}..{}",
                s.subgroup_sizes.0, s.subgroup_sizes.1
            );
            println!(
                "  limits: storage binding {} MiB, buffer {} MiB, workgroup memory {} KiB, {} invocations/workgroup, texture 2D {}",
                s.max_storage_buffer_binding_size >> 20,
                s.max_buffer_size >> 20,
                s.max_compute_workgroup_storage_size >> 10,
                s.max_compute_invocations_per_workgroup,
                s.max_texture_dimension_2d
            );
        }
    }
    Ok(())
}

/// `bench`: the training step (under mpirun, the data-parallel job's), `--kernels` or
/// `--sample`.
fn run_bench(
    device: DeviceArgs,
    args: BenchArgs,
    process_start: std::time::Instant,
) -> anyhow::Result<()> {
    let BenchArgs {
        kernels,
        sample,
        sampler,
        sample_steps,
        model,
        vae,
        batch_size,
        steps,
        minimal,
        profile,
        reps,
    } = args;
    let vae = vae
        .map(|d| wgpu_diffusion::sample::LatentVae::from_dir(&d))
        .transpose()?;
    // Under mpirun the training bench measures the data-parallel job (rank 0 reports).
    let world = std::rc::Rc::new(wgpu_diffusion::dist::World::from_environment()?);
    let train = |gpu: &std::sync::Arc<Gpu>| {
        wgpu_diffusion::bench::train_steps(
            gpu,
            (&model, vae.as_ref()),
            batch_size,
            steps,
            2,
            minimal,
            profile,
            (process_start, &world),
        )
    };
    if world.is_parallel() {
        if kernels || sample {
            world.abort_with(
                "under mpirun only the training bench runs (--kernels and --sample measure one process)",
            );
        }
        let mut options = device.options();
        options.local_rank = world.local_rank();
        let result = Gpu::new(&options)
            .map_err(anyhow::Error::from)
            .and_then(|gpu| {
                eprintln!(
                    "rank {} of {}: adapter {}",
                    world.rank(),
                    world.size(),
                    gpu.describe()
                );
                train(&gpu)
            });
        return match result {
            Ok(r) if world.is_root() => {
                println!("{}", serde_json::to_string(&r)?);
                Ok(())
            }
            Ok(_) => Ok(()),
            // Any rank's error ends every rank (the others wait in a collective).
            Err(e) => world.abort_with(&format!("{e:#}")),
        };
    }
    let gpu = Gpu::new(&device.options())?;
    eprintln!("adapter: {}", gpu.describe());
    if kernels {
        wgpu_diffusion::bench::kernels(&gpu, reps.max(1), |r| {
            println!("{}", serde_json::to_string(r).expect("serialize"));
        })?;
    }
    if sample {
        let r = wgpu_diffusion::bench::sample_batches(
            &gpu,
            (&model, vae.as_ref()),
            sampler,
            sample_steps,
            batch_size,
            reps.max(1),
        )?;
        println!("{}", serde_json::to_string(&r)?);
    }
    if !kernels && !sample {
        println!("{}", serde_json::to_string(&train(&gpu)?)?);
    }
    Ok(())
}
