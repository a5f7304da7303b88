//! Half-precision GEMM and conv operands (`Precision::F16`: the subgroup path's `rgba16float`
//! packs and f16-rounded buffer reads, the portable path's rounding loads) on both paths,
//! against the f64 reference on operands rounded to f16: what torch.autocast(dtype=float16) computes on a GPU (f16 inputs, f32 accumulation). With the
//! rounding in the reference the tolerance is the f32 one of the GEMM and conv tests (rtol 1e-4,
//! atol 1e-5·max|ref|); against the unrounded reference the same results differ several times
//! more, so the rounding is really done.

use crate::common::*;
use wgpu_diffusion::ops::conv2d::{conv2d_backward_input, conv2d_backward_weight, conv2d_forward};
use wgpu_diffusion::ops::gemm::{GemmShape, MatRef, gemm, linear_backward};
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

/// Σ over the rows of a row-major [rows, cols] matrix, per column.
fn column_sums(m: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    (0..cols)
        .map(|c| (0..rows).map(|r| m[r * cols + c]).sum())
        .collect()
}

/// A bias gradient with half-precision operands is Σ f16(dY), the sum of the same rounded dY
/// the weight gradient's GEMM reads (torch.autocast's f16 dY), the sum in f32: a Linear's over
/// short and long (two-stage) row counts, a conv's from its own pass (`sum_rows`) and fused into
/// the subgroup backward-weight kernel (the bias stored right after the weights, as in the
/// parameter store).
#[test]
fn bias_gradients_with_half_operands_sum_the_f16_rounded_dy() {
    for g in half_gpus() {
        for (rows, fin, fout) in [(40, 12, 9), (300, 8, 20)] {
            let x = random(rows * fin, 60);
            let w = random(fout * fin, 61);
            let dy = random(rows * fout, 62);
            let tx = upload(&g, &[rows, fin], &x, "x");
            let tw = upload(&g, &[fout, fin], &w, "w");
            let tdy = upload(&g, &[rows, fout], &dy, "dy");
            let (tdw, tdb) = (g.tensor(&[fout, fin], "dw"), g.tensor(&[fout], "db"));
            run(&g, |rec| {
                linear_backward(rec, &tx, &tw, &tdy, None, &tdw, Some(&tdb), false).unwrap()
            });
            check(
                &format!("half linear bias gradient {} rows={rows}", g.gemm_path),
                &read(&g, &tdb),
                &column_sums(&f16_round(&dy), rows, fout),
                &column_sums(&dy, rows, fout),
            );
        }
        let c = Conv {
            n: 2,
            h: 9,
            w: 7,
            ci: 8,
            co: 12,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: [1; 4],
        };
        let (oh, ow) = (c.out_h(), c.out_w());
        let x = random(c.n * c.h * c.w * c.ci, 63);
        let dy = random(c.n * oh * ow * c.co, 64);
        let tx = upload(&g, &[c.n, c.h, c.w, c.ci], &x, "x");
        let tdy = upload(&g, &[c.n, oh, ow, c.co], &dy, "dy");
        let numel = c.co * c.ci * c.kh * c.kw;
        let bias_at = numel.next_multiple_of(64);
        let store = g.tensor(&[bias_at + c.co], "dw and db");
        let tdw = store.view(0, &[c.co, c.ci, c.kh, c.kw], "dw");
        let beside = store.view(bias_at, &[c.co], "db beside dw");
        let apart = g.tensor(&[c.co], "db");
        let geo = conv_geometry(&c);
        let (_, _, db_h) = c.backward(&f16_round(&x), &vec![0.0; numel], &f16_round(&dy));
        let (_, _, db) = c.backward(&x, &vec![0.0; numel], &dy);
        for db_t in [&beside, &apart] {
            run(&g, |rec| {
                conv2d_backward_weight(rec, &tx, &tdy, &tdw, Some(db_t), &geo, false).unwrap()
            });
            check(
                &format!("half conv bias gradient {} ({})", g.gemm_path, db_t.label()),
                &read(&g, db_t),
                &db_h,
                &db,
            );
        }
    }
}

/// The time-embedding MLP (`time_embedding.linear_1/linear_2`) keeps f32 operands in a
/// half-precision U-Net (issue 21): its output equals the f32 run's bit for bit, while the first
/// convolution's, on f16 operands, does not.
#[test]
fn the_time_embedding_mlp_keeps_f32_operands_in_a_half_precision_unet() {
    let config = wgpu_diffusion::nn::UNetConfig::preset("tiny16").unwrap();
    for (g32, g16) in gemm_paths().iter().zip(half_gpus()) {
        let [full, half] = [g32, &g16].map(|g| {
            let unet = wgpu_diffusion::nn::UNet::new(g, &config, 3).unwrap();
            let flat: Vec<f32> = random(unet.params.len, 70)
                .iter()
                .map(|&v| 0.2 * v as f32)
                .collect();
            unet.params.write_values(g, &flat).unwrap();
            g.write(&unet.timesteps, &[3.0, 500.0, 999.0]).unwrap();
            let x = random(unet.sample.value.numel(), 71);
            g.write(
                &unet.sample.value,
                &x.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            )
            .unwrap();
            run(g, |rec| unet.forward(rec).unwrap());
            let act = |name: &str| {
                let (_, t) = unet
                    .activations()
                    .into_iter()
                    .find(|(n, _)| n == name)
                    .unwrap();
                read(g, &t)
            };
            (act("time_embedding"), act("conv_in"))
        });
        let path = &g16.gemm_path;
        assert_eq!(
            full.0, half.0,
            "time embedding on the {path} path: half-precision operands reached the MLP"
        );
        assert_ne!(
            full.1, half.1,
            "conv_in on the {path} path: operands not rounded"
        );
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
