//! The VE-SDE (Song et al. 2021) against its f64 references and against PyTorch + diffusers
//! (`tools/make_score_fixtures.py`, `tests/fixtures/ve/`: a small random fourier UNet2DModel and
//! a `ScoreSdeVeScheduler(sigma_max=1)`, both saved by diffusers):
//!
//! * kernels on odd shapes: the fourier embedding (arguments up to ~460 rad, whose f32 ulp is
//!   3e-5, and the GPU's ln may differ from the f64 one rounded to f32 by an ulp: atol 1e-4), the per-sample division, the training noise levels,
//!   input and target (atol 1e-6/σ, rtol 1e-5), and the corrector / predictor / ODE updates
//!   with the batch's step size (rtol 1e-5);
//! * one denoising score matching step: the score (rel L2 ≤ 1e-4), the loss and every gradient
//!   at the U-Net fixtures' bounds; the frozen fourier weights get no gradient;
//! * diffusers' predictor–corrector loop from the same initial and per-step noise, 10 steps,
//!   within 2e-3 (a random model: ~20 % of the final pixels inside (0, 1), the rest must land on
//!   the same side of the clamp);
//! * the probability-flow ODE, which no library implements: halving the step changes the result
//!   less and less (Euler's first order).

use std::path::{Path, PathBuf};

use crate::common::*;
use wgpu_diffusion::diffusion::scheduler::{SamplerKind, SamplingSchedule, VeUpdate};
use wgpu_diffusion::io::tensors::LoadedTensors;
use wgpu_diffusion::nn::UNet;
use wgpu_diffusion::ops::diffusion as dop;
use wgpu_diffusion::ops::elementwise::divide_per_sample;
use wgpu_diffusion::ops::loss::{mse_backward, mse_loss};
use wgpu_diffusion::ops::samplers::{COEFFS_LEN, UpdateBuffers, sampler_update};
use wgpu_diffusion::ops::timestep_embedding::fourier_embedding;
use wgpu_diffusion::reference::samplers as r;
use wgpu_diffusion::reference::timestep_embedding::fourier_embedding as fourier_ref;
use wgpu_diffusion::sample::{ModelSource, Noise, Sampler, SamplerOptions, nchw_to_nhwc};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ve")
}

#[test]
fn fourier_embedding_and_division_match_reference() {
    let g = gpu();
    for (b, half, seed) in [(1usize, 1usize, 1u64), (3, 7, 2), (5, 32, 3)] {
        let t: Vec<f64> = random(b, seed)
            .iter()
            .map(|u| (0.01f64.ln() + (u + 1.0) * 2.0).exp() as f32 as f64)
            .collect();
        let w: Vec<f32> = random(half, seed + 5)
            .iter()
            .map(|v| (16.0 * v) as f32)
            .collect();
        let tt = upload(&g, &[b], &t, "σ");
        let tw = g.tensor_from(&[half], &w, "w").unwrap();
        let out = g.tensor(&[b, 2 * half], "emb");
        run(&g, |rec| {
            fourier_embedding(rec, &tt, &tw, &out, false).unwrap()
        });
        assert_close(
            &format!("fourier {b}x{half}"),
            &read(&g, &out),
            &fourier_ref(&t, &w, false),
            1e-4,
            0.0,
        );
        let x = f32_round(&random(b * 9, seed + 7));
        let tx = upload(&g, &[b, 9], &x, "x");
        let tz = g.tensor(&[b, 9], "z");
        run(&g, |rec| divide_per_sample(rec, &tx, &tt, &tz).unwrap());
        let want: Vec<f64> = (0..b * 9).map(|i| x[i] / t[i / 9]).collect();
        assert_close("divide_per_sample", &read(&g, &tz), &want, 1e-6, 1e-6);
    }
}

#[test]
fn ve_kernels_match_reference() {
    let g = gpu();
    for (b, per, seed) in [(1usize, 1usize, 1u64), (3, 7, 2), (4, 65, 3)] {
        let draws: Vec<u32> = (0..b as u32)
            .map(|i| (i * 5_000_011 + seed as u32 * 77) % (1 << 24))
            .collect();
        let td = g.tensor(&[b], "draws");
        g.write_u32(&td, &draws).unwrap();
        let (ts, tw) = (g.tensor(&[b], "σ"), g.tensor(&[b], "weights"));
        let x0 = f32_round(&random(b * per, seed + 1));
        let z = f32_round(&random(b * per, seed + 2));
        let (tx, tz) = (
            upload(&g, &[b, per], &x0, "x0"),
            upload(&g, &[b, per], &z, "z"),
        );
        let (ti, tg) = (g.tensor(&[b, per], "in"), g.tensor(&[b, per], "target"));
        run(&g, |rec| {
            dop::ve_sigmas(rec, &td, (0.01, 8.0, 1e-5), &ts, &tw).unwrap();
            dop::ve_noised(rec, &tx, &tz, &ts, &ti, &tg).unwrap();
        });
        let (sig, w) = r::ve_sigmas(&draws, 0.01, 8.0, 1e-5);
        assert_close("ve σ", &read(&g, &ts), &sig, 1e-6, 2e-6);
        assert_close("ve weights", &read(&g, &tw), &w, 1e-6, 4e-6);
        let sig_gpu: Vec<f64> = read(&g, &ts).iter().map(|&v| v as f64).collect();
        let (inp, tgt) = r::ve_noised(&x0, &z, &sig_gpu);
        assert_close("ve input", &read(&g, &ti), &inp, 1e-6, 1e-6);
        let min_sigma = sig_gpu.iter().cloned().fold(f64::INFINITY, f64::min);
        assert_close("ve target", &read(&g, &tg), &tgt, 1e-6 / min_sigma, 1e-6);
    }
    let t = g.tensor(&[2], "t");
    let mut rec = g.recorder();
    let bad = dop::ve_sigmas(
        &mut rec,
        &t,
        (1.0, 0.5, 0.0),
        &g.tensor(&[2], "s"),
        &g.tensor(&[2], "w"),
    );
    assert!(bad.is_err());
}

#[test]
fn ve_updates_match_reference() {
    let g = gpu();
    let (b, per) = (3usize, 37usize);
    let n = b * per;
    let updates = [
        (SamplerKind::Pc, VeUpdate::Corrector { snr: 0.16 }),
        (
            SamplerKind::Pc,
            VeUpdate::Predictor {
                diffusion: 0.3,
                last: false,
            },
        ),
        (
            SamplerKind::Pc,
            VeUpdate::Predictor {
                diffusion: 0.3,
                last: true,
            },
        ),
        (
            SamplerKind::Ode,
            VeUpdate::Ode {
                c: 0.07,
                last: false,
            },
        ),
        (
            SamplerKind::Ode,
            VeUpdate::Ode {
                c: 0.07,
                last: true,
            },
        ),
    ];
    for (k, (kind, update)) in updates.into_iter().enumerate() {
        let x = f32_round(&random(n, 10 + k as u64));
        let m = f32_round(
            &random(n, 20 + k as u64)
                .iter()
                .map(|v| 3.0 * v)
                .collect::<Vec<_>>(),
        );
        let z = f32_round(&random(n, 30 + k as u64));
        let tx = upload(&g, &[b, per], &x, "x");
        let tm = upload(&g, &[b, per], &m, "m");
        let tz = upload(&g, &[b, per], &z, "z");
        let (a0, a1) = (g.tensor(&[b, per], "aux0"), g.tensor(&[b, per], "aux1"));
        let coeffs = wgpu_diffusion::diffusion::scheduler::Update::Ve(update).kernel_coeffs(1.0);
        let tc = g.tensor_from(&[COEFFS_LEN], &coeffs, "coeffs").unwrap();
        run(&g, |rec| {
            let buffers = UpdateBuffers {
                x: &tx,
                model_output: &tm,
                z: &tz,
                coeffs: &tc,
                aux0: &a0,
                aux1: &a1,
                aux2: &a0,
                aux3: &a1,
            };
            let p = wgpu_diffusion::diffusion::PredictionType::Epsilon;
            sampler_update(rec, kind, p, None, &buffers).unwrap();
        });
        let mut want = x.clone();
        r::ve_update(&update, b, &mut want, &m, &z);
        assert_close(&format!("{update:?}"), &read(&g, &tx), &want, 2e-6, 1e-5);
    }
}

#[test]
fn ve_training_step_matches_pytorch() {
    let dir = fixture_dir();
    let res = LoadedTensors::read(&dir.join("results.safetensors")).unwrap();
    let source = ModelSource::from_dir(&dir.join("model")).unwrap();
    assert!(source.config.is_fourier() && source.scheduler.ve().unwrap().is_some());
    let (xshape, x0) = res.get("train.x0").unwrap();
    let shape4 = [xshape[0], xshape[1], xshape[2], xshape[3]];
    let b = shape4[0];
    // The fixture's data is in [0, 1]; the trainer feeds [−1, 1] and ve_noised maps it back.
    let x0: Vec<f32> = nchw_to_nhwc(&x0, shape4)
        .iter()
        .map(|v| 2.0 * v - 1.0)
        .collect();
    let z = nchw_to_nhwc(&res.get("train.z").unwrap().1, shape4);
    let sigma = res.get("train.sigma").unwrap().1;
    let weights: Vec<f32> = sigma.iter().map(|s| s * s).collect();
    let score_ref = nchw_to_nhwc(&res.get("train.score").unwrap().1, shape4);
    let loss_ref = res.get("train.loss").unwrap().1[0];
    for g in gemm_paths() {
        let unet = UNet::new(&g, &source.config, b).unwrap();
        let store = &unet.params;
        store
            .write_values(&g, &source.weights(store).unwrap())
            .unwrap();
        g.write(&unet.timesteps, &sigma).unwrap();
        let shape = unet.sample.value.shape();
        let tx = g.tensor_from(shape, &x0, "x0").unwrap();
        let tz = g.tensor_from(shape, &z, "z").unwrap();
        let tw = g.tensor_from(&[b], &weights, "σ²").unwrap();
        let target = g.tensor(shape, "target");
        let loss = g.tensor(&[1], "loss");
        run(&g, |rec| {
            rec.clear(&store.grads);
            dop::ve_noised(rec, &tx, &tz, &unet.timesteps, &unet.sample.value, &target).unwrap();
            unet.forward(rec).unwrap();
            mse_loss(rec, &unet.output.value, &target, Some(&tw), &loss).unwrap();
            mse_backward(
                rec,
                &unet.output.value,
                &target,
                Some(&tw),
                1.0,
                &unet.output.grad,
            )
            .unwrap();
            unet.backward(rec).unwrap();
        });
        let score = read(&g, &unet.output.value);
        let es = rel_l2(&score, &score_ref);
        let l = read(&g, &loss)[0];
        let el = ((l - loss_ref) as f64).abs() / loss_ref as f64;
        eprintln!(
            "ve step ({}): score rel L2 {es:.3e}, loss {l} vs {loss_ref} (rel {el:.3e})",
            g.gemm_path
        );
        assert!(
            es <= 1e-4,
            "score rel L2 {es:e}: ours[..4] {:?} ref[..4] {:?}",
            &score[..4],
            &score_ref[..4]
        );
        assert!(el <= 1e-4, "loss {l} vs {loss_ref}");
        let grads = read(&g, &store.grads);
        // The frozen fourier weights have no reference gradient: they must get none.
        let worst = assert_param_grads(store, &grads, |name| {
            res.get(&format!("train.grad.{name}")).ok().map(|(_, v)| v)
        });
        eprintln!("  worst gradient rel L2 {:.3e} ({})", worst.1, worst.0);
    }
}

/// Samples the fixture model from its noise with `kind` in `steps` steps; images in [0, 1].
fn sample_fixture(
    g: &std::sync::Arc<wgpu_diffusion::gpu::Gpu>,
    kind: SamplerKind,
    steps: usize,
) -> Vec<f32> {
    let dir = fixture_dir();
    let res = LoadedTensors::read(&dir.join("results.safetensors")).unwrap();
    let source = ModelSource::from_dir(&dir.join("model")).unwrap();
    let (nshape, noise) = res.get("noise").unwrap();
    let shape4 = [nshape[0], nshape[1], nshape[2], nshape[3]];
    let noise = nchw_to_nhwc(&noise, shape4);
    let (sshape, step_noise) = res.get("step_noise").unwrap();
    let per_step: Vec<Vec<f32>> = step_noise
        .chunks(sshape[1..].iter().product())
        .map(|c| nchw_to_nhwc(c, shape4))
        .collect();
    let schedule = SamplingSchedule::new(&source.scheduler, kind, steps, None, 0.0).unwrap();
    let mut sampler = Sampler::new(
        g,
        &source.config,
        schedule,
        shape4[0],
        &SamplerOptions::default(),
    )
    .unwrap();
    sampler
        .set_weights(&source.weights(&sampler.unet.params).unwrap())
        .unwrap();
    let given = Noise::Given {
        initial: &noise,
        steps: Some(per_step.iter().map(|v| v.as_slice()).collect()),
    };
    let out = sampler.sample_batch(0, &given, None, &mut |_| {}).unwrap();
    out.iter().map(|v| (v + 1.0) / 2.0).collect()
}

#[test]
fn ve_predictor_corrector_matches_diffusers() {
    let res = LoadedTensors::read(&fixture_dir().join("results.safetensors")).unwrap();
    let steps: usize = res.metadata()["steps"].parse().unwrap();
    let (shape, theirs) = res.get("sample.pc").unwrap();
    let theirs = nchw_to_nhwc(&theirs, [shape[0], shape[1], shape[2], shape[3]]);
    let interior = theirs.iter().filter(|&&v| v > 0.0 && v < 1.0).count();
    for g in gemm_paths() {
        let ours = sample_fixture(&g, SamplerKind::Pc, steps);
        let diff = ours
            .iter()
            .zip(&theirs)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!(
            "VE pc ({}): max |diff| {diff:.3e} ({interior} of {} pixels inside (0, 1))",
            g.gemm_path,
            theirs.len()
        );
        assert!(
            diff <= 2e-3,
            "VE pc on {}: max |ours − diffusers| = {diff:e}\n  ours[..6] = {:?}\n  diffusers[..6] = {:?}",
            g.gemm_path,
            &ours[..6],
            &theirs[..6]
        );
    }
    assert!(
        interior * 10 >= theirs.len(),
        "the fixture is mostly clamped: {interior} interior"
    );
}

#[test]
fn ve_probability_flow_ode_converges() {
    let g = gpu();
    let runs: Vec<Vec<f32>> = [25, 50, 100, 200]
        .iter()
        .map(|&n| sample_fixture(&g, SamplerKind::Ode, n))
        .collect();
    let dist = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let d: Vec<f64> = runs.windows(2).map(|w| dist(&w[0], &w[1])).collect();
    eprintln!(
        "ODE: |x_25 − x_50| {:.4e}, |x_50 − x_100| {:.4e}, |x_100 − x_200| {:.4e}",
        d[0], d[1], d[2]
    );
    assert!(
        d[1] < d[0] && d[2] < d[1] && d[2] < 0.75 * d[0],
        "halving the ODE step does not shrink the change: {d:?}"
    );
}
