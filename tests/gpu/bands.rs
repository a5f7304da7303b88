//! Tensors and models larger than one storage binding or one buffer, on tiny shapes: a device
//! whose bindings and buffers are capped (`GpuOptions::cap_binding` / `cap_buffer`) makes the
//! code that SD 1.5 needs at 512 × 512 on lavapipe (128 MiB bindings, 2 GiB buffers) run here.
//! - conv2d, GroupNorm (+SiLU) and nearest upsampling whose tensors exceed a binding run in row
//!   bands (ops/bands.rs): checked against the f64 references on odd heights, batch 2, stride 2
//!   with asymmetric padding and a 1×1 conv, on both GEMM paths, and the plan is checked to
//!   hold several bands. Tolerances: those of tests/gpu/conv2d.rs and group_norm.rs (rtol 1e-4).
//! - An embedding table past a binding is read in parts (every label in one part).
//! - A sampling parameter store past one buffer is split over several at parameter boundaries;
//!   with the CLIP token table in parts too, the tiny SD pipeline still samples what diffusers
//!   does (tests/gpu/sd_pipeline.rs's check and bound).

use crate::common::*;
use wgpu_diffusion::gpu::Plan;
use wgpu_diffusion::ops::conv2d::conv2d_forward;
use wgpu_diffusion::ops::embedding::embedding_add_forward;
use wgpu_diffusion::ops::group_norm::{group_norm_forward, group_norm_silu_forward};
use wgpu_diffusion::ops::upsample::upsample_nearest2x_forward;
use wgpu_diffusion::reference;
use wgpu_diffusion::reference::conv2d::Conv;

fn dispatches(plan: &Plan, entry_prefix: &str) -> usize {
    plan.records()
        .iter()
        .filter(|r| r.kind == "dispatch" && r.entry.starts_with(entry_prefix))
        .count()
}

/// 16 KiB bindings: one sample of [29, 16, 16] is 29 KiB, so every op below runs in bands.
const BINDING: u64 = 16 << 10;

#[test]
fn conv2d_in_row_bands_matches_reference() {
    let conv = |h, ci, co, k, stride, pad| Conv {
        n: 2,
        h,
        w: 16,
        ci,
        co,
        kh: k,
        kw: k,
        stride,
        pad,
    };
    let cases = [
        conv(29, 16, 16, 3, 1, [1; 4]),
        conv(29, 16, 8, 3, 1, [1; 4]),
        conv(31, 16, 16, 3, 2, [0, 0, 1, 1]),
        conv(29, 16, 16, 1, 1, [0; 4]),
    ];
    for g in capped_gpus(BINDING, None) {
        for (i, c) in cases.iter().enumerate() {
            let (oh, ow) = (c.out_h(), c.out_w());
            let x = random(c.n * c.h * c.w * c.ci, 40 + i as u64);
            let w = random(c.co * c.ci * c.kh * c.kw, 50 + i as u64);
            let b = random(c.co, 60 + i as u64);
            let xt = upload(&g, &[c.n, c.h, c.w, c.ci], &x, "x");
            let wt = upload(&g, &[c.co, c.ci, c.kh, c.kw], &w, "w");
            let bt = upload(&g, &[c.co], &b, "b");
            let y = g.tensor(&[c.n, oh, ow, c.co], "y");
            let geometry = conv_geometry(c);
            let plan = run(&g, |rec| {
                conv2d_forward(rec, &xt, &wt, Some(&bt), &y, &geometry).unwrap()
            });
            g.check().unwrap();
            let bands = dispatches(&plan, "conv2d_forward");
            assert!(
                bands >= 2 * c.n,
                "case {i}: {bands} conv dispatches, expected bands"
            );
            let want = c.forward(&x, &w, Some(&b));
            let what = format!("banded conv case {i} ({}, {bands} bands)", g.gemm_path);
            assert_close(&what, &read(&g, &y), &want, 1e-5 * max_abs(&want), 1e-4);
        }
    }
}

#[test]
fn group_norm_in_row_bands_matches_reference() {
    let g = &capped_gpus(BINDING, None)[0];
    for (i, (h, c, groups)) in [(29, 16, 4), (31, 16, 16), (17, 32, 8)].iter().enumerate() {
        let (n, w) = (2, 16);
        let x = random(n * h * w * c, 70 + i as u64);
        let gamma = random(*c, 80 + i as u64);
        let beta = random(*c, 90 + i as u64);
        let (ref_y, stats) = reference::group_norm::group_norm_forward(
            &x,
            n,
            h * w,
            *c,
            *groups,
            &gamma,
            &beta,
            1e-6,
        );
        for silu in [false, true] {
            let xt = upload(g, &[n, *h, w, *c], &x, "x");
            let gt = upload(g, &[*c], &gamma, "gamma");
            let bt = upload(g, &[*c], &beta, "beta");
            let y = g.tensor(&[n, *h, w, *c], "y");
            let (mean, rstd) = (
                g.tensor(&[n * groups], "mean"),
                g.tensor(&[n * groups], "rstd"),
            );
            let op = if silu {
                group_norm_silu_forward
            } else {
                group_norm_forward
            };
            let plan = run(g, |rec| {
                op(rec, &xt, &gt, &bt, *groups, 1e-6, &y, &mean, &rstd).unwrap()
            });
            g.check().unwrap();
            assert!(dispatches(&plan, "group_norm_forward") >= 2 * n);
            let want: Vec<f64> = if silu {
                ref_y.iter().map(|&v| v / (1.0 + (-v).exp())).collect()
            } else {
                ref_y.clone()
            };
            let what = format!("banded group norm case {i} silu {silu}");
            assert_close(&what, &read(g, &y), &want, 1e-5, 1e-4);
            assert_close(
                &format!("{what} mean"),
                &read(g, &mean),
                &stats.mean,
                1e-6,
                1e-5,
            );
            assert_close(
                &format!("{what} rstd"),
                &read(g, &rstd),
                &stats.rstd,
                1e-6,
                1e-4,
            );
        }
    }
}

#[test]
fn upsample_in_row_bands_matches_reference() {
    let g = &capped_gpus(BINDING, None)[0];
    let (n, h, w, c) = (2, 13, 8, 16);
    let x = random(n * h * w * c, 100);
    let xt = upload(g, &[n, h, w, c], &x, "x");
    let y = g.tensor(&[n, 2 * h, 2 * w, c], "y");
    let plan = run(g, |rec| upsample_nearest2x_forward(rec, &xt, &y).unwrap());
    g.check().unwrap();
    assert!(dispatches(&plan, "upsample_nearest2x_forward") >= 2 * n);
    let want = reference::upsample::upsample_nearest2x_forward(&x, n, h, w, c);
    assert_close("banded upsample", &read(g, &y), &want, 0.0, 0.0);
}

#[test]
fn an_embedding_table_past_one_binding_is_read_in_parts() {
    let g = &capped_gpus(BINDING, None)[0];
    // 300 rows of 32 floats (128 B): 37.5 KiB, three parts of 128 rows.
    let (rows, dim) = (300, 32);
    let table = random(rows * dim, 110);
    let labels: Vec<u32> = vec![0, 127, 128, 255, 256, 299, 5, 200];
    let start = random(labels.len() * dim, 111);
    let tt = upload(g, &[rows, dim], &table, "table");
    let lt = g.tensor(&[labels.len()], "labels");
    g.write_u32(&lt, &labels).unwrap();
    let out = upload(g, &[labels.len(), dim], &start, "out");
    let plan = run(g, |rec| embedding_add_forward(rec, &lt, &tt, &out).unwrap());
    g.check().unwrap();
    assert_eq!(dispatches(&plan, "embedding_add_forward"), 3);
    let want = reference::embedding::embedding_add_forward(&labels, &table, dim, &start);
    // One f32 addition per element: within half an ulp of the f64 sum.
    assert_close("embedding in parts", &read(g, &out), &want, 0.0, 1e-7);
}

/// A model built inside `gpu::no_grad` (as samplers build theirs) allocates no gradients, and
/// recording its backward anyway is refused with the tensor's name, not a wgpu panic.
#[test]
fn a_sampling_build_keeps_no_gradients() {
    use wgpu_diffusion::nn::UNet;
    use wgpu_diffusion::nn::config::UNetConfig;
    let g = &capped_gpus(u64::MAX, None)[0];
    let config = UNetConfig::preset("tiny16").unwrap();
    let before = g.allocated_bytes();
    let training = UNet::new(g, &config, 4).unwrap();
    let with_grads = g.allocated_bytes() - before;
    let sampling = {
        let _no_grad = wgpu_diffusion::gpu::no_grad();
        UNet::for_inference(g, &config, 4).unwrap()
    };
    let without = g.allocated_bytes() - before - with_grads;
    assert!(
        (without as f64) < 0.6 * with_grads as f64,
        "sampling build {without} B, training build {with_grads} B"
    );
    assert!(wgpu_diffusion::gpu::grad_enabled());
    g.check().unwrap();
    let mut rec = g.recorder();
    sampling.forward(&mut rec).unwrap();
    g.check().unwrap();
    sampling.backward(&mut rec).unwrap();
    let err = g.check().unwrap_err().to_string();
    assert!(err.contains("has no storage"), "{err}");
    drop(training);
}

/// A subgroup-path device whose textures are capped at 256 texels a side, or None on an adapter
/// without the subgroup path (nothing is packed there).
fn small_texture_gpu() -> Option<std::sync::Arc<wgpu_diffusion::gpu::Gpu>> {
    use wgpu_diffusion::gpu::{GemmPathChoice, Gpu, GpuOptions};
    if gemm_paths().len() < 2 {
        return None;
    }
    let options = GpuOptions {
        gemm_path: Some(GemmPathChoice::Subgroup),
        cap_texture: Some(256),
        ..Default::default()
    };
    Some(Gpu::new(&options).unwrap())
}

/// Records conv `c`'s forward and backward-input (inputs drawn from `seed`), checks that
/// neither fell back to the portable kernel and both equal the f64 reference (tests/gpu/
/// conv2d.rs's tolerances), and returns the plan.
fn folded_conv_matches_reference(
    g: &std::sync::Arc<wgpu_diffusion::gpu::Gpu>,
    c: &Conv,
    seed: u64,
    what: &str,
) -> Plan {
    use wgpu_diffusion::ops::conv2d::conv2d_backward_input;
    let (oh, ow) = (c.out_h(), c.out_w());
    let x = random(c.n * c.h * c.w * c.ci, seed);
    let w = random(c.co * c.ci * c.kh * c.kw, seed + 1);
    let dy = random(c.n * oh * ow * c.co, seed + 2);
    let xt = upload(g, &[c.n, c.h, c.w, c.ci], &x, "x");
    let wt = upload(g, &[c.co, c.ci, c.kh, c.kw], &w, "w");
    let dyt = upload(g, &[c.n, oh, ow, c.co], &dy, "dy");
    let y = g.tensor(&[c.n, oh, ow, c.co], "y");
    let dx = g.tensor(&[c.n, c.h, c.w, c.ci], "dx");
    let geometry = conv_geometry(c);
    let plan = run(g, |rec| {
        conv2d_forward(rec, &xt, &wt, None, &y, &geometry).unwrap();
        conv2d_backward_input(rec, &dyt, &wt, &dx, &geometry, false).unwrap();
    });
    g.check().unwrap();
    let portable = plan.records().iter().filter(|r| r.shader == "gemm").count();
    assert_eq!(
        portable, 0,
        "{what}: a conv fell back to the portable kernel"
    );
    let want = c.forward(&x, &w, None);
    let tol = 1e-5 * max_abs(&want);
    assert_close(&format!("{what}: forward"), &read(g, &y), &want, tol, 1e-4);
    let (want_dx, _, _) = c.backward(&x, &w, &dy);
    let tol = 1e-5 * max_abs(&want_dx);
    assert_close(&format!("{what}: dx"), &read(g, &dx), &want_dx, tol, 1e-4);
    plan
}

fn conv3x3(
    n: usize,
    h: usize,
    w: usize,
    ci: usize,
    co: usize,
    stride: usize,
    pad: [usize; 4],
) -> Conv {
    Conv {
        n,
        h,
        w,
        ci,
        co,
        kh: 3,
        kw: 3,
        stride,
        pad,
    }
}

/// Conv weights whose packed matrix is taller than a texture (SD 1.5's 2560-channel 3×3 convs:
/// 23040 rows against lavapipe's 16384) are folded into column blocks of whole taps and stay on
/// the subgroup kernels: with textures capped at 256 rows, 64 channels × 9 taps (576 rows) fold
/// into 3 blocks of 4 taps. Forward and backward-input against the reference.
#[test]
fn conv_weights_taller_than_a_texture_fold_at_whole_taps() {
    let Some(g) = small_texture_gpu() else {
        return;
    };
    let c = conv3x3(2, 7, 8, 64, 64, 1, [1; 4]);
    folded_conv_matches_reference(&g, &c, 120, "folded weights");
}

/// NHWC activations whose image rows are wider than a texture (SD's VAE decoder at 512²:
/// 512 pixels × 64 texels = 32768 against lavapipe's 16384) fold each row into parts of a
/// power-of-two number of pixels and stay on the subgroup kernels. Textures capped at 256
/// texels: (a) 37 pixels × 30 channels (8 texels each) fold into 2 rows of 32 pixels, the last
/// part partial, packed by the kernel (channels not a multiple of 4), and its backward-input
/// reads dY (37 × 64 channels) folded into 3 parts with the weights folded at whole taps too;
/// (b) 48 pixels × 64 channels fold into 3 whole parts, which a plain buffer-to-texture copy
/// packs, under a stride-2 conv with asymmetric padding. Against the f64 reference.
#[test]
fn activation_rows_wider_than_a_texture_fold_into_parts() {
    let Some(g) = small_texture_gpu() else {
        return;
    };
    let cases = [
        (conv3x3(2, 5, 37, 30, 64, 1, [1; 4]), true),
        (conv3x3(2, 9, 48, 64, 8, 2, [0, 0, 1, 1]), false),
    ];
    for (i, (c, by_kernel)) in cases.iter().enumerate() {
        let what = format!("folded rows, case {i}");
        let plan = folded_conv_matches_reference(&g, c, 130 + 10 * i as u64, &what);
        let packed_by_kernel = dispatches(&plan, "pack_nhwc") > 0;
        assert_eq!(packed_by_kernel, *by_kernel, "{what}: pack kernel or copy");
    }
}
