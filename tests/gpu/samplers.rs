//! samplers.wgsl (and the training targets of diffusion.wgsl) against reference::samplers.
//!
//! Each sampler's whole loop of updates runs with random model outputs in place of a U-Net,
//! so stage changes (Heun's two halves, DPM-Solver's first- then second-order steps) and the
//! auxiliary buffers are covered, for every prediction type, with and without clipping, on odd
//! sizes. An update is 3–8 f32 operations per element and the loop compounds them over ≤ 11
//! steps, with σ-space values up to ~160: rtol 2e-5 plus atol 2e-6·max|ref|.

use crate::common::*;
use wgpu_diffusion::diffusion::PredictionType;
use wgpu_diffusion::diffusion::scheduler::{SamplerKind, SamplingSchedule, SchedulerConfig};
use wgpu_diffusion::ops::diffusion as dop;
use wgpu_diffusion::ops::samplers::{self as op, COEFFS_LEN, UpdateBuffers};
use wgpu_diffusion::reference::samplers as r;

const SIZES: [usize; 3] = [1, 7, 70_001];
const KINDS: [SamplerKind; 6] = [
    SamplerKind::Ddpm,
    SamplerKind::Ddim,
    SamplerKind::DpmSolverPp2m,
    SamplerKind::Euler,
    SamplerKind::Heun,
    SamplerKind::Pndm,
];
const PREDICTIONS: [PredictionType; 3] = [
    PredictionType::Epsilon,
    PredictionType::VPrediction,
    PredictionType::Sample,
];

fn config(prediction: PredictionType) -> SchedulerConfig {
    let json = format!(
        r#"{{"prediction_type": "{}", "beta_schedule": "linear", "clip_sample": true, "timestep_spacing": "leading"}}"#,
        prediction.diffusers_name()
    );
    SchedulerConfig::from_json(&json).unwrap()
}

#[test]
fn sampler_loops_match_reference() {
    let g = gpu();
    for kind in KINDS {
        for prediction in PREDICTIONS {
            // PNDMScheduler takes ε and v models only.
            if kind == SamplerKind::Pndm && prediction == PredictionType::Sample {
                continue;
            }
            let eta = if kind == SamplerKind::Ddim { 0.7 } else { 0.0 };
            let sched = SamplingSchedule::new(&config(prediction), kind, 6, None, eta).unwrap();
            let clip = sched
                .settings
                .clip_sample
                .then_some(sched.settings.clip_sample_range);
            for (si, &n) in SIZES.iter().enumerate() {
                let what = format!("{kind:?} {prediction:?} n={n}");
                let seed = 1000 * si as u64;
                let mut x: Vec<f64> = f32_round(
                    &random(n, seed + 1)
                        .iter()
                        .map(|v| v * sched.init_noise_sigma as f64)
                        .collect::<Vec<_>>(),
                );
                let (mut aux0, mut aux1) = (vec![0.0; n], vec![0.0; n]);
                let tx = upload(&g, &[n], &x, "x");
                let (tm, tz) = (g.tensor(&[n], "model output"), g.tensor(&[n], "z"));
                let coeffs = g.tensor(&[COEFFS_LEN], "coeffs");
                let (ta0, ta1) = (g.tensor(&[n], "aux0"), g.tensor(&[n], "aux1"));
                let (ta2, ta3) = (g.tensor(&[n], "aux2"), g.tensor(&[n], "aux3"));
                // PLMS's history (newest first) and saved sample, in the reference.
                let mut history = [vec![0.0; n], vec![0.0; n], vec![0.0; n]];
                let mut saved = vec![0.0; n];
                let scaled = g.tensor(&[n], "model input");
                let mut rec = g.recorder();
                rec.clear(&ta0);
                rec.clear(&ta1);
                rec.clear(&ta2);
                rec.clear(&ta3);
                let clear = rec.finish();
                g.run(&[&clear]).unwrap();
                let mut rec = g.recorder();
                op::scale_model_input(&mut rec, &tx, &coeffs, &scaled, 1).unwrap();
                op::sampler_update(
                    &mut rec,
                    kind,
                    prediction,
                    clip.map(|c| c as f32),
                    &UpdateBuffers {
                        x: &tx,
                        model_output: &tm,
                        z: &tz,
                        coeffs: &coeffs,
                        aux0: &ta0,
                        aux1: &ta1,
                        aux2: &ta2,
                        aux3: &ta3,
                    },
                )
                .unwrap();
                let step = rec.finish();
                for (e, eval) in sched.evals.iter().enumerate() {
                    let m = random(n, seed + 10 + e as u64);
                    let z = random(n, seed + 100 + e as u64);
                    g.write(&tm, &m.iter().map(|&v| v as f32).collect::<Vec<_>>())
                        .unwrap();
                    g.write(&tz, &z.iter().map(|&v| v as f32).collect::<Vec<_>>())
                        .unwrap();
                    g.write(&coeffs, &eval.kernel_coeffs()).unwrap();
                    g.run(&[&step]).unwrap();
                    let expect_scaled: Vec<f64> =
                        x.iter().map(|v| v * eval.input_scale as f64).collect();
                    assert_close(
                        &format!("{what} model input at eval {e}"),
                        &read(&g, &scaled),
                        &expect_scaled,
                        0.0,
                        1e-6,
                    );
                    let z_used: Vec<f64> = if eval.adds_noise { z } else { vec![0.0; n] };
                    if kind == SamplerKind::Pndm {
                        r::plms_update(
                            &eval.update,
                            prediction,
                            &mut x,
                            &m,
                            &mut history,
                            &mut saved,
                        );
                    } else {
                        r::sampler_update(
                            &eval.update,
                            prediction,
                            clip,
                            &mut x,
                            &m,
                            &z_used,
                            &mut aux0,
                            &mut aux1,
                        );
                    }
                    let got = read(&g, &tx);
                    // Keep the reference on the GPU's trajectory so errors do not compound
                    // through clipping boundaries; the check above is per step.
                    assert_close(
                        &format!("{what} after eval {e}"),
                        &got,
                        &x,
                        2e-6 * max_abs(&x).max(1.0),
                        2e-5,
                    );
                    x = got.iter().map(|&v| v as f64).collect();
                    if matches!(kind, SamplerKind::DpmSolverPp2m | SamplerKind::Heun) {
                        let g0 = read(&g, &ta0);
                        assert_close(
                            &format!("{what} aux0 {e}"),
                            &g0,
                            &aux0,
                            2e-6 * max_abs(&aux0).max(1.0),
                            2e-5,
                        );
                        aux0 = g0.iter().map(|&v| v as f64).collect();
                    }
                    if kind == SamplerKind::Heun {
                        let g1 = read(&g, &ta1);
                        assert_close(
                            &format!("{what} aux1 {e}"),
                            &g1,
                            &aux1,
                            2e-6 * max_abs(&aux1).max(1.0),
                            2e-5,
                        );
                        aux1 = g1.iter().map(|&v| v as f64).collect();
                    }
                }
            }
        }
    }
}

#[test]
fn bad_sampler_operands_are_errors() {
    let g = gpu();
    let x = g.tensor(&[5], "x");
    let short = g.tensor(&[4], "short");
    let coeffs = g.tensor(&[COEFFS_LEN], "coeffs");
    let mut rec = g.recorder();
    let e = op::sampler_update(
        &mut rec,
        SamplerKind::Ddim,
        PredictionType::Epsilon,
        None,
        &UpdateBuffers {
            x: &x,
            model_output: &short,
            z: &x,
            coeffs: &coeffs,
            aux0: &x,
            aux1: &x,
            aux2: &x,
            aux3: &x,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("model_output"), "{e}");
}

#[test]
fn v_target_and_min_snr_weights_match_reference() {
    let g = gpu();
    let s = wgpu_diffusion::diffusion::NoiseSchedule::new(
        wgpu_diffusion::diffusion::BetaSchedule::SquaredcosCapV2,
        1000,
        1e-4,
        0.02,
    )
    .unwrap();
    let acp64: Vec<f64> = s.alphas_cumprod.iter().map(|&a| a as f64).collect();
    let acp = g.tensor_from(&[1000], &s.alphas_cumprod, "acp").unwrap();
    for (b, per) in [(1, 1), (3, 7), (7, 333)] {
        let n = b * per;
        let (x0, noise) = (random(n, 7 + n as u64), random(n, 8 + n as u64));
        let ts: Vec<u32> = (0..b as u32).map(|i| (i * 397 + 3) % 1000).collect();
        let (tx, tn) = (
            upload(&g, &[b, per], &x0, "x0"),
            upload(&g, &[b, per], &noise, "noise"),
        );
        let tt = g.tensor(&[b], "t");
        g.write_u32(&tt, &ts).unwrap();
        let target = g.tensor(&[b, per], "target");
        let weights: Vec<_> = PREDICTIONS.iter().map(|_| g.tensor(&[b], "w")).collect();
        run(&g, |rec| {
            dop::v_target(rec, &tx, &tn, &tt, &acp, &target).unwrap();
            for (p, w) in PREDICTIONS.iter().zip(&weights) {
                dop::min_snr_weights(rec, &tt, &acp, 5.0, *p, w).unwrap();
            }
        });
        assert_close(
            &format!("v_target {b}x{per}"),
            &read(&g, &target),
            &r::v_target(&x0, &noise, &ts, &acp64),
            1e-6,
            1e-6,
        );
        for (p, w) in PREDICTIONS.iter().zip(&weights) {
            assert_close(
                &format!("min_snr {p:?} {b}"),
                &read(&g, w),
                &r::min_snr_weights(&ts, &acp64, 5.0, *p),
                1e-7,
                2e-6,
            );
        }
    }
}

#[test]
fn guidance_and_duplicated_model_input_match_reference() {
    let g = gpu();
    for n in [1usize, 7, 70_001] {
        let x = random(n, 40 + n as u64);
        let out2 = random(2 * n, 41 + n as u64);
        let tx = upload(&g, &[n], &x, "x");
        let coeffs = g.tensor(&[COEFFS_LEN], "coeffs");
        let mut c = [0.0f32; COEFFS_LEN];
        c[7] = 0.625;
        g.write(&coeffs, &c).unwrap();
        let doubled = g.tensor(&[2 * n], "doubled input");
        let to = upload(&g, &[2 * n], &out2, "model output [c; u]");
        let guided = g.tensor(&[n], "guided");
        run(&g, |rec| {
            op::scale_model_input(rec, &tx, &coeffs, &doubled, 2).unwrap();
            op::guidance_combine(rec, &to, 3.5, &guided).unwrap();
        });
        let expect: Vec<f64> = x.iter().chain(&x).map(|v| v * 0.625).collect();
        assert_close(
            &format!("doubled input n={n}"),
            &read(&g, &doubled),
            &expect,
            0.0,
            1e-7,
        );
        assert_close(
            &format!("guidance n={n}"),
            &read(&g, &guided),
            &r::guidance_combine(&out2, 3.5),
            1e-6,
            1e-6,
        );
    }
}

#[test]
fn inpaint_known_and_renoise_match_reference() {
    let g = gpu();
    for (images, per) in [(1usize, 1usize), (3, 7), (5, 333)] {
        let n = images * per;
        let x = random(n, 50 + n as u64);
        let z = random(n, 51 + n as u64);
        let known = random(per, 52 + n as u64);
        let keep: Vec<f64> = (0..per).map(|j| (j % 3 == 0) as u32 as f64).collect();
        let (a, b) = (0.8125f32, 0.375f32);
        let mut coeffs_v = [0.0f32; COEFFS_LEN];
        (coeffs_v[5], coeffs_v[6]) = (a, b);
        let tx = upload(&g, &[n], &x, "x");
        let tx2 = upload(&g, &[n], &x, "x renoised");
        let tz = upload(&g, &[n], &z, "z");
        let tk = upload(&g, &[per], &known, "known");
        let tm = upload(&g, &[per], &keep, "keep");
        let coeffs = g.tensor_from(&[COEFFS_LEN], &coeffs_v, "coeffs").unwrap();
        run(&g, |rec| {
            op::inpaint_known(rec, &tx, &tz, &coeffs, &tk, &tm).unwrap();
            op::renoise(rec, &tx2, &tz, &coeffs).unwrap();
        });
        assert_close(
            &format!("inpaint_known {images}x{per}"),
            &read(&g, &tx),
            &r::inpaint_known(&x, &z, a as f64, b as f64, &known, &keep),
            1e-6,
            1e-6,
        );
        let expect: Vec<f64> = x
            .iter()
            .zip(&z)
            .map(|(x, z)| a as f64 * x + b as f64 * z)
            .collect();
        assert_close(
            &format!("renoise {n}"),
            &read(&g, &tx2),
            &expect,
            1e-6,
            1e-6,
        );
    }
}
