//! Reference for `shaders/group_norm.wgsl`: torch.nn.GroupNorm on NHWC `x` [N, pixels, C].
//!
//! mean/var over the pixels * C/G elements of each (n, g) (biased variance), rstd =
//! 1/sqrt(var + eps), y = (x - mean) rstd gamma[c] + beta[c]. Backward, with xhat = (x - mean) rstd
//! and dxhat = dy gamma[c], M the group size:
//! dx = rstd (dxhat - mean_group(dxhat) - xhat mean_group(dxhat xhat)),
//! dgamma[c] = sum_{n,q} dy xhat, dbeta[c] = sum_{n,q} dy.

/// Saved statistics, indexed n * G + g.
#[derive(Clone, Debug)]
pub struct GroupNormStats {
    pub mean: Vec<f64>,
    pub rstd: Vec<f64>,
}

fn group_of(c: usize, channels: usize, groups: usize) -> usize {
    c / (channels / groups)
}

/// Returns (y, stats).
#[allow(clippy::too_many_arguments)]
pub fn group_norm_forward(
    x: &[f64],
    n: usize,
    pixels: usize,
    channels: usize,
    groups: usize,
    gamma: &[f64],
    beta: &[f64],
    eps: f64,
) -> (Vec<f64>, GroupNormStats) {
    assert_eq!(x.len(), n * pixels * channels);
    assert_eq!(channels % groups, 0);
    let count = (pixels * channels / groups) as f64;
    let mut sum = vec![0.0; n * groups];
    for (i, &v) in x.iter().enumerate() {
        sum[(i / (pixels * channels)) * groups + group_of(i % channels, channels, groups)] += v;
    }
    let mean: Vec<f64> = sum.iter().map(|s| s / count).collect();
    let mut sq = vec![0.0; n * groups];
    for (i, &v) in x.iter().enumerate() {
        let s = (i / (pixels * channels)) * groups + group_of(i % channels, channels, groups);
        sq[s] += (v - mean[s]) * (v - mean[s]);
    }
    let rstd: Vec<f64> = sq.iter().map(|s| 1.0 / (s / count + eps).sqrt()).collect();
    let y = x
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = i % channels;
            let s = (i / (pixels * channels)) * groups + group_of(c, channels, groups);
            (v - mean[s]) * rstd[s] * gamma[c] + beta[c]
        })
        .collect();
    (y, GroupNormStats { mean, rstd })
}

/// Returns (dx, dgamma, dbeta).
#[allow(clippy::too_many_arguments)]
pub fn group_norm_backward(
    x: &[f64],
    dy: &[f64],
    n: usize,
    pixels: usize,
    channels: usize,
    groups: usize,
    gamma: &[f64],
    stats: &GroupNormStats,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let count = (pixels * channels / groups) as f64;
    let slot =
        |i: usize| (i / (pixels * channels)) * groups + group_of(i % channels, channels, groups);
    let xhat = |i: usize| (x[i] - stats.mean[slot(i)]) * stats.rstd[slot(i)];
    let mut s1 = vec![0.0; n * groups]; // sum dxhat
    let mut s2 = vec![0.0; n * groups]; // sum dxhat * xhat
    let mut dgamma = vec![0.0; channels];
    let mut dbeta = vec![0.0; channels];
    for i in 0..x.len() {
        let c = i % channels;
        let dxhat = dy[i] * gamma[c];
        s1[slot(i)] += dxhat;
        s2[slot(i)] += dxhat * xhat(i);
        dgamma[c] += dy[i] * xhat(i);
        dbeta[c] += dy[i];
    }
    let dx = (0..x.len())
        .map(|i| {
            let s = slot(i);
            stats.rstd[s] * (dy[i] * gamma[i % channels] - s1[s] / count - xhat(i) * s2[s] / count)
        })
        .collect();
    (dx, dgamma, dbeta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{assert_gradients_match, numeric_gradient, test_data};

    #[test]
    fn matches_definition_on_a_tiny_case() {
        // One sample, one pixel, 4 channels, 2 groups: groups {1, 3} and {-2, 2}.
        let (y, st) = group_norm_forward(
            &[1.0, 3.0, -2.0, 2.0],
            1,
            1,
            4,
            2,
            &[1.0; 4],
            &[0.0; 4],
            0.0,
        );
        assert_eq!(st.mean, vec![2.0, 0.0]);
        assert_eq!(st.rstd, vec![1.0, 0.5]);
        assert_eq!(y, vec![-1.0, 1.0, -1.0, 1.0]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        for &(n, pixels, channels, groups) in &[(2, 5, 6, 3), (1, 7, 4, 1), (3, 2, 8, 8)] {
            let x: Vec<f64> = test_data(n * pixels * channels, 1)
                .iter()
                .map(|v| 2.0 * v + 0.5)
                .collect();
            let gamma: Vec<f64> = test_data(channels, 2)
                .iter()
                .map(|v| 1.0 + 0.5 * v)
                .collect();
            let beta = test_data(channels, 3);
            let dy = test_data(x.len(), 4);
            let eps = 1e-5;
            let loss = |x: &[f64], g: &[f64], b: &[f64]| -> f64 {
                let (y, _) = group_norm_forward(x, n, pixels, channels, groups, g, b, eps);
                y.iter().zip(&dy).map(|(a, b)| a * b).sum()
            };
            let (_, stats) =
                group_norm_forward(&x, n, pixels, channels, groups, &gamma, &beta, eps);
            let (dx, dgamma, dbeta) =
                group_norm_backward(&x, &dy, n, pixels, channels, groups, &gamma, &stats);
            let what = format!("group_norm {n}x{pixels}x{channels} G={groups}");
            assert_gradients_match(
                &format!("{what} dx"),
                &dx,
                &numeric_gradient(&x, 1e-6, |x| loss(x, &gamma, &beta)),
                1e-6,
            );
            assert_gradients_match(
                &format!("{what} dgamma"),
                &dgamma,
                &numeric_gradient(&gamma, 1e-6, |g| loss(&x, g, &beta)),
                1e-6,
            );
            assert_gradients_match(
                &format!("{what} dbeta"),
                &dbeta,
                &numeric_gradient(&beta, 1e-6, |b| loss(&x, &gamma, b)),
                1e-6,
            );
        }
    }
}
