//! reduce.wgsl against f64 sums: slice sums (split-K partials), column sums (bias gradients, in
//! one or two stages) and per-sample pixel sums (time-embedding gradients), with and without
//! accumulation, at widths that take the one-column and the 4-column (`sum_slices4`) kernels.
//! Each output is a fixed-order f32 sum of at most a few hundred terms: atol 1e-5 · Σ|terms|.

use crate::common::*;
use wgpu_diffusion::ops::reduce;

fn close(what: &str, got: &[f32], want: &[f64], scale: f64) {
    assert_close(what, got, want, 1e-5 * scale, 1e-5);
}

#[test]
fn slice_row_and_pixel_sums_match_f64() {
    let g = gpu();
    // (slices or rows, columns): odd widths take the scalar kernel, multiples of 4 the texels.
    for (i, &(rows, cols)) in [(3, 7), (5, 64), (300, 12), (300, 5), (129, 16)]
        .iter()
        .enumerate()
    {
        let seed = 600 + 10 * i as u64;
        let m = random(rows * cols, seed);
        let prior = random(cols, seed + 1);
        let tm = upload(&g, &[rows, cols], &m, "m");
        let (t_slices, t_rows) = (g.tensor(&[cols], "slices"), g.tensor(&[cols], "rows"));
        let t_acc = upload(&g, &[cols], &prior, "rows acc");
        run(&g, |rec| {
            reduce::sum_slices(rec, &tm, rows, cols, cols, &t_slices, false).unwrap();
            reduce::sum_rows(rec, &tm, rows, cols, &t_rows, false).unwrap();
            reduce::sum_rows(rec, &tm, rows, cols, &t_acc, true).unwrap();
        });
        let col = |c: usize| (0..rows).map(|r| m[r * cols + c]).sum::<f64>();
        let want: Vec<f64> = (0..cols).map(col).collect();
        let acc: Vec<f64> = want.iter().zip(&prior).map(|(a, b)| a + b).collect();
        let scale = rows as f64 + 1.0;
        let what = format!("{rows}x{cols}");
        close(
            &format!("sum_slices {what}"),
            &read(&g, &t_slices),
            &want,
            scale,
        );
        close(
            &format!("sum_rows {what}"),
            &read(&g, &t_rows),
            &want,
            scale,
        );
        close(
            &format!("sum_rows accumulate {what}"),
            &read(&g, &t_acc),
            &acc,
            scale,
        );
    }
    for (i, &(n, h, w, c)) in [(2, 3, 5, 12), (3, 4, 4, 5), (1, 7, 7, 64)]
        .iter()
        .enumerate()
    {
        let seed = 700 + 10 * i as u64;
        let x = random(n * h * w * c, seed);
        let prior = random(n * c, seed + 1);
        let tx = upload(&g, &[n, h, w, c], &x, "h");
        let tout = g.tensor(&[n, c], "per sample");
        let tacc = upload(&g, &[n, c], &prior, "per sample acc");
        run(&g, |rec| {
            reduce::sum_pixels_per_sample(rec, &tx, &tout, false).unwrap();
            reduce::sum_pixels_per_sample(rec, &tx, &tacc, true).unwrap();
        });
        let px = h * w;
        let want: Vec<f64> = (0..n * c)
            .map(|nc| {
                let (s, ch) = (nc / c, nc % c);
                (0..px).map(|q| x[(s * px + q) * c + ch]).sum::<f64>()
            })
            .collect();
        let acc: Vec<f64> = want.iter().zip(&prior).map(|(a, b)| a + b).collect();
        let what = format!("{n}x{h}x{w}x{c}");
        let scale = px as f64 + 1.0;
        close(
            &format!("sum_pixels_per_sample {what}"),
            &read(&g, &tout),
            &want,
            scale,
        );
        close(
            &format!("sum_pixels_per_sample accumulate {what}"),
            &read(&g, &tacc),
            &acc,
            scale,
        );
    }
}
