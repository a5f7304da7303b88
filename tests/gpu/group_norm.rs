//! group_norm.wgsl against reference::group_norm.
//!
//! Tolerances: the statistics are f32 sums of up to 65536 terms (per-thread sequential partial
//! sums of <= 256 terms, then a tree), so mean/rstd carry relative errors of ~1e-6; y, dx, dgamma
//! and dbeta inherit that plus a few roundings per element, and dx additionally the cancellation
//! in dxhat - mean(dxhat) - xhat*mean(dxhat*xhat). Hence rtol 1e-4 with atol 1e-5 * max|ref| for
//! the backward (the brief's bound for f32 reductions), and rtol 1e-5, atol 1e-5 * max|ref| for the
//! forward (observed errors are ~10x below both).

use crate::common::*;
use wgpu_diffusion::ops::group_norm as gn;
use wgpu_diffusion::reference::group_norm as r;

/// (N, H, W, C, G): odd sizes, C/G = 1 and C/G > 256-thread strides, a 65536-element group.
/// C % 4 == 0 runs the vectorised kernels (with C/G = 1, 2 and wider groups), the rest the
/// scalar ones.
const SHAPES: [(usize, usize, usize, usize, usize); 9] = [
    (1, 1, 1, 1, 1),
    (3, 3, 5, 8, 8),
    (2, 28, 28, 96, 8),
    (2, 3, 5, 6, 3),
    (3, 7, 7, 33, 3),
    (1, 1, 33, 7, 7),
    (2, 8, 8, 64, 32),
    (1, 16, 16, 256, 1),
    (2, 3, 3, 300, 1),
];

#[test]
fn forward_backward_match_reference() {
    let g = gpu();
    for (i, &(n, h, w, c, groups)) in SHAPES.iter().enumerate() {
        let what = format!("{n}x{h}x{w}x{c} G={groups}");
        let seed = 100 + 10 * i as u64;
        let numel = n * h * w * c;
        // An offset mean (3) exercises the two-pass variance.
        let x: Vec<f64> = f32_round(
            &test_data(numel, seed)
                .iter()
                .map(|v| 3.0 + 2.0 * v)
                .collect::<Vec<_>>(),
        );
        let gamma: Vec<f64> = f32_round(
            &test_data(c, seed + 1)
                .iter()
                .map(|v| 1.0 + 0.5 * v)
                .collect::<Vec<_>>(),
        );
        let beta = random(c, seed + 2);
        let dy = random(numel, seed + 3);
        let prior_g = random(c, seed + 4);
        let prior_b = random(c, seed + 5);
        let eps = 1e-5f32;
        let shape = [n, h, w, c];
        let (tx, tg, tb, tdy) = (
            upload(&g, &shape, &x, "x"),
            upload(&g, &[c], &gamma, "gamma"),
            upload(&g, &[c], &beta, "beta"),
            upload(&g, &shape, &dy, "dy"),
        );
        let (ty, tm, ts, tdx) = (
            g.tensor(&shape, "y"),
            g.tensor(&[n * groups], "mean"),
            g.tensor(&[n * groups], "rstd"),
            g.tensor(&shape, "dx"),
        );
        let (tdg, tdb) = (g.tensor(&[c], "dgamma"), g.tensor(&[c], "dbeta"));
        let (tag, tab) = (
            upload(&g, &[c], &prior_g, "acc dgamma"),
            upload(&g, &[c], &prior_b, "acc dbeta"),
        );
        let prior_dx = random(numel, seed + 6);
        let tdx2 = upload(&g, &shape, &prior_dx, "dx2");
        let (tdx3, tdg3, tdb3) = (
            g.tensor(&shape, "dx3"),
            g.tensor(&[c], "dgamma3"),
            g.tensor(&[c], "dbeta3"),
        );
        run(&g, |rec| {
            gn::group_norm_forward(rec, &tx, &tg, &tb, groups, eps, &ty, &tm, &ts).unwrap();
            gn::group_norm_backward(
                rec, &tx, &tdy, &tg, &tm, &ts, &tdx, &tdg, &tdb, false, false,
            )
            .unwrap();
            // Parameter gradients and dx both accumulated.
            gn::group_norm_backward(rec, &tx, &tdy, &tg, &tm, &ts, &tdx2, &tag, &tab, true, true)
                .unwrap();
            gn::group_norm_backward(
                rec, &tx, &tdy, &tg, &tm, &ts, &tdx3, &tdg3, &tdb3, false, false,
            )
            .unwrap();
        });
        let (y, stats) = r::group_norm_forward(&x, n, h * w, c, groups, &gamma, &beta, eps as f64);
        let (dx, dgamma, dbeta) =
            r::group_norm_backward(&x, &dy, n, h * w, c, groups, &gamma, &stats);
        assert_close(
            &format!("mean {what}"),
            &read(&g, &tm),
            &stats.mean,
            1e-5 * max_abs(&stats.mean),
            1e-5,
        );
        assert_close(
            &format!("rstd {what}"),
            &read(&g, &ts),
            &stats.rstd,
            0.0,
            1e-5,
        );
        assert_close(
            &format!("y {what}"),
            &read(&g, &ty),
            &y,
            1e-5 * max_abs(&y),
            1e-5,
        );
        assert_close(
            &format!("dx {what}"),
            &read(&g, &tdx),
            &dx,
            1e-5 * max_abs(&dx),
            1e-4,
        );
        assert_close(
            &format!("dgamma {what}"),
            &read(&g, &tdg),
            &dgamma,
            1e-5 * max_abs(&dgamma),
            1e-4,
        );
        assert_close(
            &format!("dbeta {what}"),
            &read(&g, &tdb),
            &dbeta,
            1e-5 * max_abs(&dbeta),
            1e-4,
        );
        let acc_dx: Vec<f64> = dx.iter().zip(&prior_dx).map(|(a, b)| a + b).collect();
        assert_close(
            &format!("dx accumulate {what}"),
            &read(&g, &tdx2),
            &acc_dx,
            1e-5 * max_abs(&acc_dx),
            1e-4,
        );
        let acc_g: Vec<f64> = dgamma.iter().zip(&prior_g).map(|(a, b)| a + b).collect();
        let acc_b: Vec<f64> = dbeta.iter().zip(&prior_b).map(|(a, b)| a + b).collect();
        assert_close(
            &format!("dgamma accumulate {what}"),
            &read(&g, &tag),
            &acc_g,
            1e-5 * max_abs(&acc_g),
            1e-4,
        );
        assert_close(
            &format!("dbeta accumulate {what}"),
            &read(&g, &tab),
            &acc_b,
            1e-5 * max_abs(&acc_b),
            1e-4,
        );
        // Same inputs, same bits: the two backward runs wrote dx through identical reductions.
        assert_eq!(
            read(&g, &tdx),
            read(&g, &tdx3),
            "dx not reproducible {what}"
        );
    }
}

#[test]
fn repeated_runs_are_bitwise_identical() {
    let g = gpu();
    let (n, h, w, c, groups) = (2, 16, 16, 64, 8);
    let shape = [n, h, w, c];
    let x = random(n * h * w * c, 7);
    let dy = random(n * h * w * c, 8);
    let (tx, tdy, tg, tb) = (
        upload(&g, &shape, &x, "x"),
        upload(&g, &shape, &dy, "dy"),
        upload(&g, &[c], &random(c, 9), "g"),
        upload(&g, &[c], &random(c, 10), "b"),
    );
    let (ty, tm, ts, tdx, tdg, tdb) = (
        g.tensor(&shape, "y"),
        g.tensor(&[n * groups], "m"),
        g.tensor(&[n * groups], "s"),
        g.tensor(&shape, "dx"),
        g.tensor(&[c], "dg"),
        g.tensor(&[c], "db"),
    );
    let mut rec = g.recorder();
    gn::group_norm_forward(&mut rec, &tx, &tg, &tb, groups, 1e-6, &ty, &tm, &ts).unwrap();
    gn::group_norm_backward(
        &mut rec, &tx, &tdy, &tg, &tm, &ts, &tdx, &tdg, &tdb, false, false,
    )
    .unwrap();
    let plan = rec.finish();
    let mut first = None;
    for _ in 0..3 {
        g.run(&[&plan]).unwrap();
        let got = [
            read(&g, &ty),
            read(&g, &tm),
            read(&g, &ts),
            read(&g, &tdx),
            read(&g, &tdg),
            read(&g, &tdb),
        ];
        let bits: Vec<Vec<u32>> = got
            .iter()
            .map(|v| v.iter().map(|f| f.to_bits()).collect())
            .collect();
        match &first {
            None => first = Some(bits),
            Some(f) => assert_eq!(
                f, &bits,
                "group_norm results changed between identical runs"
            ),
        }
    }
}

#[test]
fn invalid_shapes_are_errors() {
    let g = gpu();
    let x = g.tensor(&[1, 2, 2, 6], "x");
    let (c6, c5) = (g.tensor(&[6], "c6"), g.tensor(&[5], "c5"));
    let (y, m, s) = (
        g.tensor(&[1, 2, 2, 6], "y"),
        g.tensor(&[3], "m"),
        g.tensor(&[3], "s"),
    );
    let mut rec = g.recorder();
    let e = gn::group_norm_forward(&mut rec, &x, &c6, &c6, 4, 1e-5, &y, &m, &s)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("group_norm_forward") && e.contains("groups"),
        "{e}"
    );
    let e = gn::group_norm_forward(&mut rec, &x, &c5, &c6, 3, 1e-5, &y, &m, &s)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`gamma`"), "{e}");
    let e = gn::group_norm_forward(&mut rec, &x, &c6, &c6, 3, 1e-5, &x, &m, &s)
        .unwrap_err()
        .to_string();
    assert!(e.contains("share a buffer"), "{e}");
    let e = gn::group_norm_forward(&mut rec, &x, &c6, &c6, 2, 1e-5, &y, &m, &s)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`mean`"), "{e}");
    let e = gn::group_norm_forward(&mut rec, &x.reshape(&[4, 6]), &c6, &c6, 3, 1e-5, &y, &m, &s)
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 4"), "{e}");
    let e = gn::group_norm_backward(&mut rec, &x, &y, &c6, &m, &s, &x, &c6, &c6, false, false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("group_norm_backward") && e.contains("share a buffer"),
        "{e}"
    );
    let e = gn::group_norm_backward(
        &mut rec,
        &x,
        &y,
        &c6,
        &g.tensor(&[4], "m4"),
        &s,
        &c5,
        &c6,
        &c6,
        false,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("groups"), "{e}");
    assert!(rec.is_empty(), "nothing is recorded by a failing call");
}

/// The fused GroupNorm + SiLU against the unfused pair it replaces in the U-Net (GroupNorm, then
/// silu_forward; silu_backward, then GroupNorm's backward), and the f64 reference of the pair.
#[test]
fn fused_silu_matches_the_unfused_pair() {
    use wgpu_diffusion::ops::elementwise::{silu_backward, silu_forward};
    let g = gpu();
    for (i, &(n, h, w, c, groups)) in SHAPES.iter().enumerate() {
        let what = format!("{n}x{h}x{w}x{c} G={groups}");
        let seed = 700 + 10 * i as u64;
        let numel = n * h * w * c;
        let shape = [n, h, w, c];
        let x = f32_round(&random(numel, seed));
        let gamma: Vec<f64> = f32_round(
            &test_data(c, seed + 1)
                .iter()
                .map(|v| 1.0 + 0.5 * v)
                .collect::<Vec<_>>(),
        );
        let beta = f32_round(&random(c, seed + 2));
        let ds = f32_round(&random(numel, seed + 3));
        let eps = 1e-5f32;
        let (tx, tg, tb, tds) = (
            upload(&g, &shape, &x, "x"),
            upload(&g, &[c], &gamma, "gamma"),
            upload(&g, &[c], &beta, "beta"),
            upload(&g, &shape, &ds, "d silu"),
        );
        let t = |label: &str| g.tensor(&shape, label);
        let (fused_s, fused_dx) = (t("fused silu"), t("fused dx"));
        let (norm, unfused_s, dnorm, unfused_dx) =
            (t("norm"), t("silu"), t("d norm"), t("unfused dx"));
        let stats = |l: &str| g.tensor(&[n * groups], l);
        let (m1, r1, m2, r2) = (stats("m1"), stats("r1"), stats("m2"), stats("r2"));
        let params = |l: &str| g.tensor(&[c], l);
        let (dg1, db1, dg2, db2) = (params("dg1"), params("db1"), params("dg2"), params("db2"));
        run(&g, |rec| {
            gn::group_norm_silu_forward(rec, &tx, &tg, &tb, groups, eps, &fused_s, &m1, &r1)
                .unwrap();
            gn::group_norm_silu_backward(
                rec, &tx, &tds, &tg, &tb, &m1, &r1, &fused_dx, &dg1, &db1, false, false,
            )
            .unwrap();
            gn::group_norm_forward(rec, &tx, &tg, &tb, groups, eps, &norm, &m2, &r2).unwrap();
            silu_forward(rec, &norm, &unfused_s).unwrap();
            silu_backward(rec, &norm, &tds, &dnorm, false).unwrap();
            gn::group_norm_backward(
                rec,
                &tx,
                &dnorm,
                &tg,
                &m2,
                &r2,
                &unfused_dx,
                &dg2,
                &db2,
                false,
                false,
            )
            .unwrap();
        });
        // Fused against unfused: the same f32 operations in the same order.
        for (name, a, b) in [
            ("silu(norm(x))", &fused_s, &unfused_s),
            ("dx", &fused_dx, &unfused_dx),
            ("dgamma", &dg1, &dg2),
            ("dbeta", &db1, &db2),
        ] {
            let (a, b) = (read(&g, a), read(&g, b));
            let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
            assert_close(
                &format!("fused vs unfused {name} {what}"),
                &a,
                &b64,
                1e-6,
                1e-6,
            );
        }
        // And against the f64 reference of the pair.
        let (y, st) = r::group_norm_forward(&x, n, h * w, c, groups, &gamma, &beta, eps as f64);
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let s_ref: Vec<f64> = y.iter().map(|&v| v * sig(v)).collect();
        let dy_ref: Vec<f64> = y
            .iter()
            .zip(&ds)
            .map(|(&v, &d)| d * sig(v) * (1.0 + v * (1.0 - sig(v))))
            .collect();
        let (dx, dgamma, dbeta) =
            r::group_norm_backward(&x, &dy_ref, n, h * w, c, groups, &gamma, &st);
        assert_close(
            &format!("fused silu {what}"),
            &read(&g, &fused_s),
            &s_ref,
            1e-5,
            1e-5,
        );
        let tol = |v: &[f64]| 1e-5 * max_abs(v);
        assert_close(
            &format!("fused dx {what}"),
            &read(&g, &fused_dx),
            &dx,
            tol(&dx),
            1e-4,
        );
        assert_close(
            &format!("fused dgamma {what}"),
            &read(&g, &dg1),
            &dgamma,
            tol(&dgamma),
            1e-4,
        );
        assert_close(
            &format!("fused dbeta {what}"),
            &read(&g, &db1),
            &dbeta,
            tol(&dbeta),
            1e-4,
        );
    }
}
