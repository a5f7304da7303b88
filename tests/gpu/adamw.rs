//! adamw.wgsl against reference::adamw: six AdamW + EMA steps with weight decay, a changing
//! learning rate and gradient clipping, all from ONE recorded plan replayed each step with new
//! gradients and a rewritten hyper tensor.
//!
//! Tolerances. Parameters are O(1) and each step adds a few f32 roundings of magnitude
//! 2^-24·|p| (decay multiply, update subtract) plus the update's own relative error (a few ulp
//! of lr·m/denom ≤ ~lr): after 6 steps ≤ ~1e-6 absolute, hence atol 1e-6 (rtol 0). The EMA is
//! a convex combination of such values: atol 1e-6. m and v are short f32 recurrences of the
//! (clipped) gradient, ~2 roundings per step relative to themselves: rtol 1e-5,
//! atol 1e-6·max|ref|. The gradient norm sums non-negative squares (≤ 26 sequential f32 adds
//! deep, see tests/gpu/loss.rs) then one sqrt: rtol 1e-5; the clip factor adds a divide: rtol 1e-5.

use crate::common::*;
use wgpu_diffusion::ops::adamw::{self as op, AdamwConfig, AdamwHyper, EmaConfig};
use wgpu_diffusion::reference::adamw as r;

// Multiples of 4 (8, 70 004) run the vec4 kernels.
const SIZES: [usize; 7] = [1, 3, 7, 8, 33, 70_001, 70_004];

#[test]
fn adamw_ema_and_clipping_over_six_steps() {
    let g = gpu();
    let cfg = AdamwConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.05,
    };
    let ema_cfg = EmaConfig {
        decay: 0.995,
        use_ema_warmup: true,
        power: 0.75,
        ..Default::default()
    };
    for (si, &n) in SIZES.iter().enumerate() {
        let seed = 10 * si as u64;
        let mut p = random(n, seed + 1);
        let mut ema = p.clone();
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        let tp = upload(&g, &[n], &p, "params");
        let tema = upload(&g, &[n], &ema, "ema");
        let (tgrad, tm, tv) = (
            g.tensor(&[n], "grads"),
            g.tensor(&[n], "exp_avg"),
            g.tensor(&[n], "exp_avg_sq"),
        );
        let thyper = g.tensor(&[op::HYPER_LEN], "hyper");
        let tnorm = g.tensor(&[2], "clip, norm");
        // Clip at about half the typical norm so that some steps clip and others do not.
        let max_norm = 0.5 * (n as f32 / 3.0).sqrt();
        let mut rec = g.recorder();
        op::grad_norm(&mut rec, &tgrad, Some(max_norm), &tnorm).unwrap();
        op::adamw_step(&mut rec, &thyper, &tnorm, &tgrad, &tp, &tm, &tv).unwrap();
        op::ema_update(&mut rec, &thyper, &tp, &tema).unwrap();
        let plan = rec.finish();

        let grad_gain = [0.2, 1.5, 0.3, 2.0, 0.1, 1.0];
        for step in 1..=6u32 {
            // Linear warmup then decay, so lr differs every step.
            let lr = 1e-2 * [0.25, 0.5, 1.0, 0.8, 0.6, 0.4][step as usize - 1];
            let grads = f32_round(
                &random(n, seed + 100 + step as u64)
                    .iter()
                    .map(|x| x * grad_gain[step as usize - 1])
                    .collect::<Vec<_>>(),
            );
            let decay = ema_cfg.get_decay(step as u64);
            g.write(&tgrad, &grads.iter().map(|&x| x as f32).collect::<Vec<_>>())
                .unwrap();
            op::write_hyper(&g, &thyper, &AdamwHyper::new(&cfg, lr, step, decay)).unwrap();
            g.run(&[&plan]).unwrap();

            let (clip, norm) = r::grad_norm(&grads, Some(max_norm as f64));
            r::adamw_step(
                &mut p,
                &grads,
                &mut m,
                &mut v,
                lr,
                cfg.beta1,
                cfg.beta2,
                cfg.eps,
                cfg.weight_decay,
                step,
                clip,
            );
            r::ema_update(&mut ema, &p, decay);

            let what = format!("n={n} step {step}");
            let gn = read(&g, &tnorm);
            assert_close(&format!("grad norm {what}"), &gn[1..], &[norm], 0.0, 1e-5);
            assert_close(&format!("clip factor {what}"), &gn[..1], &[clip], 0.0, 1e-5);
            assert_close(&format!("params {what}"), &read(&g, &tp), &p, 1e-6, 0.0);
            assert_close(
                &format!("exp_avg {what}"),
                &read(&g, &tm),
                &m,
                1e-6 * max_abs(&m),
                1e-5,
            );
            assert_close(
                &format!("exp_avg_sq {what}"),
                &read(&g, &tv),
                &v,
                1e-6 * max_abs(&v),
                1e-5,
            );
            assert_close(&format!("ema {what}"), &read(&g, &tema), &ema, 1e-6, 0.0);
        }
    }
}

#[test]
fn unit_grad_scale_and_no_clipping() {
    // A grad_scale tensor holding 1.0 and grad_norm without max_norm both leave g unscaled.
    let g = gpu();
    let n = 33;
    let cfg = AdamwConfig::default();
    let (mut p, grads) = (random(n, 1), random(n, 2));
    let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
    let tp = upload(&g, &[n], &p, "params");
    let tgrad = upload(&g, &[n], &grads, "grads");
    let (tm, tv, thyper) = (
        g.tensor(&[n], "m"),
        g.tensor(&[n], "v"),
        g.tensor(&[op::HYPER_LEN], "hyper"),
    );
    let (tone, tnorm) = (
        g.tensor_from(&[1], &[1.0], "one").unwrap(),
        g.tensor(&[2], "norm"),
    );
    op::write_hyper(&g, &thyper, &AdamwHyper::new(&cfg, 1e-3, 1, 0.0)).unwrap();
    run(&g, |rec| {
        op::grad_norm(rec, &tgrad, None, &tnorm).unwrap();
        op::adamw_step(rec, &thyper, &tone, &tgrad, &tp, &tm, &tv).unwrap();
    });
    r::adamw_step(
        &mut p,
        &grads,
        &mut m,
        &mut v,
        1e-3,
        cfg.beta1,
        cfg.beta2,
        cfg.eps,
        cfg.weight_decay,
        1,
        1.0,
    );
    assert_close("params", &read(&g, &tp), &p, 1e-6, 0.0);
    let (_, norm) = r::grad_norm(&grads, None);
    assert_close(
        "norm without clipping",
        &read(&g, &tnorm),
        &[1.0, norm],
        0.0,
        1e-5,
    );
}

#[test]
fn grad_norm_is_deterministic_with_many_partials() {
    // 600 003 elements: 293 partial sums, so the second stage loops past its 256 threads.
    let g = gpu();
    let n = 600_003;
    let grads = random(n, 7);
    let tgrad = upload(&g, &[n], &grads, "grads");
    let tnorm = g.tensor(&[2], "norm");
    let plan = run(&g, |rec| {
        op::grad_norm(rec, &tgrad, Some(1.0), &tnorm).unwrap()
    });
    let first = read(&g, &tnorm);
    let (clip, norm) = r::grad_norm(&grads, Some(1.0));
    assert_close("grad norm 600003", &first, &[clip, norm], 0.0, 1e-5);
    g.run(&[&plan]).unwrap();
    let second = read(&g, &tnorm);
    assert_eq!(
        first.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        second.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
}

#[test]
fn invalid_arguments_are_errors() {
    let g = gpu();
    let mut rec = g.recorder();
    let (p, gr, m, v) = (
        g.tensor(&[8], "p"),
        g.tensor(&[8], "g"),
        g.tensor(&[8], "m"),
        g.tensor(&[7], "v"),
    );
    let (h, s) = (g.tensor(&[op::HYPER_LEN], "h"), g.tensor(&[1], "s"));
    let e = op::adamw_step(&mut rec, &h, &s, &gr, &p, &m, &v)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("adamw_step") && e.contains("`exp_avg_sq`"),
        "{e}"
    );
    let e = op::adamw_step(&mut rec, &h, &s, &gr, &p, &m, &m)
        .unwrap_err()
        .to_string();
    assert!(e.contains("share a buffer"), "{e}");
    let e = op::adamw_step(
        &mut rec,
        &g.tensor(&[3], "h"),
        &s,
        &gr,
        &p,
        &m,
        &g.tensor(&[8], "v"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`hyper`"), "{e}");
    let e = op::grad_norm(&mut rec, &gr, Some(-1.0), &g.tensor(&[2], "o"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_norm"), "{e}");
    let e = op::ema_update(&mut rec, &h, &p, &p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("share a buffer"), "{e}");
}
