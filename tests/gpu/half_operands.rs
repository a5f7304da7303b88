//! Half-precision GEMM and conv operands (`Precision::F16`: the subgroup path's `rgba16float`
//! packs and f16-rounded buffer reads, the portable path's rounding loads) on both paths,
//! against the f64 reference on operands rounded to f16: what torch.autocast(dtype=float16) computes on a GPU (f16 inputs, f32 accumulation). With the
//! rounding in the reference the tolerance is the f32 one of the GEMM and conv tests (rtol 1e-4,
//! atol 1e-5·max|ref|); against the unrounded reference the same results differ several times
//! more, so the rounding is really done.

use crate::common::*;
use wgpu_diffusion::ops::conv2d::{conv2d_backward_input, conv2d_backward_weight, conv2d_forward};
use wgpu_diffusion::ops::gemm::{GemmShape, MatRef, gemm};
use wgpu_diffusion::reference::conv2d::Conv;
use wgpu_diffusion::reference::gemm as r;

fn max_diff(got: &[f32], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max)
}

/// `got` matches `rounded` (the reference on f16 operands) at f32 tolerance and differs from
/// `exact` (the reference on the f32 operands) by more.
fn check(what: &str, got: &[f32], rounded: &[f64], exact: &[f64]) {
    assert_close(what, got, rounded, 1e-5 * max_abs(rounded), 1e-4);
    let (to_rounded, to_exact) = (max_diff(got, rounded), max_diff(got, exact));
    assert!(
        to_exact > 4.0 * to_rounded,
        "{what}: max |diff| {to_exact:e} to the f32-operand reference is not well above {to_rounded:e} to the f16 one: were the operands rounded?"
    );
}

#[test]
fn gemm_with_half_operands_is_the_gemm_of_f16_rounded_inputs() {
    for g in half_gpus() {
        // A packed (k % 4 != 0), A read from its buffer (k % 4 == 0), A transposed in place, and
        // a transposed B.
        for &(m, n, k, ta, tb) in &[
            (37, 29, 53, false, false),
            (12, 16, 8, false, false),
            (33, 17, 72, true, false),
            (10, 34, 12, false, true),
        ] {
            let a = random(m * k, 1);
            let b = random(k * n, 2);
            let (lda, ldb) = (if ta { m } else { k }, if tb { k } else { n });
            let ta_t = upload(&g, &[m * k], &a, "A");
            let tb_t = upload(&g, &[k * n], &b, "B");
            let tc = g.tensor(&[m * n], "C");
            let amat = MatRef {
                trans: ta,
                ..MatRef::dense(&ta_t, lda)
            };
            let bmat = MatRef {
                trans: tb,
                ..MatRef::dense(&tb_t, ldb)
            };
            run(&g, |rec| {
                gemm(
                    rec,
                    GemmShape::new(m, n, k),
                    amat,
                    bmat,
                    None,
                    MatRef::dense(&tc, n),
                )
                .unwrap()
            });
            let reference = |a: &[f64], b: &[f64]| {
                let mut c = vec![0.0; m * n];
                r::gemm(m, n, k, 1.0, a, lda, ta, b, ldb, tb, 0.0, &mut c, n);
                c
            };
            check(
                &format!(
                    "half gemm {} m={m} n={n} k={k} ta={ta} tb={tb}",
                    g.gemm_path
                ),
                &read(&g, &tc),
                &reference(&f16_round(&a), &f16_round(&b)),
                &reference(&a, &b),
            );
        }
    }
}

#[test]
fn conv_passes_with_half_operands_are_those_of_f16_rounded_inputs() {
    for g in half_gpus() {
        for (i, c) in [
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
                h: 10,
                w: 7,
                ci: 8,
                co: 20,
                kh: 3,
                kw: 3,
                stride: 2,
                pad: [0, 0, 1, 1],
            },
        ]
        .iter()
        .enumerate()
        {
            let (oh, ow) = (c.out_h(), c.out_w());
            let x = random(c.n * c.h * c.w * c.ci, 10 + i as u64);
            let w = random(c.co * c.ci * c.kh * c.kw, 20 + i as u64);
            let dy = random(c.n * oh * ow * c.co, 40 + i as u64);
            let tx = upload(&g, &[c.n, c.h, c.w, c.ci], &x, "x");
            let tw = upload(&g, &[c.co, c.ci, c.kh, c.kw], &w, "w");
            let tdy = upload(&g, &[c.n, oh, ow, c.co], &dy, "dy");
            let ty = g.tensor(&[c.n, oh, ow, c.co], "y");
            let tdx = g.tensor(&[c.n, c.h, c.w, c.ci], "dx");
            let tdw = g.tensor(&[c.co, c.ci, c.kh, c.kw], "dw");
            let geo = conv_geometry(c);
            run(&g, |rec| {
                conv2d_forward(rec, &tx, &tw, None, &ty, &geo).unwrap();
                conv2d_backward_input(rec, &tdy, &tw, &tdx, &geo, false).unwrap();
                conv2d_backward_weight(rec, &tx, &tdy, &tdw, None, &geo, false).unwrap();
            });
            let (xh, wh, dyh) = (f16_round(&x), f16_round(&w), f16_round(&dy));
            let what = format!("{} {c:?}", g.gemm_path);
            check(
                &format!("half conv forward {what}"),
                &read(&g, &ty),
                &c.forward(&xh, &wh, None),
                &c.forward(&x, &w, None),
            );
            let (dx_h, dw_h, _) = c.backward(&xh, &wh, &dyh);
            let (dx, dw, _) = c.backward(&x, &w, &dy);
            check(
                &format!("half conv backward_input {what}"),
                &read(&g, &tdx),
                &dx_h,
                &dx,
            );
            check(
                &format!("half conv backward_weight {what}"),
                &read(&g, &tdw),
                &dw_h,
                &dw,
            );
        }
    }
}

/// The rounding itself, through both ways an operand reaches the kernel (a packed texture, and
/// a buffer read in place): C = A · e₀ must be A rounded to f16 exactly, ties to even, down to
/// f16's subnormals and to ±inf past its range (lavapipe's own rgba16float conversion
/// truncates; the kernels round first).
#[test]
fn operands_round_to_the_nearest_f16_ties_to_even() {
    for g in half_gpus() {
        let values: Vec<f64> = vec![
            1.0 + 2f64.powi(-11),                     // a tie: down to 1 (even)
            1.0 + 3.0 * 2f64.powi(-11),               // a tie: up to 1 + 2^-9 (even)
            -(1.0 + 2f64.powi(-11) + 2f64.powi(-20)), // past the tie: away from 1
            0.1,
            -3.3e-5,  // subnormal in f16: a multiple of 2^-24
            7.0e-8,   // rounds to 2^-24
            2.0e-8,   // rounds to 0
            65504.0,  // f16's largest
            65519.0,  // below the halfway point to 65536: 65504
            -65520.0, // the halfway point: -inf, as torch's .half()
            1.0e6,    // inf
            1.2345678e3,
            -0.33333334,
            6.103515625e-5, // f16's smallest normal
            1.0e-3,
        ];
        let want = f16_round(&values);
        let m = values.len();
        for k in [1usize, 4] {
            // k = 1: A is packed (rows of less than a texel); k = 4: A is read in place.
            let mut a = vec![0.0; m * k];
            for (i, v) in values.iter().enumerate() {
                a[i * k] = *v;
                if k == 4 {
                    a[i * k + 1] = 0.5; // times B's zeros
                }
            }
            let mut b = vec![0.0; k];
            b[0] = 1.0;
            let ta = upload(&g, &[m * k], &a, "A");
            let tb = upload(&g, &[k], &b, "B");
            let tc = g.tensor(&[m], "C");
            run(&g, |rec| {
                gemm(
                    rec,
                    GemmShape::new(m, 1, k),
                    MatRef::dense(&ta, k),
                    MatRef::dense(&tb, 1),
                    None,
                    MatRef::dense(&tc, 1),
                )
                .unwrap()
            });
            let got = read(&g, &tc);
            for (i, (g32, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    *g32 as f64, *w,
                    "{} k={k}: {} became {g32:e}, f16 rounding gives {w:e}",
                    g.gemm_path, values[i]
                );
            }
        }
    }
}

/// A tiny16 run in f16 (half operands and the GradScaler, as `train --precision f16` runs) on
/// one fixed batch learns as the f32 run from the same weights does: its loss falls as far and
/// ends within 5 % of the f32 run's.
#[test]
fn a_half_precision_run_on_a_fixed_batch_learns_as_the_f32_run_does() {
    use wgpu_diffusion::nn::UNetConfig;
    use wgpu_diffusion::nn::init::default_init;
    use wgpu_diffusion::train::{TrainConfig, Trainer};
    const STEPS: u64 = 24;
    // The subgroup path (the one lavapipe runs; a portable-path step is several times slower,
    // and its rounding loads are covered by the kernel tests above).
    let pairs = half_gpus().into_iter().zip(gemm_paths());
    for (g16, g32) in pairs.filter(|(g, _)| g.gemm_path != wgpu_diffusion::gpu::GemmPath::Portable)
    {
        let model = UNetConfig::preset("tiny16").unwrap();
        let losses = |g: &std::sync::Arc<wgpu_diffusion::gpu::Gpu>, f16: bool| -> Vec<f32> {
            let cfg = TrainConfig {
                batch_size: 8,
                lr: 2e-3,
                lr_warmup_steps: 2,
                log_every: STEPS,
                grad_scaler: f16,
                ..Default::default()
            };
            let mut t = Trainer::new(g.clone(), cfg, &model).unwrap();
            t.set_weights(&default_init(&t.unet.params, 0)).unwrap();
            let n: usize = t.unet.output.shape().iter().product();
            let batch: Vec<f32> = random(n, 7).iter().map(|&v| v as f32).collect();
            for _ in 0..STEPS {
                t.submit_step(std::slice::from_ref(&batch), &[]).unwrap();
            }
            let (ready, submission) = t.request_losses();
            for index in [Some(submission), None] {
                g.device
                    .poll(wgpu::PollType::Wait {
                        submission_index: index,
                        timeout: None,
                    })
                    .unwrap();
            }
            assert!(ready.load(std::sync::atomic::Ordering::Acquire));
            t.read_losses().unwrap().iter().map(|l| l.loss).collect()
        };
        let (half, full) = (losses(&g16, true), losses(&g32, false));
        let tail = |l: &[f32]| l[l.len() - 6..].iter().sum::<f32>() / 6.0;
        let what = format!("{}: f16 losses {half:?}, f32 {full:?}", g16.gemm_path);
        assert!(tail(&half) < 0.6 * half[0], "the f16 loss falls: {what}");
        let gap = (tail(&half) - tail(&full)).abs() / tail(&full);
        assert!(gap < 0.05, "last losses {gap:.3} apart: {what}");
        assert!(
            half.iter().zip(&full).any(|(a, b)| a != b),
            "f16 changed nothing: {what}"
        );
    }
}
