//! f16 storage (issue 21: half-precision activations): tensors of `Dtype::F16`, their uploads
//! and readbacks, and the kernels that read and write them, against the f64 reference.
//!
//! Tolerance: a kernel reads f16 values, computes in f32 and stores its result rounded to the
//! nearest f16 (ties to even), as torch's half tensors do. The reference computes in f64 from
//! the same f16 inputs and rounds to f16 the same way. The two can differ only where the f32
//! result lies within an f32 rounding error of an f16 rounding boundary, and then by one f16
//! ulp: so each element must be within one ulp (rtol 2^-10, atol 2^-24 for subnormals), and
//! all but 1 % of them exactly equal (truncating instead of rounding would miss about half).

use std::sync::Arc;

use crate::common::*;
use wgpu_diffusion::gpu::{Dtype, GemmPath, Gpu, GpuOptions, Tensor};
use wgpu_diffusion::ops::elementwise as ew;
use wgpu_diffusion::ops::{
    attention, conv2d, gelu, gemm, group_norm as gn, layer_norm, loss, reduce, softmax,
    upsample as up,
};
use wgpu_diffusion::reference::elementwise as r;
use wgpu_diffusion::reference::{
    attention as rattn, conv2d as rconv, gelu as rgelu, gemm as rgemm, group_norm as rgn,
    layer_norm as rln, loss as rloss, softmax as rsoft, upsample as rup,
};

/// An f16 tensor holding `data` rounded to f16; returns it with the values it holds.
fn upload_f16(g: &Arc<Gpu>, shape: &[usize], data: &[f64], label: &str) -> (Tensor, Vec<f64>) {
    let t = g.tensor_of(shape, Dtype::F16, label);
    let v: Vec<f32> = data.iter().map(|&x| x as f32).collect();
    g.write(&t, &v).expect("upload");
    (t, f16_round(data))
}

/// `gpu` (read from an f16 tensor) against `reference` computed in f64 and rounded to f16 here.
fn assert_half_stored(what: &str, gpu: &[f32], reference: &[f64]) {
    let rounded = f16_round(reference);
    assert_close(what, gpu, &rounded, 2f64.powi(-24), 2f64.powi(-10));
    let inexact = gpu
        .iter()
        .zip(&rounded)
        .filter(|(a, b)| **a as f64 != **b)
        .count();
    assert!(
        inexact * 100 <= gpu.len(),
        "{what}: {inexact} of {} elements are not the f16 rounding of the reference (first values {:?} vs {:?})",
        gpu.len(),
        &gpu[..gpu.len().min(4)],
        &rounded[..rounded.len().min(4)]
    );
}

/// Values spread over f16's normal and subnormal ranges.
fn spread(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    test_data(n, seed)
        .iter()
        .enumerate()
        .map(|(i, v)| v * scale * if i % 7 == 0 { 1e-5 } else { 1.0 })
        .collect()
}

/// Multiples of 4 run the vectorised kernels, the others the scalar ones.
const SIZES: [usize; 7] = [1, 3, 4, 7, 33, 64, 70_004];

#[test]
fn f16_tensors_round_on_upload_read_back_exactly_and_keep_their_neighbours() {
    let g = gpu();
    // Ties go to even: 1 + 2^-11 lies halfway between 1 and 1 + 2^-10.
    let data = [
        1.0 + 2f64.powi(-11),
        1.0 + 3.0 * 2f64.powi(-11),
        7e-8,
        70000.0,
        -0.1,
    ];
    let (t, held) = upload_f16(&g, &[5], &data, "halves");
    assert_eq!(t.byte_len(), 10);
    let back = read(&g, &t);
    assert_eq!(back[0], 1.0);
    assert_eq!(back[1] as f64, 1.0 + 4.0 * 2f64.powi(-11));
    assert_eq!(
        back[3],
        f32::INFINITY,
        "past f16's range is inf, as in torch"
    );
    for (a, b) in back.iter().zip(&held) {
        assert_eq!(*a as f64, *b);
    }
    // An odd-length view written in the middle of a buffer leaves the element after it alone.
    let whole = g.tensor_of(&[256], Dtype::F16, "whole");
    g.write(&whole, &vec![5.0; 256]).unwrap();
    let view = whole.view(128, &[3], "view");
    g.write(&view, &[1.0, 2.0, 3.0]).unwrap();
    let all = read(&g, &whole);
    assert_eq!(&all[127..132], &[5.0, 1.0, 2.0, 3.0, 5.0]);
    assert_eq!(read(&g, &view), vec![1.0, 2.0, 3.0]);
}

#[test]
fn elementwise_kernels_read_and_store_f16() {
    let g = gpu();
    for (i, &n) in SIZES.iter().enumerate() {
        let s = 40 + 10 * i as u64;
        let (ta, a) = upload_f16(&g, &[n], &spread(n, s, 30.0), "a");
        let (tb, b) = upload_f16(&g, &[n], &spread(n, s + 1, 30.0), "b");
        let (tx, x) = upload_f16(&g, &[n], &spread(n, s + 2, 8.0), "x");
        let (tdy, dy) = upload_f16(&g, &[n], &spread(n, s + 3, 1.0), "dy");
        let (tacc, prior) = upload_f16(&g, &[n], &spread(n, s + 4, 1.0), "acc");
        let f32_b = upload(&g, &[n], &b, "b as f32");
        let sum16 = g.tensor_of(&[n], Dtype::F16, "sum16");
        let mixed32 = g.tensor(&[n], "mixed32");
        let (ty, tdx) = (
            g.tensor_of(&[n], Dtype::F16, "y"),
            g.tensor_of(&[n], Dtype::F16, "dx"),
        );
        run(&g, |rec| {
            ew::add(rec, &ta, &tb, &sum16).unwrap();
            // f16 + f32 into an f32 tensor: each binding has its own element type.
            ew::add(rec, &ta, &f32_b, &mixed32).unwrap();
            ew::silu_forward(rec, &tx, &ty).unwrap();
            ew::silu_backward(rec, &tx, &tdy, &tdx, false).unwrap();
            ew::silu_backward(rec, &tx, &tdy, &tacc, true).unwrap();
            ew::axpby(rec, 0.5, &ta, -2.0, &tb).unwrap();
            ew::scale(rec, 3.0, &ta).unwrap();
        });
        let sum: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert_half_stored(&format!("add n={n}"), &read(&g, &sum16), &sum);
        assert_close(
            &format!("add f16 + f32 -> f32 n={n}"),
            &read(&g, &mixed32),
            &sum,
            1e-7,
            1e-6,
        );
        let silu = r::silu_forward(&x);
        assert_half_stored(&format!("silu_forward n={n}"), &read(&g, &ty), &silu);
        let dx = r::silu_backward(&x, &dy);
        assert_half_stored(&format!("silu_backward n={n}"), &read(&g, &tdx), &dx);
        // The accumulating backward adds to the stored (f16) prior gradient.
        let acc: Vec<f64> = dx.iter().zip(&prior).map(|(d, p)| d + p).collect();
        assert_half_stored(&format!("silu_backward += n={n}"), &read(&g, &tacc), &acc);
        let axpby: Vec<f64> = a.iter().zip(&b).map(|(x, y)| 0.5 * x - 2.0 * y).collect();
        assert_half_stored(&format!("axpby n={n}"), &read(&g, &tb), &axpby);
        let scaled: Vec<f64> = a.iter().map(|x| 3.0 * x).collect();
        assert_half_stored(&format!("scale n={n}"), &read(&g, &ta), &scaled);
    }
}

#[test]
fn channel_kernels_read_and_store_f16() {
    let g = gpu();
    // Channel counts that are all multiples of 4 run the vectorised kernels.
    for &(n, h, w, ca, cb) in &[(2, 3, 5, 7, 3), (2, 4, 4, 64, 32), (2, 17, 9, 12, 8)] {
        let q = h * w;
        let (th, hx) = upload_f16(&g, &[n, h, w, ca], &spread(n * q * ca, 60, 4.0), "h");
        // The time-embedding projection stays f32 (issue 21: the time-embedding MLP runs in f32).
        let v = random(n * ca, 61);
        let tv = upload(&g, &[n, ca], &v, "v");
        let (tb, b) = upload_f16(&g, &[n, h, w, cb], &spread(n * q * cb, 62, 4.0), "b");
        let (ta, a) = upload_f16(&g, &[n, h, w, ca], &spread(n * q * ca, 63, 4.0), "a");
        let tcat = g.tensor_of(&[n, h, w, ca + cb], Dtype::F16, "cat");
        let (tacc, prior) = upload_f16(&g, &[n, h, w, cb], &spread(n * q * cb, 64, 4.0), "acc");
        run(&g, |rec| {
            ew::add_channel_bias(rec, &tv, 0.5, &th).unwrap();
            ew::copy_channels(rec, &ta, 0, &tcat, 0, ca, false).unwrap();
            ew::copy_channels(rec, &tb, 0, &tcat, ca, cb, false).unwrap();
        });
        run(&g, |rec| {
            ew::copy_channels(rec, &tcat, ca, &tacc, 0, cb, true).unwrap();
        });
        let shape = format!("{n}x{h}x{w}x{ca}+{cb}");
        assert_half_stored(
            &format!("add_channel_bias {shape}"),
            &read(&g, &th),
            &r::add_channel_bias(&hx, &v, 0.5, q, ca),
        );
        assert_half_stored(
            &format!("concat {shape}"),
            &read(&g, &tcat),
            &r::concat_channels(&a, ca, &b, cb),
        );
        let acc: Vec<f64> = b.iter().zip(&prior).map(|(x, y)| x + y).collect();
        assert_half_stored(&format!("copy_channels += {shape}"), &read(&g, &tacc), &acc);
    }
}

/// A kernel whose binding reads f32 only is refused an f16 tensor, by name, before anything
/// runs, rather than reading its bytes as f32.
#[test]
fn an_f16_tensor_where_a_kernel_reads_f32_is_refused_by_name() {
    // A device of its own: the refusal stays recorded on it.
    let g = Gpu::new(&GpuOptions::default()).expect("adapter");
    let timesteps = g.tensor_of(&[3], Dtype::F16, "half timesteps");
    let out = g.tensor(&[3, 8], "embedding");
    let mut rec = g.recorder();
    wgpu_diffusion::ops::timestep_embedding::timestep_embedding(
        &mut rec, &timesteps, &out, true, 0.0,
    )
    .unwrap();
    let e = g.check().unwrap_err().to_string();
    assert!(
        e.contains("half timesteps") && e.contains("f16") && e.contains("timestep_embedding"),
        "{e}"
    );
}

#[test]
fn without_shader_f16_an_f16_tensor_is_an_error_naming_the_feature_and_the_adapter() {
    let g = Gpu::new(&GpuOptions {
        without_f16: true,
        ..Default::default()
    })
    .expect("adapter");
    assert!(!g.supports_f16_storage());
    // f32 works on it.
    let t = g.tensor_from(&[2], &[1.0, 2.0], "f32").unwrap();
    assert_eq!(read(&g, &t), vec![1.0, 2.0]);
    let _ = g.tensor_of(&[4], Dtype::F16, "activation");
    let e = g.check().unwrap_err().to_string();
    assert!(
        e.contains("SHADER_F16") && e.contains(&g.adapter.name) && e.contains("--precision f32"),
        "{e}"
    );
    assert!(!e.contains("--batch-size"), "not a size problem: {e}");
}

/// f16 `x` of shape [n, h, w, c] with an offset mean (the two-pass variance), with its values.
fn norm_input(g: &Arc<Gpu>, shape: [usize; 4], seed: u64) -> (Tensor, Vec<f64>) {
    let numel = shape.iter().product();
    let x: Vec<f64> = test_data(numel, seed)
        .iter()
        .map(|v| 3.0 + 2.0 * v)
        .collect();
    upload_f16(g, &shape, &x, "x")
}

/// GroupNorm reads f16 activations and stores f16 outputs and input gradients; its statistics
/// and its parameter gradients stay f32 (torch autocast runs group_norm in f32). Scalar and
/// vectorised kernels.
#[test]
fn group_norm_reads_and_stores_f16_with_f32_statistics_and_parameter_gradients() {
    let g = gpu();
    for (i, &(n, h, w, c, groups)) in [(3, 7, 7, 33, 3), (2, 8, 8, 64, 32)].iter().enumerate() {
        let what = format!("{n}x{h}x{w}x{c} G={groups}");
        let shape = [n, h, w, c];
        let (tx, x) = norm_input(&g, shape, 200 + i as u64);
        let (tdy, dy) = upload_f16(&g, &shape, &random(n * h * w * c, 210 + i as u64), "dy");
        let gamma: Vec<f64> = test_data(c, 220).iter().map(|v| 1.0 + 0.5 * v).collect();
        let gamma = f32_round(&gamma);
        let beta = random(c, 221);
        let (tg, tb) = (
            upload(&g, &[c], &gamma, "gamma"),
            upload(&g, &[c], &beta, "beta"),
        );
        let ty = g.tensor_of(&shape, Dtype::F16, "y");
        let tdx = g.tensor_of(&shape, Dtype::F16, "dx");
        let (tm, ts) = (
            g.tensor(&[n * groups], "mean"),
            g.tensor(&[n * groups], "rstd"),
        );
        let (tdg, tdb) = (g.tensor(&[c], "dgamma"), g.tensor(&[c], "dbeta"));
        run(&g, |rec| {
            gn::group_norm_forward(rec, &tx, &tg, &tb, groups, 1e-5, &ty, &tm, &ts).unwrap();
            gn::group_norm_backward(
                rec, &tx, &tdy, &tg, &tm, &ts, &tdx, &tdg, &tdb, false, false,
            )
            .unwrap();
        });
        let (y, stats) = rgn::group_norm_forward(&x, n, h * w, c, groups, &gamma, &beta, 1e-5);
        let (dx, dgamma, dbeta) =
            rgn::group_norm_backward(&x, &dy, n, h * w, c, groups, &gamma, &stats);
        assert_close(
            &format!("mean {what}"),
            &read(&g, &tm),
            &stats.mean,
            1e-5,
            1e-5,
        );
        assert_close(
            &format!("rstd {what}"),
            &read(&g, &ts),
            &stats.rstd,
            0.0,
            1e-5,
        );
        assert_half_stored(&format!("y {what}"), &read(&g, &ty), &y);
        // dx cancels (dxhat − mean(dxhat) − xhat·mean(dxhat·xhat)): the f32 tolerance of the
        // f32 test (1e-4 relative, 1e-5 of the largest) plus the f16 rounding of the store.
        let big = max_abs(&dx);
        assert_close(
            &format!("dx {what}"),
            &read(&g, &tdx),
            &f16_round(&dx),
            1e-5 * big,
            1e-3,
        );
        let (bg, bb) = (max_abs(&dgamma), max_abs(&dbeta));
        assert_close(
            &format!("dgamma {what}"),
            &read(&g, &tdg),
            &dgamma,
            1e-5 * bg,
            1e-4,
        );
        assert_close(
            &format!("dbeta {what}"),
            &read(&g, &tdb),
            &dbeta,
            1e-5 * bb,
            1e-4,
        );
    }
}

/// Nearest 2x upsampling (forward and its 2 x 2 sum backward), the row sums of bias gradients
/// and the MSE loss and its gradient, over f16 tensors (scalar and vectorised kernels).
#[test]
fn upsample_row_sums_and_loss_read_and_store_f16() {
    let g = gpu();
    for &(n, h, w, c) in &[(2, 3, 5, 7), (2, 4, 4, 8)] {
        let what = format!("{n}x{h}x{w}x{c}");
        let (tx, x) = upload_f16(&g, &[n, h, w, c], &spread(n * h * w * c, 300, 4.0), "x");
        let big = [n, 2 * h, 2 * w, c];
        let (tdy, dy) = upload_f16(&g, &big, &spread(4 * n * h * w * c, 301, 4.0), "dy");
        let ty = g.tensor_of(&big, Dtype::F16, "y");
        let tdx = g.tensor_of(&[n, h, w, c], Dtype::F16, "dx");
        // Bias gradient of a conv whose output gradient is f16: Σ over pixels, into f32.
        let rows = n * h * w;
        let tsum = g.tensor(&[c], "bias grad");
        let target = random(n * h * w * c, 302);
        let ttarget = upload(&g, &[n, h, w, c], &target, "target (f32)");
        let (tloss, tdpred) = (
            g.tensor(&[1], "loss"),
            g.tensor_of(&[n, h, w, c], Dtype::F16, "dpred"),
        );
        run(&g, |rec| {
            up::upsample_nearest2x_forward(rec, &tx, &ty).unwrap();
            up::upsample_nearest2x_backward(rec, &tdy, &tdx).unwrap();
            reduce::sum_rows(rec, &tx, rows, c, &tsum, false).unwrap();
            loss::mse_loss(rec, &tx, &ttarget, None, &tloss).unwrap();
            loss::mse_backward(rec, &tx, &ttarget, None, 1024.0, &tdpred).unwrap();
        });
        let y = rup::upsample_nearest2x_forward(&x, n, h, w, c);
        assert_half_stored(&format!("upsample {what}"), &read(&g, &ty), &y);
        let dx = rup::upsample_nearest2x_backward(&dy, n, h, w, c);
        assert_half_stored(&format!("upsample backward {what}"), &read(&g, &tdx), &dx);
        let sums: Vec<f64> = (0..c)
            .map(|j| (0..rows).map(|r| x[r * c + j]).sum())
            .collect();
        assert_close(
            &format!("sum_rows {what}"),
            &read(&g, &tsum),
            &sums,
            1e-5,
            1e-5,
        );
        let l = rloss::mse_loss(&x, &target, None);
        assert_close(&format!("mse {what}"), &read(&g, &tloss), &[l], 0.0, 1e-5);
        let d = rloss::mse_backward(&x, &target, None, 1024.0);
        assert_half_stored(&format!("mse backward {what}"), &read(&g, &tdpred), &d);
    }
}

/// Convolutions over f16 activations on both GEMM paths: forward (packed by the pack kernel
/// into f32 texels on the subgroup path, read from the buffer on the portable one) into an f16
/// output, the input gradient from an f16 dY into f16, the weight and bias gradients into f32.
#[test]
fn convolutions_read_and_store_f16_on_both_paths() {
    for g in gemm_paths() {
        for (i, conv) in [
            rconv::Conv {
                n: 2,
                h: 7,
                w: 5,
                ci: 8,
                co: 7,
                kh: 3,
                kw: 3,
                stride: 1,
                pad: [1; 4],
            },
            rconv::Conv {
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
        ]
        .into_iter()
        .enumerate()
        {
            let what = format!("{}: conv {i}", g.gemm_path);
            let (oh, ow) = (conv.out_h(), conv.out_w());
            let xs = [conv.n, conv.h, conv.w, conv.ci];
            let ys = [conv.n, oh, ow, conv.co];
            let (tx, x) = upload_f16(&g, &xs, &random(xs.iter().product(), 400), "x");
            let (tdy, dy) = upload_f16(&g, &ys, &random(ys.iter().product(), 402), "dy");
            let wt = random(conv.co * conv.ci * 9, 401);
            let b = random(conv.co, 403);
            let tw = upload(&g, &[conv.co, conv.ci, 3, 3], &wt, "w");
            let tb = upload(&g, &[conv.co], &b, "b");
            let ty = g.tensor_of(&ys, Dtype::F16, "y");
            let tdx = g.tensor_of(&xs, Dtype::F16, "dx");
            let (tdw, tdb) = (
                g.tensor(&[conv.co, conv.ci, 3, 3], "dw"),
                g.tensor(&[conv.co], "db"),
            );
            let geometry = conv_geometry(&conv);
            run(&g, |rec| {
                conv2d::conv2d_forward(rec, &tx, &tw, Some(&tb), &ty, &geometry).unwrap();
                conv2d::conv2d_backward_input(rec, &tdy, &tw, &tdx, &geometry, false).unwrap();
                conv2d::conv2d_backward_weight(rec, &tx, &tdy, &tdw, Some(&tdb), &geometry, false)
                    .unwrap();
            });
            let y = conv.forward(&x, &wt, Some(&b));
            assert_half_near(&format!("y {what}"), &read(&g, &ty), &y, 1e-6 * max_abs(&y));
            let (dx, dw, db) = conv.backward(&x, &wt, &dy);
            assert_half_near(
                &format!("dx {what}"),
                &read(&g, &tdx),
                &dx,
                1e-6 * max_abs(&dx),
            );
            assert_close(
                &format!("dw {what}"),
                &read(&g, &tdw),
                &dw,
                1e-6 * max_abs(&dw),
                1e-5,
            );
            assert_close(
                &format!("db {what}"),
                &read(&g, &tdb),
                &db,
                1e-6 * max_abs(&db),
                1e-5,
            );
        }
    }
}

/// With half-precision operands, an f16 activation whose rows are whole texture rows is packed
/// by a plain copy into the `rgba16float` operand texture (its elements are the texels), no
/// conversion kernel: the result is the convolution of the f16 values.
#[test]
fn with_half_operands_an_f16_activation_is_copied_into_its_operand_texture() {
    for g in half_gpus()
        .into_iter()
        .filter(|g| g.gemm_path != GemmPath::Portable)
    {
        let conv = rconv::Conv {
            n: 1,
            h: 4,
            w: 16,
            ci: 64,
            co: 8,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: [1; 4],
        };
        let (tx, x) = upload_f16(&g, &[1, 4, 16, 64], &random(4 * 16 * 64, 410), "x");
        let wt = random(8 * 64 * 9, 411);
        let tw = upload(&g, &[8, 64, 3, 3], &wt, "w");
        let ty = g.tensor(&[1, 4, 16, 8], "y");
        let plan = run(&g, |rec| {
            let geometry = conv_geometry(&conv);
            wgpu_diffusion::ops::conv2d::conv2d_forward(rec, &tx, &tw, None, &ty, &geometry)
                .unwrap();
        });
        assert!(
            plan.records()
                .iter()
                .any(|r| r.kind == "copy_to_texture" && r.bindings[0] == "x"),
            "x was not copied: {:?}",
            plan.records()
                .iter()
                .map(|r| (r.kind, r.entry))
                .collect::<Vec<_>>()
        );
        let want = conv.forward(&x, &f16_round(&wt), None);
        assert_close(
            "conv of f16 x, f16 operands",
            &read(&g, &ty),
            &want,
            1e-5,
            1e-4,
        );
    }
}

/// `gpu` (an f16 tensor) against `reference` rounded to f16, where the f32 computation itself
/// carries an error of `atol` (sums with cancellation): one f16 ulp plus that.
fn assert_half_near(what: &str, gpu: &[f32], reference: &[f64], atol: f64) {
    assert_close(what, gpu, &f16_round(reference), atol, 2f64.powi(-10));
}

/// Linear layers (GEMM) and the fused attention cores read f16 activations and store f16
/// outputs and activation gradients; weight and bias gradients stay f32. Both GEMM paths, odd
/// and vec4-aligned widths; attention: self and cross (9 keys), heads of 16 and 32.
#[test]
fn linear_layers_and_fused_attention_read_and_store_f16_on_both_paths() {
    for g in gemm_paths() {
        let path = g.gemm_path;
        for &(rows, in_f, out_f) in &[(33, 12, 7), (64, 16, 32)] {
            let what = format!("{path}: {rows}x{in_f} -> {out_f}");
            let (tx, x) = upload_f16(&g, &[rows, in_f], &random(rows * in_f, 500), "x");
            let (tdy, dy) = upload_f16(&g, &[rows, out_f], &random(rows * out_f, 501), "dy");
            let (w, b) = (random(out_f * in_f, 502), random(out_f, 503));
            let (tw, tb) = (
                upload(&g, &[out_f, in_f], &w, "w"),
                upload(&g, &[out_f], &b, "b"),
            );
            let ty = g.tensor_of(&[rows, out_f], Dtype::F16, "y");
            let tdx = g.tensor_of(&[rows, in_f], Dtype::F16, "dx");
            let (tdw, tdb) = (g.tensor(&[out_f, in_f], "dw"), g.tensor(&[out_f], "db"));
            run(&g, |rec| {
                gemm::linear_forward(rec, &tx, &tw, Some(&tb), &ty).unwrap();
                gemm::linear_backward(
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
            let y = rgemm::linear_forward(&x, &w, Some(&b), rows, in_f, out_f);
            assert_half_near(
                &format!("linear y {what}"),
                &read(&g, &ty),
                &y,
                1e-6 * max_abs(&y),
            );
            let (dx, dw, db) = rgemm::linear_backward(&x, &w, &dy, rows, in_f, out_f);
            assert_half_near(
                &format!("linear dx {what}"),
                &read(&g, &tdx),
                &dx,
                1e-6 * max_abs(&dx),
            );
            assert_close(
                &format!("linear dw {what}"),
                &read(&g, &tdw),
                &dw,
                1e-6 * max_abs(&dw),
                1e-5,
            );
            assert_close(
                &format!("linear db {what}"),
                &read(&g, &tdb),
                &db,
                1e-6 * max_abs(&db),
                1e-5,
            );
        }
        for &(n, tq, tk, heads, head_dim) in &[(2, 49, 9, 4, 16), (2, 17, 17, 1, 32)] {
            let what = format!("{path}: attention n{n} tq{tq} tk{tk} h{heads} d{head_dim}");
            let dims = rattn::AttentionDims {
                n,
                query_tokens: tq,
                key_tokens: tk,
                heads,
                head_dim,
                causal: false,
            };
            let shape = attention::AttentionShape {
                samples: n,
                query_tokens: tq,
                key_tokens: tk,
                heads,
                causal: false,
            };
            let c = heads * head_dim;
            let (rows_q, rows_k) = ([n * tq, c], [n * tk, c]);
            let (tq_, q) = upload_f16(&g, &rows_q, &spread(n * tq * c, 510, 3.0), "q");
            let (tk_, k) = upload_f16(&g, &rows_k, &spread(n * tk * c, 511, 3.0), "k");
            let (tv, v) = upload_f16(&g, &rows_k, &random(n * tk * c, 512), "v");
            let (tdo, d_o) = upload_f16(&g, &rows_q, &random(n * tq * c, 513), "d_o");
            let half = |shape: &[usize], label: &str| g.tensor_of(shape, Dtype::F16, label);
            let (to, tdq, tdk, tdv) = (
                half(&rows_q, "o"),
                half(&rows_q, "dq"),
                half(&rows_k, "dk"),
                half(&rows_k, "dv"),
            );
            let stats = g.tensor(&[attention::stats_len(n, heads, tq)], "stats");
            let scale = 1.0 / (head_dim as f64).sqrt();
            let grads = attention::AttentionGrads {
                q: &tq_,
                k: &tk_,
                v: &tv,
                o: &to,
                d_o: &tdo,
                dq: &tdq,
                dk: &tdk,
                dv: &tdv,
            };
            run(&g, |rec| {
                attention::attention_forward(
                    rec,
                    shape,
                    &tq_,
                    &tk_,
                    &tv,
                    &to,
                    &stats,
                    scale as f32,
                )
                .unwrap();
                attention::attention_backward(rec, shape, &grads, &stats, scale as f32).unwrap();
            });
            let o = rattn::attention_forward(dims, &q, &k, &v, scale);
            assert_half_near(&format!("o {what}"), &read(&g, &to), &o, 1e-6 * max_abs(&o));
            // The backward reads the stored (f16) o for D = rowsum(dO ∘ O): its rounding enters
            // dS = P (dP − D), so the gradients are held to f16's precision relative to the row.
            let (dq, dk, dv) = rattn::attention_backward(dims, &q, &k, &v, &d_o, scale);
            for (name, t, want) in [("dq", &tdq, &dq), ("dk", &tdk, &dk), ("dv", &tdv, &dv)] {
                let atol = 2f64.powi(-9) * max_abs(want);
                assert_half_near(&format!("{name} {what}"), &read(&g, t), want, atol);
            }
        }
    }
}

/// LayerNorm (statistics and parameter gradients f32), GELU, GEGLU, quick-GELU and softmax
/// read f16 activations and store f16 outputs and gradients.
#[test]
fn layer_norm_gelus_and_softmax_read_and_store_f16() {
    let g = gpu();
    for &(rows, cols) in &[(7, 33), (5, 64)] {
        let what = format!("{rows}x{cols}");
        let (tx, x) = upload_f16(&g, &[rows, cols], &spread(rows * cols, 600, 3.0), "x");
        let (tdy, dy) = upload_f16(&g, &[rows, cols], &random(rows * cols, 601), "dy");
        let gamma = f32_round(
            &test_data(cols, 602)
                .iter()
                .map(|v| 1.0 + 0.5 * v)
                .collect::<Vec<_>>(),
        );
        let beta = random(cols, 603);
        let (tg, tb) = (
            upload(&g, &[cols], &gamma, "gamma"),
            upload(&g, &[cols], &beta, "beta"),
        );
        let half = |label: &str| g.tensor_of(&[rows, cols], Dtype::F16, label);
        let (ty, tdx) = (half("y"), half("dx"));
        let (tdg, tdb) = (g.tensor(&[cols], "dgamma"), g.tensor(&[cols], "dbeta"));
        let (tgelu, tdgelu, tquick, tdquick) =
            (half("gelu"), half("dgelu"), half("quick"), half("dquick"));
        let (tsoft, tdsoft) = (half("softmax"), half("dsoftmax"));
        let inner = cols / 2;
        let geglu_in = g.tensor_of(&[rows, 2 * inner], Dtype::F16, "geglu in");
        let (tgeglu, tdgeglu_out) = (
            g.tensor_of(&[rows, inner], Dtype::F16, "geglu"),
            g.tensor_of(&[rows, 2 * inner], Dtype::F16, "dgeglu"),
        );
        let geglu_x: Vec<f64> = x[..rows * 2 * inner].to_vec();
        g.write(
            &geglu_in,
            &geglu_x.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        )
        .unwrap();
        let (tgdy, gdy) = upload_f16(&g, &[rows, inner], &random(rows * inner, 604), "geglu dy");
        let mut stats = None;
        run(&g, |rec| {
            let st = layer_norm::stats_tensor(rec, &tx, cols, "stats");
            layer_norm::layer_norm_forward(rec, &tx, (&tg, &tb), 1e-5, &ty, &st).unwrap();
            let grads = layer_norm::LayerNormGrads {
                dx: &tdx,
                add_dx: false,
                dgamma: &tdg,
                dbeta: &tdb,
            };
            layer_norm::layer_norm_backward(rec, &tx, &tg, &st, &tdy, &grads).unwrap();
            stats = Some(st);
            gelu::gelu_forward(rec, &tx, &tgelu).unwrap();
            gelu::gelu_backward(rec, &tx, &tdy, &tdgelu).unwrap();
            gelu::quick_gelu_forward(rec, &tx, &tquick).unwrap();
            gelu::quick_gelu_backward(rec, &tx, &tdy, &tdquick).unwrap();
            gelu::geglu_forward(rec, &geglu_in, &tgeglu).unwrap();
            gelu::geglu_backward(rec, &geglu_in, &tgdy, &tdgeglu_out).unwrap();
            softmax::softmax_forward(rec, &tx, &tsoft).unwrap();
            softmax::softmax_backward(rec, &tsoft, &tdy, &tdsoft).unwrap();
        });
        let (y, st) = rln::layer_norm_forward(&x, cols, &gamma, &beta, 1e-5);
        assert_half_near(
            &format!("layer_norm y {what}"),
            &read(&g, &ty),
            &y,
            1e-6 * max_abs(&y),
        );
        let (dx, dgamma, dbeta) = rln::layer_norm_backward(&x, cols, &gamma, &st, &dy);
        assert_half_near(
            &format!("layer_norm dx {what}"),
            &read(&g, &tdx),
            &dx,
            1e-5 * max_abs(&dx),
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
        let each = |f: fn(f64) -> f64| x.iter().map(|&v| f(v)).collect::<Vec<_>>();
        let times = |a: Vec<f64>| a.iter().zip(&dy).map(|(a, d)| a * d).collect::<Vec<_>>();
        assert_half_stored(
            &format!("gelu {what}"),
            &read(&g, &tgelu),
            &each(rgelu::gelu),
        );
        assert_half_near(
            &format!("gelu backward {what}"),
            &read(&g, &tdgelu),
            &times(each(rgelu::gelu_grad)),
            1e-7,
        );
        assert_half_near(
            &format!("quick_gelu {what}"),
            &read(&g, &tquick),
            &each(rgelu::quick_gelu),
            1e-7,
        );
        assert_half_near(
            &format!("quick_gelu backward {what}"),
            &read(&g, &tdquick),
            &times(each(rgelu::quick_gelu_grad)),
            1e-7,
        );
        let gx = f16_round(&geglu_x);
        assert_half_near(
            &format!("geglu {what}"),
            &read(&g, &tgeglu),
            &rgelu::geglu_forward(&gx, inner),
            1e-7,
        );
        assert_half_near(
            &format!("geglu backward {what}"),
            &read(&g, &tdgeglu_out),
            &rgelu::geglu_backward(&gx, inner, &gdy),
            1e-7,
        );
        // Softmax of the f16 scores; its backward reads the stored (f16) probabilities.
        let p = rsoft::softmax_forward(&x, cols);
        assert_half_near(&format!("softmax {what}"), &read(&g, &tsoft), &p, 1e-7);
        let held: Vec<f64> = read(&g, &tsoft).iter().map(|&v| v as f64).collect();
        let dp = rsoft::softmax_backward(&held, &dy, cols);
        assert_half_near(
            &format!("softmax backward {what}"),
            &read(&g, &tdsoft),
            &dp,
            1e-6 * max_abs(&dp),
        );
        drop(stats);
    }
}

/// Issue 21's memory target: a half-precision U-Net stores its activations and their gradients
/// as f16 (its input, output and time-embedding MLP stay f32), so a tiny16 training step at
/// batch 32 allocates at most 0.6× the bytes of the f32 step (fresh devices, each counting only
/// its own buffers and textures; `bench` measures mnist28 likewise, README).
#[test]
fn a_half_precision_trainer_stores_f16_activations_in_at_most_0_6_of_the_memory() {
    use wgpu_diffusion::gpu::Precision;
    use wgpu_diffusion::nn::UNetConfig;
    use wgpu_diffusion::train::{TrainConfig, Trainer};
    let model = UNetConfig::preset("tiny16").unwrap();
    let bytes = |precision: Precision| {
        let g = Gpu::new(&GpuOptions {
            precision,
            ..Default::default()
        })
        .expect("adapter");
        let cfg = TrainConfig {
            batch_size: 32,
            grad_scaler: precision == Precision::F16,
            ..Default::default()
        };
        let t = Trainer::new(g.clone(), cfg, &model).unwrap();
        let acts: std::collections::HashMap<_, _> = t
            .unet
            .activations()
            .into_iter()
            .map(|(name, tensor)| (name, tensor.dtype()))
            .collect();
        (g.allocated_bytes(), acts, t.unet.output.value.dtype())
    };
    let (full, full_acts, _) = bytes(Precision::F32);
    let (half, half_acts, output) = bytes(Precision::F16);
    assert!(full_acts.values().all(|d| *d == Dtype::F32));
    assert_eq!(half_acts["conv_in"], Dtype::F16);
    assert_eq!(half_acts["down_blocks.0.resnets.0"], Dtype::F16);
    assert_eq!(half_acts["time_embedding"], Dtype::F32);
    assert_eq!(output, Dtype::F32, "the loss reads the output in f32");
    eprintln!(
        "allocated: f32 {full} B, f16 {half} B ({:.3}x)",
        half as f64 / full as f64
    );
    assert!(
        half as f64 <= 0.6 * full as f64,
        "f16 step allocates {half} B, more than 0.6 x the f32 step's {full} B"
    );
}

/// A half-precision Stable Diffusion run (text encoder + U-Net in the VAE's latent space) trains
/// and samples: the text encoder's last hidden state and the VAE's latent cross from f32 parts
/// into the f16 U-Net as its f32 inputs (a copy between tensors of two types is refused).
#[test]
fn a_half_precision_latent_text_run_trains_and_samples() {
    let dir = std::env::temp_dir().join(format!("wd-f16-sd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let vae = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/vae/model");
    let out = dir.join("run");
    let (ok, log) = run_cli(&[
        "train",
        "--text-conditional",
        "--vae",
        vae,
        "--precision",
        "f16",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{log}");
    let samples = dir.join("samples");
    let (ok, log) = run_cli(&[
        "sample",
        "--model",
        out.join("model").to_str().unwrap(),
        "--prompt",
        "a handwritten seven",
        "--precision",
        "f16",
        "--steps",
        "2",
        "--num",
        "2",
        "--out",
        samples.to_str().unwrap(),
    ]);
    assert!(ok, "{log}");
    assert!(samples.join("grid.png").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}
