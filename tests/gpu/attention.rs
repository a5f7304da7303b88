//! The fused attention kernels (attention_subgroup.wgsl on the subgroup path, attention.wgsl on
//! the portable one) and the unfused core against reference::attention on odd token counts
//! (partial lane blocks and tiles), several heads and head widths up to 160, cross-attention (key
//! length unlike the query length) and the causal mask.
//!
//! Forward: each output is a softmax-weighted mean of v with f32 dot products of ≤ 160 terms and
//! sums of ≤ 200 exponentials: rtol 2e-5, atol 1e-6 · max|ref| (softmax's bounds). Backward:
//! dS = P (dP − D) cancels when dP_ij ≈ D_i, so errors scale with the row, not the element:
//! rtol 1e-4, atol 2e-5 · max|ref| (the brief's bound for f32 reductions).
//! The unfused core (GEMM + softmax + GEMM) is checked against the same reference here and
//! through the whole-step parity tests.

use crate::common::*;
use wgpu_diffusion::gpu::{GemmPath, GemmPathChoice};
use wgpu_diffusion::nn::attention::AttentionCore;
use wgpu_diffusion::ops::attention as att;
use wgpu_diffusion::reference::attention::{self as r, AttentionDims};

/// (samples, query tokens, key tokens, heads, head_dim, causal): one token, partial lane blocks,
/// mnist28's 7 x 7 and 14 x 14 attentions (8-wide heads), cross-attention to fewer and to more
/// keys than queries (a text context of 9 or 77 tokens), CLIP's causal self-attention (77 tokens,
/// past several lane blocks), and SD 1.x's head widths 40, 80 and 160 (the widest).
const CASES: [(usize, usize, usize, usize, usize, bool); 14] = [
    (1, 1, 1, 1, 4, false),
    (2, 7, 7, 3, 8, false),
    (3, 49, 49, 8, 8, false),
    (1, 196, 196, 2, 8, false),
    (2, 17, 17, 1, 32, false),
    (1, 33, 33, 4, 12, false),
    (2, 64, 64, 2, 16, false),
    (2, 49, 9, 4, 16, false),
    (1, 5, 77, 2, 8, false),
    (2, 77, 77, 3, 16, true),
    (1, 1, 1, 1, 4, true),
    (1, 37, 11, 2, 40, false),
    (1, 19, 19, 1, 80, true),
    (1, 21, 6, 1, 160, false),
];

/// Which core runs a case: a fused kernel (the adapter's path decides which) or the unfused
/// GEMM + softmax + GEMM of `nn::attention::AttentionCore`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Core {
    Fused,
    Unfused,
}

/// Runs every case through `core` on `g` and checks o, dq, dk, dv against the f64 reference.
fn check_cases(g: &std::sync::Arc<wgpu_diffusion::gpu::Gpu>, core: Core) {
    for (i, &(n, tq, tk, heads, head_dim, causal)) in CASES.iter().enumerate() {
        let dims = AttentionDims {
            n,
            query_tokens: tq,
            key_tokens: tk,
            heads,
            head_dim,
            causal,
        };
        let shape = att::AttentionShape {
            samples: n,
            query_tokens: tq,
            key_tokens: tk,
            heads,
            causal,
        };
        let what = format!(
            "{core:?} on {}: n{n} tq{tq} tk{tk} h{heads} d{head_dim} causal {causal}",
            g.gemm_path
        );
        let c = dims.channels();
        let (len_q, len_k) = (n * tq * c, n * tk * c);
        let seed = 10 * i as u64;
        // Scores of a few units, as after a group norm and a projection.
        let scaled = |len: usize, s: u64| {
            f32_round(
                &test_data(len, s)
                    .iter()
                    .map(|v| 3.0 * v)
                    .collect::<Vec<_>>(),
            )
        };
        let (q, k, v, d_o) = (
            scaled(len_q, seed),
            scaled(len_k, seed + 1),
            random(len_k, seed + 2),
            random(len_q, seed + 3),
        );
        let scale = 1.0 / (head_dim as f64).sqrt();
        let (rows_q, rows_k) = ([n * tq, c], [n * tk, c]);
        let (tq_, tk_, tv, tdo) = (
            upload(g, &rows_q, &q, "q"),
            upload(g, &rows_k, &k, "k"),
            upload(g, &rows_k, &v, "v"),
            upload(g, &rows_q, &d_o, "d_o"),
        );
        let to = g.tensor(&rows_q, "o");
        let stats = g.tensor(&[att::stats_len(n, heads, tq)], "stats");
        let (tdq, tdk, tdv) = (
            g.tensor(&rows_q, "dq"),
            g.tensor(&rows_k, "dk"),
            g.tensor(&rows_k, "dv"),
        );
        let grads = att::AttentionGrads {
            q: &tq_,
            k: &tk_,
            v: &tv,
            o: &to,
            d_o: &tdo,
            dq: &tdq,
            dk: &tdk,
            dv: &tdv,
        };
        let unfused = AttentionCore::unfused(g, "test", shape, head_dim);
        run(g, |rec| match core {
            Core::Fused => {
                att::attention_forward(rec, shape, &tq_, &tk_, &tv, &to, &stats, scale as f32)
                    .unwrap();
                att::attention_backward(rec, shape, &grads, &stats, scale as f32).unwrap();
            }
            Core::Unfused => {
                unfused.forward(rec, &tq_, &tk_, &tv, &to).unwrap();
                unfused.backward(rec, &grads).unwrap();
            }
        });
        let o = r::attention_forward(dims, &q, &k, &v, scale);
        assert_close(
            &format!("attention_forward {what}"),
            &read(g, &to),
            &o,
            1e-6 * max_abs(&o),
            2e-5,
        );
        let (dq, dk, dv) = r::attention_backward(dims, &q, &k, &v, &d_o, scale);
        for (name, t, want) in [("dq", &tdq, &dq), ("dk", &tdk, &dk), ("dv", &tdv, &dv)] {
            assert_close(
                &format!("attention_backward {name} {what}"),
                &read(g, t),
                want,
                2e-5 * max_abs(want),
                1e-4,
            );
        }
    }
}

#[test]
fn fused_attention_matches_reference_on_the_subgroup_path() {
    let g = gpu();
    if !matches!(g.gemm_path, GemmPath::Subgroup { .. }) {
        eprintln!("adapter has no subgroup GEMM path: its fused attention is not used here");
        return;
    }
    check_cases(&gpu_with_path(GemmPathChoice::Subgroup), Core::Fused);
}

#[test]
fn fused_attention_matches_reference_on_the_portable_path() {
    let g = gpu_with_path(GemmPathChoice::Portable);
    assert!(
        att::fused_kernel(&g, 160, 160) == Some(att::FusedKernel::Portable),
        "the portable fused attention should take 160-wide heads on {} (workgroup memory {} bytes)",
        g.describe(),
        g.limits.max_compute_workgroup_storage_size
    );
    check_cases(&g, Core::Fused);
}

/// The unfused core (cross-attention and the causal mask included), which runs where no fused
/// kernel applies.
#[test]
fn unfused_attention_core_matches_reference() {
    check_cases(&gpu_with_path(GemmPathChoice::Portable), Core::Unfused);
}

/// In a half-precision run (`Precision::F16`: GEMM and conv operands rounded to f16) the
/// unfused core still computes in f32, as the fused kernels do, so a model's numerics do not
/// depend on which core runs: the f32 tolerances hold on both GEMM paths (with f16 operands
/// its GEMMs would be ~1e-3 off).
#[test]
fn unfused_attention_core_keeps_f32_in_a_half_precision_run() {
    for g in half_gpus() {
        check_cases(&g, Core::Unfused);
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
    let shape = |tokens: usize, heads: usize| {
        att::AttentionShape::self_attention(8 / tokens, tokens, heads)
    };
    if !matches!(g.gemm_path, GemmPath::Subgroup { .. }) {
        let e =
            att::attention_forward(&mut rec, shape(4, 4), &q, &k, &v, &o, &stats, 1.0).unwrap_err();
        assert!(e.to_string().contains("subgroup"), "{e}");
        return;
    }
    // 24 channels in 4 heads: 6-wide heads are not a multiple of 4.
    let e = att::attention_forward(&mut rec, shape(4, 4), &q, &k, &v, &o, &stats, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("head width") && e.contains('6'), "{e}");
    // 8 rows are not 2 samples of 3 tokens.
    let odd = att::AttentionShape::self_attention(2, 3, 2);
    let e = att::attention_forward(&mut rec, odd, &q, &k, &v, &o, &stats, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 tokens"), "{e}");
    // A causal mask over fewer keys than queries, and keys of the wrong length.
    let stats2 = t(&[att::stats_len(2, 2, 4)], "stats");
    let cross = att::AttentionShape {
        key_tokens: 2,
        causal: true,
        ..shape(4, 2)
    };
    let e = att::attention_forward(&mut rec, cross, &q, &k, &v, &o, &stats2, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("causal"), "{e}");
    let cross = att::AttentionShape {
        causal: false,
        ..cross
    };
    let e = att::attention_forward(&mut rec, cross, &q, &k, &v, &o, &stats2, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`k`"), "{e}");
    // A statistics buffer of the wrong size, and an output aliasing an input.
    let e = att::attention_forward(&mut rec, shape(4, 2), &q, &k, &v, &o, &t(&[5], "s"), 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`stats`"), "{e}");
    let e = att::attention_forward(&mut rec, shape(4, 2), &q, &k, &v, &q, &stats2, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("share a buffer"), "{e}");
}
