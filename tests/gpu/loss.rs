//! loss.wgsl against reference::loss.
//!
//! The loss sums N non-negative terms (positive weights) in f32 through ≤ 8 sequential adds per
//! thread, an 8-level tree and a second such stage: the relative error is bounded by about
//! (8 + 8 + 2 + 8) · 2^-24 ≈ 1.6e-6, so rtol 1e-5 (atol 0: no cancellation is possible).
//! The gradient is 2–3 f32 roundings per element relative to itself: rtol 1e-6, with
//! atol 1e-7·max|ref| for the elements where pred − target rounds near zero.

use crate::common::*;
use wgpu_diffusion::ops::loss as op;
use wgpu_diffusion::reference::loss as r;

/// (B, elements per sample): 1, 3, 7, 33 and 70 001 elements, and one with more than 256
/// partial sums so the second stage loops.
const SHAPES: [(usize, usize); 6] = [(1, 1), (3, 1), (7, 1), (3, 11), (7, 10_001), (3, 200_001)];

#[test]
fn mse_forward_backward() {
    let g = gpu();
    for (i, &(b, per)) in SHAPES.iter().enumerate() {
        let n = b * per;
        let (pred, target) = (random(n, 100 + i as u64), random(n, 200 + i as u64));
        let w = f32_round(
            &random(b, 300 + i as u64)
                .iter()
                .map(|v| v + 1.5)
                .collect::<Vec<_>>(),
        );
        let (tp, tt, tw) = (
            upload(&g, &[b, per], &pred, "pred"),
            upload(&g, &[b, per], &target, "target"),
            upload(&g, &[b], &w, "w"),
        );
        let (l0, l1) = (g.tensor(&[1], "loss"), g.tensor(&[1], "loss weighted"));
        let (d0, d1) = (
            g.tensor(&[b, per], "dpred"),
            g.tensor(&[b, per], "dpred weighted"),
        );
        let plan = run(&g, |rec| {
            op::mse_loss(rec, &tp, &tt, None, &l0).unwrap();
            op::mse_loss(rec, &tp, &tt, Some(&tw), &l1).unwrap();
            op::mse_backward(rec, &tp, &tt, None, 1.0, &d0).unwrap();
            op::mse_backward(rec, &tp, &tt, Some(&tw), 0.25, &d1).unwrap();
        });
        let shape = format!("{b}x{per}");
        assert_close(
            &format!("mse {shape}"),
            &read(&g, &l0),
            &[r::mse_loss(&pred, &target, None)],
            0.0,
            1e-5,
        );
        assert_close(
            &format!("mse weighted {shape}"),
            &read(&g, &l1),
            &[r::mse_loss(&pred, &target, Some(&w))],
            0.0,
            1e-5,
        );
        let d = r::mse_backward(&pred, &target, None, 1.0);
        assert_close(
            &format!("mse_backward {shape}"),
            &read(&g, &d0),
            &d,
            1e-7 * max_abs(&d),
            1e-6,
        );
        let d = r::mse_backward(&pred, &target, Some(&w), 0.25);
        assert_close(
            &format!("mse_backward weighted {shape}"),
            &read(&g, &d1),
            &d,
            1e-7 * max_abs(&d),
            1e-6,
        );

        // Replaying the same plan gives the same bits (fixed reduction order).
        let first = (read(&g, &l0)[0].to_bits(), read(&g, &l1)[0].to_bits());
        g.run(&[&plan]).unwrap();
        assert_eq!(
            (read(&g, &l0)[0].to_bits(), read(&g, &l1)[0].to_bits()),
            first,
            "mse {shape}: replay differs"
        );
    }
}

#[test]
fn mse_is_deterministic_across_plans() {
    let g = gpu();
    let n = 70_001;
    let (tp, tt) = (
        upload(&g, &[1, n], &random(n, 1), "pred"),
        upload(&g, &[1, n], &random(n, 2), "target"),
    );
    let bits: Vec<u32> = (0..2)
        .map(|_| {
            let l = g.tensor(&[1], "loss");
            run(&g, |rec| op::mse_loss(rec, &tp, &tt, None, &l).unwrap());
            read(&g, &l)[0].to_bits()
        })
        .collect();
    assert_eq!(bits[0], bits[1]);
}

#[test]
fn invalid_arguments_are_errors() {
    let g = gpu();
    let mut rec = g.recorder();
    let (p, t) = (g.tensor(&[2, 3], "p"), g.tensor(&[2, 4], "t"));
    let e = op::mse_loss(&mut rec, &p, &t, None, &g.tensor(&[1], "l"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("mse_loss") && e.contains("`target`"), "{e}");
    let e = op::mse_loss(
        &mut rec,
        &p,
        &p,
        Some(&g.tensor(&[3], "w")),
        &g.tensor(&[1], "l"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`weights`"), "{e}");
    let e = op::mse_backward(&mut rec, &p, &p, None, 1.0, &p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("share a buffer"), "{e}");
}

/// The VAE's L1 reconstruction loss, (1/B) Σ|pred − target|, and its gradient, on odd sizes
/// (one chunk, several, a partial last one) with some equal elements (sign 0). The sum has the
/// MSE's error bound (rtol 1e-5, see above); the gradient is one rounding of scale / B.
#[test]
fn l1_loss_and_backward_match_reference() {
    let g = gpu();
    for (batch, per) in [(1, 1), (3, 7), (2, 2049), (5, 999)] {
        let n = batch * per;
        let pred = random(n, 31 + n as u64);
        let mut target = random(n, 32 + n as u64);
        target[0] = pred[0];
        let tp = upload(&g, &[batch, per], &pred, "pred");
        let tt = upload(&g, &[batch, per], &target, "target");
        let loss = g.tensor(&[1], "l1");
        let dpred = g.tensor(&[batch, per], "dpred");
        run(&g, |rec| {
            op::l1_loss(rec, &tp, &tt, &loss).unwrap();
            op::l1_backward(rec, &tp, &tt, 0.5, &dpred).unwrap();
        });
        let what = format!("B{batch} x {per}");
        assert_close(
            &format!("l1_loss {what}"),
            &read(&g, &loss),
            &[r::l1_loss(&pred, &target, batch)],
            0.0,
            1e-5,
        );
        assert_close(
            &format!("l1_backward {what}"),
            &read(&g, &dpred),
            &r::l1_backward(&pred, &target, batch, 0.5),
            0.0,
            1e-7,
        );
    }
}

/// The VAE's `--rec-loss l2`, (1/B) Σ (pred − target)² (summed per image, averaged over the
/// batch), and its gradient, on odd sizes (one chunk, several, a partial last one, more than
/// 256 partials). The sum has the MSE's error bound (rtol 1e-5); the gradient, as the MSE's,
/// 2–3 roundings per element (rtol 1e-6, atol 1e-7·max|ref|).
#[test]
fn l2_loss_and_backward_match_reference() {
    let g = gpu();
    for (batch, per) in [(1, 1), (3, 7), (2, 2049), (5, 999), (3, 200_001)] {
        let n = batch * per;
        let (pred, target) = (random(n, 41 + n as u64), random(n, 42 + n as u64));
        let tp = upload(&g, &[batch, per], &pred, "pred");
        let tt = upload(&g, &[batch, per], &target, "target");
        let loss = g.tensor(&[1], "l2");
        let dpred = g.tensor(&[batch, per], "dpred");
        run(&g, |rec| {
            op::l2_loss(rec, &tp, &tt, &loss).unwrap();
            op::l2_backward(rec, &tp, &tt, 0.5, &dpred).unwrap();
        });
        let what = format!("B{batch} x {per}");
        assert_close(
            &format!("l2_loss {what}"),
            &read(&g, &loss),
            &[r::l2_loss(&pred, &target, batch)],
            0.0,
            1e-5,
        );
        let d = r::l2_backward(&pred, &target, batch, 0.5);
        assert_close(
            &format!("l2_backward {what}"),
            &read(&g, &dpred),
            &d,
            1e-7 * max_abs(&d),
            1e-6,
        );
    }
    let mut rec = g.recorder();
    let p = g.tensor(&[2, 3], "p");
    let e = op::l2_loss(&mut rec, &p, &g.tensor(&[2, 4], "t"), &g.tensor(&[1], "l"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("l2_loss") && e.contains("`target`"), "{e}");
    let e = op::l2_backward(&mut rec, &p, &p, 1.0, &p)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("l2_backward") && e.contains("share a buffer"),
        "{e}"
    );
}
