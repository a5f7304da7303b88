//! EDM (Karras et al. 2022) against PyTorch + diffusers and NVlabs' formulas
//! (`tools/make_score_fixtures.py`, fixtures in `tests/fixtures/edm/`: a small random UNet2DModel
//! and the `scheduler_config.json` of an `EDMEulerScheduler`, both saved by diffusers):
//!
//! * the kernels `edm_sigmas` / `edm_noised` against their f64 references on odd shapes
//!   (f32 arithmetic of a few operations: atol 1e-6, rtol 1e-5; the target divides by c_out ≈ σ,
//!   so its tolerance is relative to 1/σ);
//! * one training step: σ from the fixture's normal draws, the preconditioned input, the U-Net,
//!   the loss and every gradient, at the U-Net fixtures' bounds (output and loss relative L2
//!   ≤ 1e-4, each gradient ≤ 1e-3) — our loss is the unweighted MSE of F to the target, which
//!   equals EDMLoss's λ(σ)·(D − y)² averaged over elements;
//! * sampling from the fixture's noise: EDM Euler against diffusers' `EDMEulerScheduler` loop,
//!   EDM Heun against NVlabs' `edm_sampler` (float64 there, float32 here), 10 steps, within
//!   `sample_parity.rs`' bound 2e-3·max(1, max|reference|).

use std::path::{Path, PathBuf};

use crate::common::*;
use wgpu_diffusion::diffusion::scheduler::{SamplerKind, SamplingSchedule};
use wgpu_diffusion::io::tensors::LoadedTensors;
use wgpu_diffusion::nn::UNet;
use wgpu_diffusion::ops::diffusion as dop;
use wgpu_diffusion::ops::loss::{mse_backward, mse_loss};
use wgpu_diffusion::reference::samplers as r;
use wgpu_diffusion::sample::{ModelSource, Noise, Sampler, SamplerOptions, nchw_to_nhwc};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/edm")
}

#[test]
fn edm_kernels_match_reference() {
    let g = gpu();
    for (b, per, seed) in [
        (1usize, 1usize, 1u64),
        (3, 7, 2),
        (5, 33, 3),
        (2, 4 * 64, 4),
    ] {
        let draws = f32_round(&random(b, seed).iter().map(|u| 2.5 * u).collect::<Vec<_>>());
        let x0 = f32_round(&random(b * per, seed + 10));
        let noise = f32_round(&random(b * per, seed + 20));
        let (p_mean, p_std, sigma_data) = (-1.2f32, 1.2f32, 0.5f32);
        let td = upload(&g, &[b], &draws, "draws");
        let (ts, tt) = (g.tensor(&[b], "sigmas"), g.tensor(&[b], "timesteps"));
        let tx = upload(&g, &[b, per], &x0, "x0");
        let tn = upload(&g, &[b, per], &noise, "noise");
        let (ti, tg) = (g.tensor(&[b, per], "input"), g.tensor(&[b, per], "target"));
        run(&g, |rec| {
            dop::edm_sigmas(rec, &td, p_mean, p_std, &ts, &tt).unwrap();
            dop::edm_noised(rec, &tx, &tn, &ts, sigma_data, &ti, &tg).unwrap();
        });
        let (sig_ref, t_ref) = r::edm_sigmas(&draws, p_mean as f64, p_std as f64);
        assert_close(
            &format!("edm σ B={b}"),
            &read(&g, &ts),
            &sig_ref,
            1e-6,
            1e-5,
        );
        assert_close(
            &format!("edm c_noise B={b}"),
            &read(&g, &tt),
            &t_ref,
            1e-6,
            1e-5,
        );
        // The reference sees the GPU's σ (f32), so only the element-wise formula is checked here.
        let sig_gpu: Vec<f64> = read(&g, &ts).iter().map(|&s| s as f64).collect();
        let (in_ref, tgt_ref) = r::edm_noised(&x0, &noise, &sig_gpu, sigma_data as f64);
        assert_close(
            &format!("edm input {b}x{per}"),
            &read(&g, &ti),
            &in_ref,
            1e-6,
            1e-5,
        );
        let min_sigma = sig_gpu.iter().cloned().fold(f64::INFINITY, f64::min);
        let atol = 1e-6 / min_sigma.min(1.0);
        assert_close(
            &format!("edm target {b}x{per}"),
            &read(&g, &tg),
            &tgt_ref,
            atol,
            1e-5,
        );
    }
    // Bad arguments are errors, not panics.
    let t = g.tensor(&[2], "t");
    let mut rec = g.recorder();
    assert!(
        dop::edm_sigmas(
            &mut rec,
            &t,
            -1.2,
            -1.0,
            &g.tensor(&[2], "s"),
            &g.tensor(&[2], "c")
        )
        .is_err()
    );
    assert!(dop::edm_sigmas(&mut rec, &t, -1.2, 1.2, &t, &g.tensor(&[2], "c")).is_err());
    let x = g.tensor(&[2, 3], "x");
    let e = dop::edm_noised(
        &mut rec,
        &x,
        &g.tensor(&[2, 3], "n"),
        &g.tensor(&[3], "s"),
        0.5,
        &g.tensor(&[2, 3], "i"),
        &g.tensor(&[2, 3], "o"),
    );
    assert!(e.is_err());
}

#[test]
fn edm_training_step_matches_pytorch() {
    let dir = fixture_dir();
    let res = LoadedTensors::read(&dir.join("results.safetensors")).unwrap();
    let source = ModelSource::from_dir(&dir.join("model")).unwrap();
    assert!(
        source.scheduler.edm().unwrap().is_some(),
        "the fixture's scheduler_config.json is an EDMEulerScheduler"
    );
    let (xshape, x0) = res.get("train.x0").unwrap();
    let shape4 = [xshape[0], xshape[1], xshape[2], xshape[3]];
    let b = shape4[0];
    let x0 = nchw_to_nhwc(&x0, shape4);
    let noise = nchw_to_nhwc(&res.get("train.noise").unwrap().1, shape4);
    let u = res.get("train.u").unwrap().1;
    let sigma_ref = res.get("train.sigma").unwrap().1;
    let f_ref = nchw_to_nhwc(&res.get("train.F").unwrap().1, shape4);
    let loss_ref = res.get("train.loss").unwrap().1[0];
    for g in gemm_paths() {
        let unet = UNet::new(&g, &source.config, b).unwrap();
        let store = &unet.params;
        store
            .write_values(&g, &source.weights(store).unwrap())
            .unwrap();
        let tx = g.tensor_from(unet.sample.value.shape(), &x0, "x0").unwrap();
        let tn = g
            .tensor_from(unet.sample.value.shape(), &noise, "noise")
            .unwrap();
        let td = g.tensor_from(&[b], &u, "draws").unwrap();
        let ts = g.tensor(&[b], "sigmas");
        let target = g.tensor(unet.output.value.shape(), "target");
        let loss = g.tensor(&[1], "loss");
        run(&g, |rec| {
            rec.clear(&store.grads);
            dop::edm_sigmas(rec, &td, -1.2, 1.2, &ts, &unet.timesteps).unwrap();
            dop::edm_noised(rec, &tx, &tn, &ts, 0.5, &unet.sample.value, &target).unwrap();
            unet.forward(rec).unwrap();
            mse_loss(rec, &unet.output.value, &target, None, &loss).unwrap();
            mse_backward(
                rec,
                &unet.output.value,
                &target,
                None,
                1.0,
                &unet.output.grad,
            )
            .unwrap();
            unet.backward(rec).unwrap();
        });
        let sig = read(&g, &ts);
        assert!(
            rel_l2(&sig, &sigma_ref) < 1e-6,
            "σ {sig:?} vs {sigma_ref:?}"
        );
        let f = read(&g, &unet.output.value);
        let ef = rel_l2(&f, &f_ref);
        let l = read(&g, &loss)[0];
        let el = ((l - loss_ref) as f64).abs() / loss_ref as f64;
        eprintln!(
            "edm step ({}): F rel L2 {ef:.3e}, loss {l} vs {loss_ref} (rel {el:.3e})",
            g.gemm_path
        );
        assert!(
            ef <= 1e-4,
            "F rel L2 {ef:e}: ours[..4] {:?} ref[..4] {:?}",
            &f[..4],
            &f_ref[..4]
        );
        assert!(el <= 1e-4, "loss {l} vs {loss_ref}");
        let grads = read(&g, &store.grads);
        let worst = assert_param_grads(store, &grads, |name| {
            Some(res.get(&format!("train.grad.{name}")).unwrap().1)
        });
        eprintln!("  worst gradient rel L2 {:.3e} ({})", worst.1, worst.0);
    }
}

#[test]
fn edm_samplers_match_diffusers_and_nvlabs() {
    let dir = fixture_dir();
    let res = LoadedTensors::read(&dir.join("results.safetensors")).unwrap();
    let steps: usize = res.metadata()["steps"].parse().unwrap();
    let source = ModelSource::from_dir(&dir.join("model")).unwrap();
    let (nshape, noise) = res.get("noise").unwrap();
    let shape4 = [nshape[0], nshape[1], nshape[2], nshape[3]];
    let noise = nchw_to_nhwc(&noise, shape4);
    for g in gemm_paths() {
        for (case, kind) in [("euler", SamplerKind::Euler), ("heun", SamplerKind::Heun)] {
            let schedule =
                SamplingSchedule::new(&source.scheduler, kind, steps, None, 0.0).unwrap();
            let mut sampler = Sampler::new(
                &g,
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
                steps: None,
            };
            let ours = sampler.sample_batch(0, &given, None, &mut |_| {}).unwrap();
            let theirs = nchw_to_nhwc(&res.get(&format!("sample.{case}")).unwrap().1, shape4);
            let scale = theirs.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let diff = ours
                .iter()
                .zip(&theirs)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            eprintln!(
                "EDM {case} ({}): max |diff| {diff:.3e}, max |reference| {scale:.3}",
                g.gemm_path
            );
            assert!(
                diff <= 2e-3 * scale,
                "EDM {case} on {}: max |ours − reference| = {diff:e} > {:e}\n  ours[..6] = {:?}\n  reference[..6] = {:?}",
                g.gemm_path,
                2e-3 * scale,
                &ours[..6],
                &theirs[..6]
            );
        }
    }
    // The DDPM-family samplers are refused by name.
    let e = SamplingSchedule::new(&source.scheduler, SamplerKind::DpmSolverPp2m, 10, None, 0.0)
        .unwrap_err();
    assert!(e.contains("dpmpp-2m") && e.contains("EDM"), "{e}");
}
