//! softmax.wgsl (portable) and softmax_subgroup.wgsl against reference::softmax.
//!
//! Forward: each y is one f32 exp (a few ulp on lavapipe/LLVM), one subtraction x - max (exact
//! or 0.5 ulp of |x - max| <= ~60, i.e. <= 4e-6 relative in exp) and a divide by an f32 sum of
//! <= 1024 terms in [0, 1] (relative error ~1e-6): rtol 2e-5, atol 1e-6 * max|ref|.
//! Backward: dx = y (dy - sum dy*y) cancels when dy_i ~ sum, so errors are relative to the row's
//! scale, not to dx_i: rtol 1e-4, atol 1e-5 * max|ref| (the brief's bound for f32 reductions).
//! Observed on lavapipe: max |err| <= 1.8e-7 * max|ref| for both.

use crate::common::*;
use wgpu_diffusion::ops::softmax as sm;
use wgpu_diffusion::reference::softmax as r;

/// (rows, len, input scale): odd lengths, rows over the 65535 workgroup limit, long rows, and
/// large logits that would overflow exp without the max subtraction.
const CASES: [(usize, usize, f64); 9] = [
    (1, 1, 1.0),
    (3, 7, 4.0),
    (33, 33, 4.0),
    (5, 1024, 8.0),
    (70_001, 3, 4.0),
    (2, 1000, 60.0),
    (7, 65, 100.0),
    (101, 16, 4.0),
    // a 14 x 14 attention's rows (whole texels: the subgroup path's vec4 kernels)
    (9, 196, 8.0),
];

#[test]
fn forward_backward_match_reference() {
    for g in gemm_paths() {
        forward_backward_on(&g);
    }
}

fn forward_backward_on(g: &std::sync::Arc<wgpu_diffusion::gpu::Gpu>) {
    for (i, &(rows, len, scale)) in CASES.iter().enumerate() {
        let what = format!("{} {rows}x{len} scale {scale}", g.gemm_path);
        let x: Vec<f64> = f32_round(
            &test_data(rows * len, 200 + i as u64)
                .iter()
                .map(|v| scale * v)
                .collect::<Vec<_>>(),
        );
        let dy = random(rows * len, 300 + i as u64);
        let (tx, tdy) = (
            upload(g, &[rows, len], &x, "x"),
            upload(g, &[rows, len], &dy, "dy"),
        );
        let (ty, tdx) = (g.tensor(&[rows, len], "y"), g.tensor(&[rows, len], "dx"));
        run(g, |rec| {
            sm::softmax_forward(rec, &tx, &ty).unwrap();
            sm::softmax_backward(rec, &ty, &tdy, &tdx).unwrap();
        });
        let y = r::softmax_forward(&x, len);
        assert_close(
            &format!("softmax_forward {what}"),
            &read(g, &ty),
            &y,
            1e-6 * max_abs(&y),
            2e-5,
        );
        // The backward is checked on the GPU's own y (rounded to f32), isolating its error.
        let y_gpu: Vec<f64> = read(g, &ty).iter().map(|&v| v as f64).collect();
        let dx = r::softmax_backward(&y_gpu, &dy, len);
        assert_close(
            &format!("softmax_backward {what}"),
            &read(g, &tdx),
            &dx,
            1e-5 * max_abs(&dx),
            1e-4,
        );
    }
}

#[test]
fn invalid_shapes_are_errors() {
    let g = gpu();
    let (a, b) = (g.tensor(&[3, 4], "a"), g.tensor(&[4, 3], "b"));
    let mut rec = g.recorder();
    let e = sm::softmax_forward(&mut rec, &a, &b)
        .unwrap_err()
        .to_string();
    assert!(e.contains("softmax_forward") && e.contains("`y`"), "{e}");
    let e = sm::softmax_forward(&mut rec, &a, &a)
        .unwrap_err()
        .to_string();
    assert!(e.contains("share a buffer"), "{e}");
    let e = sm::softmax_backward(&mut rec, &a, &b, &g.tensor(&[3, 4], "dx"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("softmax_backward") && e.contains("`dy`"), "{e}");
    let e = sm::softmax_forward(&mut rec, &g.tensor(&[3, 0], "e"), &g.tensor(&[3, 0], "f"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty"), "{e}");
    assert!(rec.is_empty());
}
