//! layer_norm.wgsl against reference::layer_norm.
//!
//! Tolerances: the row statistics are f32 sums of up to 1280 terms (in order up to 512 columns;
//! wider, 64 strided partial sums, then a tree), relative error ~1e-6; y inherits it plus a few roundings (rtol 1e-5, atol 1e-5 ·
//! max|ref|). dx adds the cancellation of dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂) and dγ/dβ are sums over
//! up to 600 rows: rtol 1e-4, atol 1e-5 · max|ref| (group_norm's bounds; observed ~10× below).

use crate::common::*;
use wgpu_diffusion::ops::layer_norm::{
    LayerNormGrads, layer_norm_backward, layer_norm_forward, stats_tensor,
};
use wgpu_diffusion::reference::layer_norm as r;

/// (rows, C): one element, odd widths under and over the 64-lane stride, CLIP/SD widths (320,
/// 768) and more rows than one parameter-partial chunk (64); both sides of ROWS_MAX_COLS (512:
/// an invocation per row up to it, a workgroup per row above), with a partial last workgroup.
const SHAPES: [(usize, usize); 9] = [
    (129, 512),
    (67, 513),
    (1, 1),
    (3, 7),
    (5, 33),
    (77, 64),
    (130, 320),
    (2, 768),
    (600, 40),
];

#[test]
fn forward_backward_match_reference() {
    let g = gpu();
    for (i, &(rows, cols)) in SHAPES.iter().enumerate() {
        let what = format!("{rows}x{cols}");
        let seed = 300 + 10 * i as u64;
        let x: Vec<f64> = f32_round(
            &test_data(rows * cols, seed)
                .iter()
                .map(|v| 1.5 + 2.0 * v)
                .collect::<Vec<_>>(),
        );
        let gamma: Vec<f64> = f32_round(
            &test_data(cols, seed + 1)
                .iter()
                .map(|v| 1.0 + 0.5 * v)
                .collect::<Vec<_>>(),
        );
        let beta = random(cols, seed + 2);
        let dy = random(rows * cols, seed + 3);
        let (prior_dx, prior_g, prior_b) = (
            random(rows * cols, seed + 4),
            random(cols, seed + 5),
            random(cols, seed + 6),
        );
        let eps = 1e-5f32;
        let shape = [rows, cols];
        let (tx, tg, tb, tdy) = (
            upload(&g, &shape, &x, "x"),
            upload(&g, &[cols], &gamma, "gamma"),
            upload(&g, &[cols], &beta, "beta"),
            upload(&g, &shape, &dy, "dy"),
        );
        let ty = g.tensor(&shape, "y");
        let tdx = upload(&g, &shape, &prior_dx, "dx (accumulated into)");
        let tdx_fresh = g.tensor(&shape, "dx");
        let (tdg, tdb) = (
            upload(&g, &[cols], &prior_g, "dgamma"),
            upload(&g, &[cols], &prior_b, "dbeta"),
        );
        let (tdg2, tdb2) = (g.tensor(&[cols], "dgamma2"), g.tensor(&[cols], "dbeta2"));
        let mut stats = None;
        run(&g, |rec| {
            let ts = stats_tensor(rec, &tx, cols, "stats");
            layer_norm_forward(rec, &tx, (&tg, &tb), eps, &ty, &ts).unwrap();
            let grads = LayerNormGrads {
                dx: &tdx,
                add_dx: true,
                dgamma: &tdg,
                dbeta: &tdb,
            };
            layer_norm_backward(rec, &tx, &tg, &ts, &tdy, &grads).unwrap();
            let fresh = LayerNormGrads {
                dx: &tdx_fresh,
                add_dx: false,
                dgamma: &tdg2,
                dbeta: &tdb2,
            };
            layer_norm_backward(rec, &tx, &tg, &ts, &tdy, &fresh).unwrap();
            stats = Some(ts);
        });
        let (y, st) = r::layer_norm_forward(&x, cols, &gamma, &beta, eps as f64);
        let (dx, dgamma, dbeta) = r::layer_norm_backward(&x, cols, &gamma, &st, &dy);
        let flat: Vec<f64> = st.iter().flat_map(|&(m, s)| [m, s]).collect();
        let got_stats = read(&g, stats.as_ref().unwrap());
        assert_close(&format!("stats {what}"), &got_stats, &flat, 1e-6, 1e-5);
        assert_close(
            &format!("y {what}"),
            &read(&g, &ty),
            &y,
            1e-5 * max_abs(&y),
            1e-5,
        );
        let (atol_dx, atol_g) = (
            1e-5 * max_abs(&dx),
            1e-5 * max_abs(&dgamma).max(max_abs(&dbeta)),
        );
        assert_close(
            &format!("dx {what}"),
            &read(&g, &tdx_fresh),
            &dx,
            atol_dx,
            1e-4,
        );
        let dx_acc: Vec<f64> = dx.iter().zip(&prior_dx).map(|(a, b)| a + b).collect();
        assert_close(
            &format!("dx += {what}"),
            &read(&g, &tdx),
            &dx_acc,
            atol_dx,
            1e-4,
        );
        assert_close(
            &format!("dgamma {what}"),
            &read(&g, &tdg2),
            &dgamma,
            atol_g,
            1e-4,
        );
        assert_close(
            &format!("dbeta {what}"),
            &read(&g, &tdb2),
            &dbeta,
            atol_g,
            1e-4,
        );
        let acc =
            |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x + y).collect() };
        assert_close(
            &format!("dgamma += {what}"),
            &read(&g, &tdg),
            &acc(&dgamma, &prior_g),
            atol_g,
            1e-4,
        );
        assert_close(
            &format!("dbeta += {what}"),
            &read(&g, &tdb),
            &acc(&dbeta, &prior_b),
            atol_g,
            1e-4,
        );
    }
}

#[test]
fn shapes_that_do_not_fit_are_errors() {
    let g = gpu();
    let x = g.tensor(&[4, 6], "x");
    let (gamma, beta) = (g.tensor(&[5], "gamma"), g.tensor(&[5], "beta"));
    let y = g.tensor(&[4, 6], "y");
    let mut rec = g.recorder();
    let stats = stats_tensor(&rec, &x, 5, "stats");
    let e = layer_norm_forward(&mut rec, &x, (&gamma, &beta), 1e-5, &y, &stats).unwrap_err();
    assert!(e.to_string().contains("does not split into rows"), "{e}");
    let gamma6 = g.tensor(&[6], "gamma6");
    let e = layer_norm_forward(&mut rec, &x, (&gamma6, &beta), 1e-5, &y, &stats).unwrap_err();
    assert!(e.to_string().contains("beta"), "{e}");
}
