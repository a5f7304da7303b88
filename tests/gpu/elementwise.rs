//! elementwise.wgsl against reference::elementwise. These kernels do one or two f32 roundings
//! per element, so rtol 1e-6 (a few ulp) and atol 1e-7 cover them; SiLU uses exp and a divide
//! (a few ulp each on lavapipe/LLVM), so rtol 1e-5, atol 1e-6.

use crate::common::*;
use wgpu_diffusion::ops::elementwise as ew;
use wgpu_diffusion::reference::elementwise as r;

/// Multiples of 4 run the vectorised kernels, the others the scalar ones.
const SIZES: [usize; 8] = [1, 3, 4, 7, 33, 64, 70_001, 70_004];

#[test]
fn add_axpby_scale() {
    let g = gpu();
    for (i, &n) in SIZES.iter().enumerate() {
        let (a, b) = (random(n, 10 + i as u64), random(n, 20 + i as u64));
        let (ta, tb, tc) = (
            upload(&g, &[n], &a, "a"),
            upload(&g, &[n], &b, "b"),
            g.tensor(&[n], "c"),
        );
        run(&g, |rec| {
            ew::add(rec, &ta, &tb, &tc).unwrap();
            ew::axpby(rec, 0.5, &ta, -2.0, &tb).unwrap();
            ew::scale(rec, 3.0, &ta).unwrap();
        });
        let sum: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert_close(&format!("add n={n}"), &read(&g, &tc), &sum, 1e-7, 1e-6);
        let axpby: Vec<f64> = a.iter().zip(&b).map(|(x, y)| 0.5 * x - 2.0 * y).collect();
        assert_close(&format!("axpby n={n}"), &read(&g, &tb), &axpby, 1e-7, 1e-6);
        let scaled: Vec<f64> = a.iter().map(|x| 3.0 * x).collect();
        assert_close(&format!("scale n={n}"), &read(&g, &ta), &scaled, 1e-7, 1e-6);
    }
}

/// The causal mask, then the softmax it feeds: masked probabilities are exact zeros and each
/// row's weights sum to 1 over keys 0..=query (CLIP's text encoder: 77 tokens, 2 blocks; and odd
/// sizes). Exact equality for the mask: it only copies or writes one constant.
#[test]
fn causal_mask_then_softmax() {
    let g = gpu();
    for (blocks, t) in [(1usize, 1usize), (3, 5), (2, 77)] {
        let n = blocks * t * t;
        let scores = random(n, 60 + t as u64);
        let ts = upload(&g, &[blocks * t, t], &scores, "scores");
        let tp = g.tensor(&[blocks * t, t], "probabilities");
        run(&g, |rec| {
            ew::causal_mask(rec, &ts).unwrap();
            wgpu_diffusion::ops::softmax::softmax_forward(rec, &ts, &tp).unwrap();
        });
        let masked = r::causal_mask(&scores, t);
        assert_close(
            &format!("causal_mask {blocks}x{t}"),
            &read(&g, &ts),
            &masked,
            0.0,
            0.0,
        );
        let probs = read(&g, &tp);
        for (row, p) in probs.chunks(t).enumerate() {
            let q = row % t;
            assert!(p[q + 1..].iter().all(|&v| v == 0.0), "row {row}: {p:?}");
            let sum: f32 = p[..=q].iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "row {row} sums to {sum}");
        }
    }
    let mut rec = g.recorder();
    let e = ew::causal_mask(&mut rec, &g.tensor(&[5, 3], "not square blocks")).unwrap_err();
    assert!(e.to_string().contains("[blocks · T, T]"), "{e}");
}

#[test]
fn silu_forward_backward() {
    let g = gpu();
    for (i, &n) in SIZES.iter().enumerate() {
        let x: Vec<f64> = f32_round(
            &test_data(n, 30 + i as u64)
                .iter()
                .map(|v| v * 8.0)
                .collect::<Vec<_>>(),
        );
        let dy = random(n, 40 + i as u64);
        let prior = random(n, 50 + i as u64);
        let (tx, tdy) = (upload(&g, &[n], &x, "x"), upload(&g, &[n], &dy, "dy"));
        let (ty, tdx, tacc) = (
            g.tensor(&[n], "y"),
            g.tensor(&[n], "dx"),
            upload(&g, &[n], &prior, "acc"),
        );
        run(&g, |rec| {
            ew::silu_forward(rec, &tx, &ty).unwrap();
            ew::silu_backward(rec, &tx, &tdy, &tdx, false).unwrap();
            ew::silu_backward(rec, &tx, &tdy, &tacc, true).unwrap();
        });
        assert_close(
            &format!("silu_forward n={n}"),
            &read(&g, &ty),
            &r::silu_forward(&x),
            1e-6,
            1e-5,
        );
        let dx = r::silu_backward(&x, &dy);
        assert_close(
            &format!("silu_backward n={n}"),
            &read(&g, &tdx),
            &dx,
            1e-6,
            1e-5,
        );
        let acc: Vec<f64> = dx.iter().zip(&prior).map(|(a, b)| a + b).collect();
        assert_close(
            &format!("silu_backward accumulate n={n}"),
            &read(&g, &tacc),
            &acc,
            1e-6,
            1e-5,
        );
    }
}

#[test]
fn channel_bias_and_concat() {
    let g = gpu();
    // Channel counts that are all multiples of 4 run the vectorised kernels.
    for &(n, h, w, ca, cb) in &[
        (1, 1, 1, 1, 1),
        (2, 3, 5, 7, 3),
        (3, 7, 7, 33, 4),
        (2, 3, 5, 8, 4),
        (2, 4, 4, 64, 32),
        (2, 17, 9, 12, 8),
    ] {
        let q = h * w;
        let hx = random(n * q * ca, 60);
        let v = random(n * ca, 61);
        let th = upload(&g, &[n, h, w, ca], &hx, "h");
        let tv = upload(&g, &[n, ca], &v, "v");
        let b = random(n * q * cb, 62);
        let tb = upload(&g, &[n, h, w, cb], &b, "b");
        let ta = upload(&g, &[n, h, w, ca], &hx, "a");
        let tcat = g.tensor(&[n, h, w, ca + cb], "cat");
        let tback = g.tensor(&[n, h, w, cb], "back");
        let prior = random(n * q * cb, 63);
        let tacc = upload(&g, &[n, h, w, cb], &prior, "acc");
        run(&g, |rec| {
            ew::add_channel_bias(rec, &tv, 0.5, &th).unwrap();
            ew::copy_channels(rec, &ta, 0, &tcat, 0, ca, false).unwrap();
            ew::copy_channels(rec, &tb, 0, &tcat, ca, cb, false).unwrap();
        });
        run(&g, |rec| {
            ew::copy_channels(rec, &tcat, ca, &tback, 0, cb, false).unwrap();
            ew::copy_channels(rec, &tcat, ca, &tacc, 0, cb, true).unwrap();
        });
        let shape = format!("{n}x{h}x{w}x{ca}+{cb}");
        assert_close(
            &format!("add_channel_bias {shape}"),
            &read(&g, &th),
            &r::add_channel_bias(&hx, &v, 0.5, q, ca),
            1e-7,
            1e-6,
        );
        assert_close(
            &format!("concat {shape}"),
            &read(&g, &tcat),
            &r::concat_channels(&hx, ca, &b, cb),
            0.0,
            0.0,
        );
        assert_close(
            &format!("concat backward slice {shape}"),
            &read(&g, &tback),
            &b,
            0.0,
            0.0,
        );
        let acc: Vec<f64> = b.iter().zip(&prior).map(|(x, y)| x + y).collect();
        assert_close(
            &format!("accumulating channel copy {shape}"),
            &read(&g, &tacc),
            &acc,
            1e-7,
            1e-6,
        );
    }
}

#[test]
fn invalid_shapes_are_errors() {
    let g = gpu();
    let (a, b) = (g.tensor(&[3], "a"), g.tensor(&[4], "b"));
    let mut rec = g.recorder();
    let e = ew::add(&mut rec, &a, &b, &a).unwrap_err().to_string();
    assert!(e.contains("add") && e.contains("`b`"), "{e}");
    let e = ew::silu_forward(&mut rec, &a, &a).unwrap_err().to_string();
    assert!(e.contains("share a buffer"), "{e}");
    let e = ew::copy_channels(
        &mut rec,
        &g.tensor(&[2, 3], "s"),
        2,
        &g.tensor(&[2, 3], "d"),
        0,
        2,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("out of range"), "{e}");
}
