//! The kernel specializations a real run builds are all in the list `tests/shaders.rs` validates
//! with naga (`ops::variants::all_kernel_keys`): a variant added to an op but not to the list
//! would escape validation for Metal and DX12, which CI cannot run.

use std::collections::HashSet;
use std::sync::Arc;

use wgpu_diffusion::diffusion::scheduler::{SamplerKind, SamplingSchedule, SchedulerConfig};
use wgpu_diffusion::gpu::{GemmPathChoice, Gpu, GpuOptions, KernelKey};
use wgpu_diffusion::nn::UNetConfig;
use wgpu_diffusion::sample::{Sampler, SamplerOptions};
use wgpu_diffusion::train::{TrainConfig, Trainer};

use crate::common::gemm_paths;

/// Records (without running) a tiny16 training step, plain and class-conditional with label
/// dropout and a GradScaler, and sampling with every sampler, with guidance and with RePaint
/// inpainting.
fn record_a_run(gpu: &Arc<Gpu>) {
    let plain = UNetConfig::preset("tiny16").unwrap();
    let mut classes = plain.clone();
    classes.num_class_embeds = Some(11);
    classes.null_class = Some(10);
    for (model, cond_drop) in [(&plain, 0.0), (&classes, 0.1)] {
        let cfg = TrainConfig {
            model: "tiny16".into(),
            batch_size: 4,
            class_conditional: cond_drop > 0.0,
            cond_drop,
            // The GradScaler's kernels too.
            grad_scaler: cond_drop > 0.0,
            ..Default::default()
        };
        Trainer::new(gpu.clone(), cfg, model).expect("tiny16 trainer");
    }
    let scheduler = SchedulerConfig::ddpm_default();
    for kind in [
        SamplerKind::Ddpm,
        SamplerKind::Ddim,
        SamplerKind::DpmSolverPp2m,
        SamplerKind::Euler,
        SamplerKind::Heun,
        SamplerKind::Pndm,
    ] {
        let eta = if kind == SamplerKind::Ddim { 0.5 } else { 0.0 };
        let schedule = SamplingSchedule::new(&scheduler, kind, 3, None, eta).unwrap();
        Sampler::new(gpu, &plain, schedule, 3, &SamplerOptions::default()).unwrap();
        let schedule = SamplingSchedule::new(&scheduler, kind, 3, None, 0.0).unwrap();
        let guided = SamplerOptions {
            guidance: Some(3.0),
            inpaint: None,
            vae: None,
            context_tokens: None,
            size: None,
        };
        Sampler::new(gpu, &classes, schedule, 2, &guided).unwrap();
    }
    let pixels = 16 * 16;
    let inpaint = SamplerOptions {
        guidance: None,
        inpaint: Some((vec![0.0; pixels], vec![1.0; pixels])),
        vae: None,
        context_tokens: None,
        size: None,
    };
    let schedule = SamplingSchedule::repaint(&scheduler, SamplerKind::Ddim, 4, 0.0, 2, 2).unwrap();
    Sampler::new(gpu, &plain, schedule, 2, &inpaint).unwrap();
}

#[test]
fn a_real_run_builds_only_validated_kernel_variants() {
    let validated: HashSet<KernelKey> = wgpu_diffusion::ops::variants::all_kernel_keys()
        .into_iter()
        .collect();
    for shared in gemm_paths() {
        // A fresh device: its pipeline cache holds only what this run builds.
        let path = match shared.gemm_path {
            wgpu_diffusion::gpu::GemmPath::Portable => GemmPathChoice::Portable,
            _ => GemmPathChoice::Subgroup,
        };
        let gpu = Gpu::new(&GpuOptions {
            gemm_path: Some(path),
            ..Default::default()
        })
        .unwrap();
        record_a_run(&gpu);
        let built = gpu.kernels.keys();
        let missing: Vec<String> = built
            .iter()
            .filter(|k| !validated.contains(*k))
            .map(|k| format!("{k:?}"))
            .collect();
        assert!(
            missing.is_empty(),
            "{} of {} kernel variants built on the {} path are not in ops::variants::all_kernel_keys() (so tests/shaders.rs never validates them):\n{}",
            missing.len(),
            built.len(),
            gpu.gemm_path,
            missing.join("\n")
        );
        eprintln!(
            "{}: {} kernel variants built, all validated",
            gpu.gemm_path,
            built.len()
        );
    }
}
