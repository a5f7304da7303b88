//! Reference for `shaders/layer_norm.wgsl`: torch.nn.LayerNorm(C) on x [rows, C].
//!
//! Per row: mean, biased variance, rstd = 1/sqrt(var + eps), y = (x − mean)·rstd·γ + β.
//! Backward with x̂ = (x − mean)·rstd, dx̂ = dy·γ:
//! dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)), dγ = Σ_rows dy·x̂, dβ = Σ_rows dy.

/// (y, per-row (mean, rstd)).
pub fn layer_norm_forward(
    x: &[f64],
    cols: usize,
    gamma: &[f64],
    beta: &[f64],
    eps: f64,
) -> (Vec<f64>, Vec<(f64, f64)>) {
    let mut y = Vec::with_capacity(x.len());
    let mut stats = Vec::new();
    for row in x.chunks(cols) {
        let mean = row.iter().sum::<f64>() / cols as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / cols as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        y.extend(
            row.iter()
                .enumerate()
                .map(|(c, v)| (v - mean) * rstd * gamma[c] + beta[c]),
        );
        stats.push((mean, rstd));
    }
    (y, stats)
}

/// (dx, dγ, dβ).
pub fn layer_norm_backward(
    x: &[f64],
    cols: usize,
    gamma: &[f64],
    stats: &[(f64, f64)],
    dy: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut dx = Vec::with_capacity(x.len());
    let (mut dgamma, mut dbeta) = (vec![0.0; cols], vec![0.0; cols]);
    for ((row, g), &(mean, rstd)) in x.chunks(cols).zip(dy.chunks(cols)).zip(stats) {
        let xhat: Vec<f64> = row.iter().map(|v| (v - mean) * rstd).collect();
        let dxhat: Vec<f64> = g.iter().zip(gamma).map(|(d, w)| d * w).collect();
        let m1 = dxhat.iter().sum::<f64>() / cols as f64;
        let m2 = dxhat.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / cols as f64;
        for c in 0..cols {
            dx.push(rstd * (dxhat[c] - m1 - xhat[c] * m2));
            dgamma[c] += g[c] * xhat[c];
            dbeta[c] += g[c];
        }
    }
    (dx, dgamma, dbeta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{assert_gradients_match, numeric_gradient, test_data};

    /// The backward against central differences of L = Σ y·w (w fixed random weights) for x, γ
    /// and β, on a 3×7 input with an offset mean.
    #[test]
    fn backward_matches_finite_differences() {
        let (rows, cols, eps) = (3, 7, 1e-5);
        let x: Vec<f64> = test_data(rows * cols, 1).iter().map(|v| 2.0 + v).collect();
        let gamma: Vec<f64> = test_data(cols, 2).iter().map(|v| 1.0 + 0.5 * v).collect();
        let beta = test_data(cols, 3);
        let w = test_data(rows * cols, 4);
        let loss = |x: &[f64], g: &[f64], b: &[f64]| -> f64 {
            let (y, _) = layer_norm_forward(x, cols, g, b, eps);
            y.iter().zip(&w).map(|(a, b)| a * b).sum()
        };
        let (_, stats) = layer_norm_forward(&x, cols, &gamma, &beta, eps);
        let (dx, dgamma, dbeta) = layer_norm_backward(&x, cols, &gamma, &stats, &w);
        let h = 1e-6;
        let nx = numeric_gradient(&x, h, |v| loss(v, &gamma, &beta));
        let ng = numeric_gradient(&gamma, h, |v| loss(&x, v, &beta));
        let nb = numeric_gradient(&beta, h, |v| loss(&x, &gamma, v));
        assert_gradients_match("dx", &dx, &nx, 1e-6);
        assert_gradients_match("dgamma", &dgamma, &ng, 1e-6);
        assert_gradients_match("dbeta", &dbeta, &nb, 1e-6);
    }

    #[test]
    fn rows_are_normalized() {
        let x = test_data(40, 5);
        let (y, _) = layer_norm_forward(&x, 8, &[1.0; 8], &[0.0; 8], 0.0);
        for row in y.chunks(8) {
            let mean = row.iter().sum::<f64>() / 8.0;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / 8.0;
            assert!(
                mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-9,
                "{mean} {var}"
            );
        }
    }
}
