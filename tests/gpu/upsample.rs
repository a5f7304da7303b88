//! upsample.wgsl against reference::upsample. The forward copies values: exact (0 tolerance).
//! The backward adds 4 f32 values in a fixed order: 3 roundings of partial sums bounded by
//! 4 max|dy|, so |err| <= 3 * 2^-24 * 4 max|dy| < 1e-6 max|dy|; atol 1e-6 * max|dy|, rtol 1e-6.

use crate::common::*;
use wgpu_diffusion::ops::upsample as up;
use wgpu_diffusion::reference::upsample as r;

#[test]
fn forward_backward_match_reference() {
    let g = gpu();
    for (i, &(n, h, w, c)) in [
        (1, 1, 1, 1),
        (2, 3, 5, 7),
        (1, 7, 3, 33),
        (3, 8, 8, 64),
        (1, 33, 33, 3),
        // C a multiple of 4: the vec4 kernels
        (2, 3, 5, 12),
        (1, 1, 70, 4),
    ]
    .iter()
    .enumerate()
    {
        let what = format!("{n}x{h}x{w}x{c}");
        let x = random(n * h * w * c, 400 + i as u64);
        let dy = random(n * h * w * c * 4, 500 + i as u64);
        let (small, big) = ([n, h, w, c], [n, 2 * h, 2 * w, c]);
        let (tx, tdy) = (upload(&g, &small, &x, "x"), upload(&g, &big, &dy, "dy"));
        let (ty, tdx) = (g.tensor(&big, "y"), g.tensor(&small, "dx"));
        run(&g, |rec| {
            up::upsample_nearest2x_forward(rec, &tx, &ty).unwrap();
            up::upsample_nearest2x_backward(rec, &tdy, &tdx).unwrap();
        });
        assert_close(
            &format!("upsample forward {what}"),
            &read(&g, &ty),
            &r::upsample_nearest2x_forward(&x, n, h, w, c),
            0.0,
            0.0,
        );
        let dx = r::upsample_nearest2x_backward(&dy, n, h, w, c);
        assert_close(
            &format!("upsample backward {what}"),
            &read(&g, &tdx),
            &dx,
            1e-6 * max_abs(&dy),
            1e-6,
        );
    }
}

#[test]
fn invalid_shapes_are_errors() {
    let g = gpu();
    let x = g.tensor(&[1, 2, 3, 4], "x");
    let mut rec = g.recorder();
    let e = up::upsample_nearest2x_forward(&mut rec, &x, &g.tensor(&[1, 4, 4, 4], "y"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("upsample_nearest2x_forward") && e.contains("`y`") && e.contains("[1, 4, 6, 4]"),
        "{e}"
    );
    let e = up::upsample_nearest2x_backward(
        &mut rec,
        &g.tensor(&[1, 4, 6, 4], "dy"),
        &g.tensor(&[2, 3, 4], "dx"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("rank 4"), "{e}");
    let big = g.tensor(&[1, 4, 6, 4], "big");
    let e = up::upsample_nearest2x_backward(&mut rec, &big, &big.view(0, &[1, 2, 3, 4], "alias"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("share a buffer"), "{e}");
    assert!(rec.is_empty());
}

/// Bicubic upsampling (×2, ×4) and average pooling against the f64 reference, itself checked
/// against torch's values (reference::upsample). 16 taps of f32 products: rtol/atol 1e-5.
#[test]
fn bicubic_and_avg_pool_match_reference() {
    let g = gpu();
    for (n, h, w, c) in [(1, 1, 1, 1), (2, 3, 5, 1), (3, 7, 7, 3)] {
        for k in [2usize, 4] {
            let x = random(n * h * w * c, (n * h * w * c * k) as u64);
            let small = upload(&g, &[n, h, w, c], &x, "small");
            let big = g.tensor(&[n, k * h, k * w, c], "big");
            let bigx = random(n * k * h * k * w * c, 77 + k as u64);
            let big_in = upload(&g, &[n, k * h, k * w, c], &bigx, "big in");
            let pooled = g.tensor(&[n, h, w, c], "pooled");
            run(&g, |rec| {
                up::upsample_bicubic_forward(rec, &small, k, &big).unwrap();
                up::avg_pool_forward(rec, &big_in, k, &pooled).unwrap();
            });
            let what = format!("{n}x{h}x{w}x{c} k{k}");
            assert_close(
                &format!("bicubic {what}"),
                &read(&g, &big),
                &wgpu_diffusion::reference::upsample::upsample_bicubic(&x, [n, h, w, c], k),
                1e-5,
                1e-5,
            );
            assert_close(
                &format!("avg_pool {what}"),
                &read(&g, &pooled),
                &wgpu_diffusion::reference::upsample::avg_pool(&bigx, [n, h, w, c], k),
                1e-6,
                1e-6,
            );
        }
    }
}
