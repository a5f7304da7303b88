//! attention_subgroup.wgsl (the fused attention core, subgroup path) against
//! reference::attention on odd token counts (partial lane blocks), several heads and head widths.
//!
//! Forward: each output is a softmax-weighted mean of v with f32 dot products of ≤ 32 terms and
//! sums of ≤ 200 exponentials: rtol 2e-5, atol 1e-6 · max|ref| (softmax's bounds). Backward:
//! dS = P (dP − D) cancels when dP_ij ≈ D_i, so errors scale with the row, not the element:
//! rtol 1e-4, atol 2e-5 · max|ref| (the brief's bound for f32 reductions).
//! The unfused path (GEMM + softmax + GEMM) is checked against the same reference through the
//! whole-step parity tests on the portable path.

use crate::common::*;
use wgpu_diffusion::gpu::{GemmPath, GemmPathChoice};
use wgpu_diffusion::ops::attention as att;
use wgpu_diffusion::reference::attention::{self as r, AttentionDims};

/// (samples, tokens, heads, head_dim): one token, partial lane blocks, mnist28's 7 x 7 and 14 x 14
/// attentions (8-wide heads), and the widest head the kernels take.
const CASES: [(usize, usize, usize, usize); 7] = [
    (1, 1, 1, 4),
    (2, 7, 3, 8),
    (3, 49, 8, 8),
    (1, 196, 2, 8),
    (2, 17, 1, 32),
    (1, 33, 4, 12),
    (2, 64, 2, 16),
];

#[test]
fn fused_attention_matches_reference() {
    let g = gpu();
    if !matches!(g.gemm_path, GemmPath::Subgroup { .. }) {
        eprintln!("adapter has no subgroup GEMM path: the fused attention is not used here");
        return;
    }
    let g = gpu_with_path(GemmPathChoice::Subgroup);
    for (i, &(n, tokens, heads, head_dim)) in CASES.iter().enumerate() {
        let dims = AttentionDims {
            n,
            tokens,
            heads,
            head_dim,
        };
        let what = format!("n{n} t{tokens} h{heads} d{head_dim}");
        let c = dims.channels();
        let len = n * tokens * c;
        let seed = 10 * i as u64;
        // Scores of a few units, as after a group norm and a projection.
        let scaled = |s: u64| {
            f32_round(
                &test_data(len, s)
                    .iter()
                    .map(|v| 3.0 * v)
                    .collect::<Vec<_>>(),
            )
        };
        let (q, k, v, d_o) = (
            scaled(seed),
            scaled(seed + 1),
            random(len, seed + 2),
            random(len, seed + 3),
        );
        let scale = 1.0 / (head_dim as f64).sqrt();
        let shape = [n * tokens, c];
        let (tq, tk, tv, tdo) = (
            upload(&g, &shape, &q, "q"),
            upload(&g, &shape, &k, "k"),
            upload(&g, &shape, &v, "v"),
            upload(&g, &shape, &d_o, "d_o"),
        );
        let to = g.tensor(&shape, "o");
        let stats = g.tensor(&[att::stats_len(n, heads, tokens)], "stats");
        let (tdq, tdk, tdv) = (
            g.tensor(&shape, "dq"),
            g.tensor(&shape, "dk"),
            g.tensor(&shape, "dv"),
        );
        run(&g, |rec| {
            att::attention_forward(rec, &tq, &tk, &tv, &to, &stats, tokens, heads, scale as f32)
                .unwrap();
            att::attention_backward(
                rec,
                &tq,
                &tk,
                &tv,
                &to,
                &tdo,
                &stats,
                &tdq,
                &tdk,
                &tdv,
                tokens,
                heads,
                scale as f32,
            )
            .unwrap();
        });
        let o = r::attention_forward(dims, &q, &k, &v, scale);
        assert_close(
            &format!("attention_forward {what}"),
            &read(&g, &to),
            &o,
            1e-6 * max_abs(&o),
            2e-5,
        );
        let (dq, dk, dv) = r::attention_backward(dims, &q, &k, &v, &d_o, scale);
        for (name, t, want) in [("dq", &tdq, &dq), ("dk", &tdk, &dk), ("dv", &tdv, &dv)] {
            assert_close(
                &format!("attention_backward {name} {what}"),
                &read(&g, t),
                want,
                2e-5 * max_abs(want),
                1e-4,
            );
        }
    }
}

#[test]
fn fused_attention_rejects_what_it_cannot_run() {
    let g = gpu();
    let mut rec = g.recorder();
    let t = |shape: &[usize], l: &str| g.tensor(shape, l);
    let (q, k, v, o) = (
        t(&[8, 24], "q"),
        t(&[8, 24], "k"),
        t(&[8, 24], "v"),
        t(&[8, 24], "o"),
    );
    let stats = t(&[att::stats_len(2, 4, 4)], "stats");
    if !matches!(g.gemm_path, GemmPath::Subgroup { .. }) {
        let e = att::attention_forward(&mut rec, &q, &k, &v, &o, &stats, 4, 4, 1.0).unwrap_err();
        assert!(e.to_string().contains("subgroup"), "{e}");
        return;
    }
    // 24 channels in 4 heads: 6-wide heads are not a multiple of 4.
    let e = att::attention_forward(&mut rec, &q, &k, &v, &o, &stats, 4, 4, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("head width") && e.contains('6'), "{e}");
    // 8 rows do not split into 3-token samples.
    let e = att::attention_forward(&mut rec, &q, &k, &v, &o, &stats, 3, 2, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 tokens"), "{e}");
    // A statistics buffer of the wrong size, and an output aliasing an input.
    let e = att::attention_forward(&mut rec, &q, &k, &v, &o, &t(&[5], "s"), 4, 2, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`stats`"), "{e}");
    let stats2 = t(&[att::stats_len(2, 2, 4)], "stats");
    let e = att::attention_forward(&mut rec, &q, &k, &v, &q, &stats2, 4, 2, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("share a buffer"), "{e}");
}
