//! gemm.wgsl / gemm_subgroup.wgsl (GEMM and linear) against reference::gemm on both paths.
//! f32 FMA accumulation over K terms: rtol 1e-4 and atol 1e-5·max|ref| (the floor),
//! which a K ≤ 600 sum of O(1) products meets with margin (error ~ √K·2⁻²⁴·Σ|ab|).

use crate::common::*;
use wgpu_diffusion::ops::gemm::{GemmShape, MatRef, gemm, linear_backward, linear_forward};
use wgpu_diffusion::reference::gemm as r;

#[test]
fn gemm_shapes_transposes_batches() {
    for g in gemm_paths() {
        for &(m, n, k, ta, tb) in &[
            (1, 1, 1, false, false),
            (3, 7, 5, false, true),
            (33, 17, 70, true, false),
            (64, 64, 64, true, true),
            (130, 67, 33, false, false),
            (7, 200, 3, false, true),
            // rows of whole aligned texels: A in place, B through the vec4 pack
            (12, 16, 8, false, false),
            // rows of an even length: C stored as vec2s on the subgroup path (vec4s above)
            (5, 6, 8, false, false),
            (10, 34, 12, false, true),
        ] {
            // Subgroup path: A is read in place (k % 4 == 0), transposed in place (ta) or packed
            // (k % 4 != 0); a transposed B is packed as stored and transposed in registers.
            for with_bias in [true, false] {
                check_batched(&g, (m, n, k, ta, tb), (2, 3), with_bias);
            }
        }
    }
}

/// One batched GEMM (alpha 0.5, beta 1, bias optional) against the reference.
fn check_batched(
    g: &std::sync::Arc<wgpu_diffusion::gpu::Gpu>,
    (m, n, k, ta, tb): (usize, usize, usize, bool, bool),
    (outer, inner): (usize, usize),
    with_bias: bool,
) {
    let a = random(outer * inner * m * k, 1);
    let b = random(outer * inner * k * n, 2);
    let c0 = random(outer * inner * m * n, 3);
    let bias = random(n, 4);
    let (lda, ldb) = (if ta { m } else { k }, if tb { k } else { n });
    let ta_t = upload(g, &[outer * inner * m * k], &a, "A");
    let tb_t = upload(g, &[outer * inner * k * n], &b, "B");
    let tc = upload(g, &[outer * inner * m * n], &c0, "C");
    let tbias = upload(g, &[n], &bias, "bias");
    let amat = MatRef {
        tensor: &ta_t,
        offset: 0,
        ld: lda,
        batch_outer: inner * m * k,
        batch_inner: m * k,
        trans: ta,
    };
    let bmat = MatRef {
        tensor: &tb_t,
        offset: 0,
        ld: ldb,
        batch_outer: inner * k * n,
        batch_inner: k * n,
        trans: tb,
    };
    let cmat = MatRef::dense(&tc, n).batched(inner * m * n, m * n);
    let shape = GemmShape::new(m, n, k)
        .batches(outer, inner)
        .scale(0.5, 1.0);
    run(g, |rec| {
        gemm(rec, shape, amat, bmat, with_bias.then_some(&tbias), cmat).unwrap()
    });
    let mut expect = c0.clone();
    for bi in 0..outer * inner {
        let cs = &mut expect[bi * m * n..(bi + 1) * m * n];
        r::gemm(
            m,
            n,
            k,
            0.5,
            &a[bi * m * k..],
            lda,
            ta,
            &b[bi * k * n..],
            ldb,
            tb,
            1.0,
            cs,
            n,
        );
        if with_bias {
            for (i, v) in cs.iter_mut().enumerate() {
                *v += bias[i % n];
            }
        }
    }
    let what = format!(
        "gemm {} m={m} n={n} k={k} ta={ta} tb={tb} bias={with_bias}",
        g.gemm_path
    );
    assert_close(&what, &read(g, &tc), &expect, 1e-5 * max_abs(&expect), 1e-4);
}

/// More batches than the subgroup path's packed textures hold (attention over many samples and
/// heads: B's K·batches rows beyond max_texture_dimension_2d) are split into dispatches that
/// fit, by outer batches and, within a single outer batch, by inner ones.
#[test]
fn batches_beyond_one_texture_are_split() {
    for g in gemm_paths() {
        let rows = g.limits.max_texture_dimension_2d as usize;
        let k: usize = 197;
        let per_texture = rows / k.next_multiple_of(4);
        let inner = per_texture / 2 + 5;
        for (outer, inner) in [(3, inner), (1, 2 * per_texture + 3)] {
            assert!(
                outer * inner > per_texture,
                "the case must exceed one texture"
            );
            for tb in [false, true] {
                check_batched(&g, (9, 12, k, false, tb), (outer, inner), false);
            }
        }
    }
}

#[test]
fn linear_forward_backward() {
    for g in gemm_paths() {
        for &(rows, in_f, out_f) in &[(1, 1, 1), (3, 5, 7), (33, 64, 128), (70, 33, 3)] {
            let x = random(rows * in_f, 5);
            let w = random(out_f * in_f, 6);
            let b = random(out_f, 7);
            let dy = random(rows * out_f, 8);
            let (tx, tw, tb, tdy) = (
                upload(&g, &[rows, in_f], &x, "x"),
                upload(&g, &[out_f, in_f], &w, "w"),
                upload(&g, &[out_f], &b, "b"),
                upload(&g, &[rows, out_f], &dy, "dy"),
            );
            let (ty, tdx, tdw, tdb) = (
                g.tensor(&[rows, out_f], "y"),
                g.tensor(&[rows, in_f], "dx"),
                g.tensor(&[out_f, in_f], "dw"),
                g.tensor(&[out_f], "db"),
            );
            run(&g, |rec| {
                linear_forward(rec, &tx, &tw, Some(&tb), &ty).unwrap();
                linear_backward(
                    rec,
                    &tx,
                    &tw,
                    &tdy,
                    Some((&tdx, false)),
                    &tdw,
                    Some(&tdb),
                    false,
                )
                .unwrap();
            });
            let y = r::linear_forward(&x, &w, Some(&b), rows, in_f, out_f);
            let (dx, dw, db) = r::linear_backward(&x, &w, &dy, rows, in_f, out_f);
            let what = format!("{} rows={rows} in={in_f} out={out_f}", g.gemm_path);
            assert_close(
                &format!("linear y {what}"),
                &read(&g, &ty),
                &y,
                1e-5 * max_abs(&y),
                1e-4,
            );
            assert_close(
                &format!("linear dx {what}"),
                &read(&g, &tdx),
                &dx,
                1e-5 * max_abs(&dx),
                1e-4,
            );
            assert_close(
                &format!("linear dw {what}"),
                &read(&g, &tdw),
                &dw,
                1e-5 * max_abs(&dw),
                1e-4,
            );
            assert_close(
                &format!("linear db {what}"),
                &read(&g, &tdb),
                &db,
                1e-5 * max_abs(&db),
                1e-4,
            );
        }
    }
}

#[test]
fn gemm_rejects_bad_operands() {
    let g = gpu();
    let (a, b, c) = (
        g.tensor(&[6], "A"),
        g.tensor(&[6], "B"),
        g.tensor(&[4], "C"),
    );
    let mut rec = g.recorder();
    let e = gemm(
        &mut rec,
        GemmShape::new(2, 2, 3),
        MatRef::dense(&a, 3),
        MatRef::dense(&b, 2),
        None,
        MatRef::dense(&c, 3),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("operand C"), "{e}");
    let e = linear_forward(&mut rec, &a.reshape(&[2, 3]), &b.reshape(&[3, 2]), None, &c)
        .unwrap_err()
        .to_string();
    assert!(e.contains("input features"), "{e}");
}

/// A GEMM operand packed twice the same way in one plan is packed once, until its buffer is
/// bound again (then it is packed again, into the freed texture); packed another way (another
/// leading dimension) it is another texture.
#[test]
fn packed_matrices_are_reused_until_their_tensor_is_bound() {
    use std::sync::Arc;
    use wgpu_diffusion::ops::pack::pack_matrix;
    let g = gpu();
    let mut rec = g.recorder();
    let x = g.tensor(&[12, 8], "x");
    let dense = MatRef::dense(&x, 8);
    let first = pack_matrix(&mut rec, &dense, 12, 8, 12, 1, 1, "x").unwrap();
    let again = pack_matrix(&mut rec, &dense, 12, 8, 12, 1, 1, "x").unwrap();
    assert!(Arc::ptr_eq(&first.texture, &again.texture));
    let halves = MatRef::dense(&x, 4);
    let other = pack_matrix(&mut rec, &halves, 24, 4, 24, 1, 1, "x").unwrap();
    assert!(!Arc::ptr_eq(&first.texture, &other.texture));
    let before = rec.len();
    wgpu_diffusion::ops::elementwise::scale(&mut rec, 2.0, &x).unwrap();
    let after = pack_matrix(&mut rec, &dense, 12, 8, 12, 1, 1, "x").unwrap();
    assert_eq!(
        rec.len(),
        before + 2,
        "x was not packed again after `scale` bound it"
    );
    // Into the forgotten pack's texture, which every dispatch reading it precedes.
    assert!(Arc::ptr_eq(&first.texture, &after.texture));
    // Views of one buffer (as the parameters are): binding one keeps the other's pack; binding
    // a view that overlaps it does not.
    let store = g.tensor(&[256], "store");
    let (w, b) = (store.view(0, &[8, 8], "w"), store.view(128, &[8], "b"));
    let w_ref = MatRef::dense(&w, 8);
    let packed_w = pack_matrix(&mut rec, &w_ref, 8, 8, 8, 1, 1, "w").unwrap();
    wgpu_diffusion::ops::elementwise::scale(&mut rec, 2.0, &b).unwrap();
    let still = pack_matrix(&mut rec, &w_ref, 8, 8, 8, 1, 1, "w").unwrap();
    assert!(Arc::ptr_eq(&packed_w.texture, &still.texture));
    let overlapping = store.view(0, &[4], "overlapping");
    wgpu_diffusion::ops::elementwise::scale(&mut rec, 2.0, &overlapping).unwrap();
    let before = rec.len();
    pack_matrix(&mut rec, &w_ref, 8, 8, 8, 1, 1, "w").unwrap();
    assert_eq!(rec.len(), before + 1, "w was not packed again");
}
