//! conv2d forward / backward-input / backward-weight (+ bias grad) against reference::conv2d on
//! both GEMM paths, with 3×3 and 1×1 kernels, stride 1 and 2, symmetric and the asymmetric
//! (right/bottom) padding. Tolerance as for GEMM (f32 sums of ≤ 9·64 products for dx and the
//! forward; dw sums N·OH·OW ≤ 400 products): rtol 1e-4, atol 1e-5·max|ref|.

use crate::common::*;
use wgpu_diffusion::ops::conv2d::{
    Conv2dGeometry, conv2d_backward_input, conv2d_backward_weight, conv2d_forward,
};
use wgpu_diffusion::reference::conv2d::Conv;

/// Many pixels, few output tiles: the backward-weight pass splits K into slices summed afterwards
/// (on both paths).
const SPLIT_K: Conv = Conv {
    n: 4,
    h: 16,
    w: 16,
    ci: 4,
    co: 8,
    kh: 3,
    kw: 3,
    stride: 1,
    pad: [1; 4],
};

#[test]
fn conv2d_all_passes() {
    let cases = [
        Conv {
            n: 1,
            h: 1,
            w: 1,
            ci: 1,
            co: 1,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: [1; 4],
        },
        Conv {
            n: 2,
            h: 7,
            w: 5,
            ci: 3,
            co: 5,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: [1; 4],
        },
        Conv {
            n: 3,
            h: 7,
            w: 7,
            ci: 33,
            co: 7,
            kh: 3,
            kw: 3,
            stride: 2,
            pad: [0, 0, 1, 1],
        },
        Conv {
            n: 2,
            h: 8,
            w: 8,
            ci: 4,
            co: 8,
            kh: 3,
            kw: 3,
            stride: 2,
            pad: [1; 4],
        },
        Conv {
            n: 2,
            h: 5,
            w: 3,
            ci: 7,
            co: 33,
            kh: 1,
            kw: 1,
            stride: 1,
            pad: [0; 4],
        },
        SPLIT_K,
        Conv {
            n: 2,
            h: 14,
            w: 14,
            ci: 64,
            co: 64,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: [1; 4],
        },
        // Narrow subgroup tiles (2 columns per lane; fewer broadcasting lanes in backward-weight):
        // a full 32-channel layer, and odd channel counts that end inside a texel.
        Conv {
            n: 1,
            h: 28,
            w: 28,
            ci: 32,
            co: 32,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: [1; 4],
        },
        Conv {
            n: 2,
            h: 9,
            w: 11,
            ci: 18,
            co: 12,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: [1; 4],
        },
        Conv {
            n: 1,
            h: 16,
            w: 16,
            ci: 1,
            co: 32,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: [1; 4],
        },
        // Subgroup path: a wide tile (4 columns per lane) storing vec2s (34 and 46 channels).
        Conv {
            n: 1,
            h: 3,
            w: 5,
            ci: 46,
            co: 34,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: [1; 4],
        },
    ];
    for g in gemm_paths() {
        for (i, c) in cases.iter().enumerate() {
            let (oh, ow) = (c.out_h(), c.out_w());
            let x = random(c.n * c.h * c.w * c.ci, 10 + i as u64);
            let w = random(c.co * c.ci * c.kh * c.kw, 20 + i as u64);
            let b = random(c.co, 30 + i as u64);
            let dy = random(c.n * oh * ow * c.co, 40 + i as u64);
            let prior = random(c.co * c.ci * c.kh * c.kw, 50 + i as u64);
            let tx = upload(&g, &[c.n, c.h, c.w, c.ci], &x, "x");
            let tw = upload(&g, &[c.co, c.ci, c.kh, c.kw], &w, "w");
            let tb = upload(&g, &[c.co], &b, "b");
            let tdy = upload(&g, &[c.n, oh, ow, c.co], &dy, "dy");
            let ty = g.tensor(&[c.n, oh, ow, c.co], "y");
            let tdx = g.tensor(&[c.n, c.h, c.w, c.ci], "dx");
            let prior_dx = random(c.n * c.h * c.w * c.ci, 70 + i as u64);
            let tdx_acc = upload(&g, &[c.n, c.h, c.w, c.ci], &prior_dx, "dx acc");
            let tdw = g.tensor(&[c.co, c.ci, c.kh, c.kw], "dw");
            let tdw_acc = upload(&g, &[c.co, c.ci, c.kh, c.kw], &prior, "dw acc");
            let tdb = g.tensor(&[c.co], "db");
            // dw and db in one buffer, db after dw at the parameter store's 64-float alignment:
            // the subgroup path then sums the bias gradient in the backward-weight kernel.
            let numel = c.co * c.ci * c.kh * c.kw;
            let db_at = numel.next_multiple_of(64);
            let prior_db = random(c.co, 60 + i as u64);
            let mut grads = vec![0.0; db_at + c.co];
            grads[..numel].copy_from_slice(&prior);
            grads[db_at..].copy_from_slice(&prior_db);
            let tgrads = upload(&g, &[db_at + c.co], &grads, "gradients");
            let tdw_one = tgrads.view(0, &[c.co, c.ci, c.kh, c.kw], "dw in gradients");
            let tdb_one = tgrads.view(db_at, &[c.co], "db in gradients");
            let tgrads2 = g.tensor(&[db_at + c.co], "gradients 2");
            let tdw_two = tgrads2.view(0, &[c.co, c.ci, c.kh, c.kw], "dw in gradients 2");
            let tdb_two = tgrads2.view(db_at, &[c.co], "db in gradients 2");
            let geo = conv_geometry(c);
            run(&g, |rec| {
                conv2d_forward(rec, &tx, &tw, Some(&tb), &ty, &geo).unwrap();
                conv2d_backward_input(rec, &tdy, &tw, &tdx, &geo, false).unwrap();
                conv2d_backward_input(rec, &tdy, &tw, &tdx_acc, &geo, true).unwrap();
                conv2d_backward_weight(rec, &tx, &tdy, &tdw, Some(&tdb), &geo, false).unwrap();
                conv2d_backward_weight(rec, &tx, &tdy, &tdw_acc, None, &geo, true).unwrap();
                conv2d_backward_weight(rec, &tx, &tdy, &tdw_one, Some(&tdb_one), &geo, true)
                    .unwrap();
                conv2d_backward_weight(rec, &tx, &tdy, &tdw_two, Some(&tdb_two), &geo, false)
                    .unwrap();
            });
            let y = c.forward(&x, &w, Some(&b));
            let (dx, dw, db) = c.backward(&x, &w, &dy);
            let what = format!("{} {c:?}", g.gemm_path);
            assert_close(
                &format!("conv forward {what}"),
                &read(&g, &ty),
                &y,
                1e-5 * max_abs(&y),
                1e-4,
            );
            assert_close(
                &format!("conv backward_input {what}"),
                &read(&g, &tdx),
                &dx,
                1e-5 * max_abs(&dx),
                1e-4,
            );
            assert_close(
                &format!("conv backward_weight {what}"),
                &read(&g, &tdw),
                &dw,
                1e-5 * max_abs(&dw),
                1e-4,
            );
            assert_close(
                &format!("conv bias grad {what}"),
                &read(&g, &tdb),
                &db,
                1e-5 * max_abs(&db),
                1e-4,
            );
            let acc_dx: Vec<f64> = dx.iter().zip(&prior_dx).map(|(a, b)| a + b).collect();
            assert_close(
                &format!("conv backward_input accumulate {what}"),
                &read(&g, &tdx_acc),
                &acc_dx,
                1e-5 * max_abs(&acc_dx),
                1e-4,
            );
            let acc: Vec<f64> = dw.iter().zip(&prior).map(|(a, b)| a + b).collect();
            assert_close(
                &format!("conv backward_weight accumulate {what}"),
                &read(&g, &tdw_acc),
                &acc,
                1e-5 * max_abs(&acc),
                1e-4,
            );
            let acc_db: Vec<f64> = db.iter().zip(&prior_db).map(|(a, b)| a + b).collect();
            let one = read(&g, &tgrads);
            let two = read(&g, &tgrads2);
            for (name, got, want) in [
                ("dw accumulated beside db", &one[..numel], &acc),
                ("db accumulated after dw", &one[db_at..], &acc_db),
                ("dw beside db", &two[..numel], &dw),
                ("db after dw", &two[db_at..], &db),
            ] {
                assert_close(
                    &format!("conv backward_weight, {name}, {what}"),
                    got,
                    want,
                    1e-5 * max_abs(want),
                    1e-4,
                );
            }
        }
    }
}

#[test]
fn conv2d_rejects_bad_shapes() {
    let g = gpu();
    let mut rec = g.recorder();
    let x = g.tensor(&[1, 4, 4, 3], "x");
    let w = g.tensor(&[8, 2, 3, 3], "w");
    let y = g.tensor(&[1, 4, 4, 8], "y");
    let e = conv2d_forward(&mut rec, &x, &w, None, &y, &Conv2dGeometry::same(1, 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("input channels"), "{e}");
    let w = g.tensor(&[8, 3, 3, 3], "w");
    let e = conv2d_forward(&mut rec, &x, &w, None, &y, &Conv2dGeometry::same(2, 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`y`") && e.contains("[1, 2, 2, 8]"), "{e}");
}

/// A conv's dY is packed once for its backward-weight and backward-input passes; a tensor bound
/// by anything in between (possibly written) is packed again, into a freed texture of the same
/// size; a frozen buffer's packs are never freed.
#[test]
fn packed_textures_are_reused_until_their_tensor_is_bound() {
    use std::sync::Arc;
    use wgpu_diffusion::ops::pack::{pack_conv_weight, pack_nhwc};
    let g = gpu();
    let mut rec = g.recorder();
    let x = g.tensor(&[2, 4, 4, 8], "x");
    let first = pack_nhwc(&mut rec, &x, "x").unwrap();
    let again = pack_nhwc(&mut rec, &x, "x").unwrap();
    assert!(Arc::ptr_eq(&first.texture, &again.texture));
    // Another shape of the same buffer is another pack.
    let flat = x.reshape(&[1, 8, 4, 8]);
    let other = pack_nhwc(&mut rec, &flat, "x").unwrap();
    assert!(!Arc::ptr_eq(&first.texture, &other.texture));
    let before = rec.len();
    wgpu_diffusion::ops::elementwise::scale(&mut rec, 2.0, &x).unwrap();
    let after = pack_nhwc(&mut rec, &x, "x").unwrap();
    assert_eq!(
        rec.len(),
        before + 2,
        "x was not packed again after `scale` bound it"
    );
    // The forgotten packs' textures are free (every dispatch that reads them is recorded): the
    // new pack of the same size writes one of them instead of allocating.
    assert!(
        Arc::ptr_eq(&first.texture, &after.texture) || Arc::ptr_eq(&other.texture, &after.texture)
    );
    // A frozen buffer's packs live in the setup plan, read after it: never handed out again.
    let w = g.tensor(&[8, 8, 3, 3], "w");
    let mut rec = g.recorder();
    rec.freeze(std::slice::from_ref(&w));
    let (packed, _) = pack_conv_weight(&mut rec, &w, false, "w").unwrap();
    let (swapped, _) = pack_conv_weight(&mut rec, &w, true, "w").unwrap();
    assert!(!Arc::ptr_eq(&packed.texture, &swapped.texture));
}

/// A bias gradient that does not directly follow its weight gradient (another tensor between
/// them) is summed separately: the values between are never written, even when the pass splits
/// its reduction into slices summed over the whole dw .. db span.
#[test]
fn bias_gradient_apart_from_its_weight_gradient_leaves_the_gap_alone() {
    let c = SPLIT_K;
    for g in gemm_paths() {
        let numel = c.co * c.ci * c.kh * c.kw;
        let db_at = numel.next_multiple_of(64) + 64;
        let x = random(c.n * c.h * c.w * c.ci, 71);
        let dy = random(c.n * c.h * c.w * c.co, 72);
        let sentinel = 7.5;
        let tgrads = upload(
            &g,
            &[db_at + c.co],
            &vec![sentinel; db_at + c.co],
            "gradients",
        );
        let tdw = tgrads.view(0, &[c.co, c.ci, c.kh, c.kw], "dw");
        let tdb = tgrads.view(db_at, &[c.co], "db");
        let tx = upload(&g, &[c.n, c.h, c.w, c.ci], &x, "x");
        let tdy = upload(&g, &[c.n, c.h, c.w, c.co], &dy, "dy");
        run(&g, |rec| {
            conv2d_backward_weight(rec, &tx, &tdy, &tdw, Some(&tdb), &conv_geometry(&c), false)
                .unwrap();
        });
        let w = vec![0.0; numel];
        let (_, dw, db) = c.backward(&x, &w, &dy);
        let got = read(&g, &tgrads);
        let what = format!("{}", g.gemm_path);
        assert_close(
            &format!("dw {what}"),
            &got[..numel],
            &dw,
            1e-5 * max_abs(&dw),
            1e-4,
        );
        assert_close(
            &format!("db {what}"),
            &got[db_at..],
            &db,
            1e-5 * max_abs(&db),
            1e-4,
        );
        assert!(
            got[numel..db_at].iter().all(|&v| v == sentinel as f32),
            "{what}: the gap between dw and db was written"
        );
    }
}

/// Weights in a frozen buffer (`Recorder::freeze`: a sampler's) are packed by the setup plan,
/// not by the plan itself, whose replays then read the packed textures; after new weights are
/// written, rerunning the setup plan is what brings them in. Both against the reference.
#[test]
fn frozen_weights_are_packed_once_by_the_setup_plan() {
    use wgpu_diffusion::reference::conv2d::Conv;
    let c = Conv {
        n: 2,
        h: 5,
        w: 7,
        ci: 12,
        co: 20,
        kh: 3,
        kw: 3,
        stride: 1,
        pad: [1; 4],
    };
    for g in gemm_paths() {
        let x = random(c.n * c.h * c.w * c.ci, 160);
        let xt = upload(&g, &[c.n, c.h, c.w, c.ci], &x, "x");
        // The bias at a 256-byte boundary, as the parameter store places each parameter.
        let b_at = (c.co * c.ci * 9).next_multiple_of(64);
        let weights = g.tensor(&[b_at + c.co], "weights");
        let wt = weights.view(0, &[c.co, c.ci, 3, 3], "w");
        let bt = weights.view(b_at, &[c.co], "b");
        let y = g.tensor(&[c.n, c.h, c.w, c.co], "y");
        let mut rec = g.recorder();
        rec.freeze(std::slice::from_ref(&weights));
        conv2d_forward(
            &mut rec,
            &xt,
            &wt,
            Some(&bt),
            &y,
            &Conv2dGeometry::same(1, 1),
        )
        .unwrap();
        let (setup, plan) = rec.finish_with_setup();
        let packs = |p: &wgpu_diffusion::gpu::Plan| {
            p.records()
                .iter()
                .filter(|r| r.entry == "pack_conv_weight")
                .count()
        };
        let subgroup = g.gemm_path != wgpu_diffusion::gpu::GemmPath::Portable;
        assert_eq!(
            packs(&plan),
            0,
            "{}: the plan packs frozen weights",
            g.gemm_path
        );
        assert_eq!(packs(&setup), subgroup as usize, "{}", g.gemm_path);
        for seed in [161, 162] {
            let w = random(c.co * c.ci * 9, seed);
            let b = random(c.co, seed + 10);
            let mut flat = vec![0f32; b_at + c.co];
            for (dst, v) in flat.iter_mut().zip(&w) {
                *dst = *v as f32;
            }
            for (dst, v) in flat[b_at..].iter_mut().zip(&b) {
                *dst = *v as f32;
            }
            g.write(&weights, &flat).unwrap();
            g.run(&[&setup, &plan]).unwrap();
            let want = c.forward(&x, &w, Some(&b));
            let what = format!("{}: frozen weights, seed {seed}", g.gemm_path);
            assert_close(&what, &read(&g, &y), &want, 1e-5 * max_abs(&want), 1e-4);
        }
    }
}

/// `Recorder::recycle_packs(k)` (sampling plans): a pack past k cached ones of its size writes
/// the oldest one's texture, which leaves the cache (its tensor is packed again if needed);
/// a chain of convs whose inputs share a few textures still equals the reference, replayed
/// twice.
#[test]
fn recycled_pack_textures_keep_a_conv_chain_exact() {
    use std::sync::Arc;
    use wgpu_diffusion::ops::pack::pack_nhwc;
    use wgpu_diffusion::reference::conv2d::Conv;
    let g = gpu();
    let mut rec = g.recorder();
    rec.recycle_packs(2);
    let t: Vec<_> = (0..3)
        .map(|i| g.tensor(&[1, 4, 4, 8], &format!("t{i}")))
        .collect();
    let packs: Vec<_> = t
        .iter()
        .map(|x| pack_nhwc(&mut rec, x, "x").unwrap())
        .collect();
    assert!(Arc::ptr_eq(&packs[0].texture, &packs[2].texture));
    let before = rec.len();
    let again = pack_nhwc(&mut rec, &t[1], "x").unwrap();
    assert!(Arc::ptr_eq(&packs[1].texture, &again.texture));
    assert_eq!(rec.len(), before, "t1 is still cached");

    let c = Conv {
        n: 1,
        h: 6,
        w: 5,
        ci: 8,
        co: 8,
        kh: 3,
        kw: 3,
        stride: 1,
        pad: [1; 4],
    };
    let geometry = Conv2dGeometry::same(1, 1);
    let x = random(c.n * c.h * c.w * c.ci, 170);
    let ws: Vec<Vec<f64>> = (0..4).map(|i| random(8 * 8 * 9, 171 + i)).collect();
    let mut want = x.clone();
    for w in &ws {
        want = f32_round(&c.forward(&want, w, None));
    }
    for g in gemm_paths() {
        let shape = [c.n, c.h, c.w, c.ci];
        let mut acts = vec![upload(&g, &shape, &x, "x")];
        acts.extend((0..4).map(|i| g.tensor(&shape, &format!("y{i}"))));
        let wts: Vec<_> = ws
            .iter()
            .map(|w| upload(&g, &[8, 8, 3, 3], w, "w"))
            .collect();
        let mut rec = g.recorder();
        rec.recycle_packs(1);
        for (i, w) in wts.iter().enumerate() {
            conv2d_forward(&mut rec, &acts[i], w, None, &acts[i + 1], &geometry).unwrap();
        }
        let plan = rec.finish();
        for replay in 0..2 {
            g.run(&[&plan]).unwrap();
            let what = format!("{}: recycled packs, replay {replay}", g.gemm_path);
            assert_close(
                &what,
                &read(&g, &acts[4]),
                &want,
                1e-5 * max_abs(&want),
                1e-4,
            );
        }
    }
}
