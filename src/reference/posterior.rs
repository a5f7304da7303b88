//! Reference for `shaders/posterior.wgsl`: the diagonal Gaussian posterior of diffusers'
//! `DiagonalGaussianDistribution` on NHWC moments [P, 2L] (μ first, log-variance last).

const LOGVAR_MIN: f64 = -30.0;
const LOGVAR_MAX: f64 = 20.0;

/// z = μ + exp(clamp(logvar, −30, 20)/2)·ε, [P, L].
pub fn posterior_sample(moments: &[f64], eps: &[f64], latent: usize) -> Vec<f64> {
    (0..eps.len())
        .map(|i| {
            let (pixel, c) = (i / latent, i % latent);
            let mean = moments[pixel * 2 * latent + c];
            let logvar = moments[pixel * 2 * latent + latent + c].clamp(LOGVAR_MIN, LOGVAR_MAX);
            mean + (0.5 * logvar).exp() * eps[i]
        })
        .collect()
}

/// d moments of Σ dz·z: (dz, dz·ε·σ/2 where the clamp passes).
pub fn posterior_sample_backward(
    moments: &[f64],
    eps: &[f64],
    dz: &[f64],
    latent: usize,
) -> Vec<f64> {
    let mut d = vec![0.0; moments.len()];
    for i in 0..eps.len() {
        let (pixel, c) = (i / latent, i % latent);
        let m = pixel * 2 * latent + c;
        let raw = moments[m + latent];
        d[m] = dz[i];
        if (LOGVAR_MIN..=LOGVAR_MAX).contains(&raw) {
            d[m + latent] = dz[i] * eps[i] * 0.5 * (0.5 * raw).exp();
        }
    }
    d
}

/// (1/B) Σ ½(μ² + exp(logvar) − 1 − logvar), logvar clamped.
pub fn posterior_kl(moments: &[f64], latent: usize, batch: usize) -> f64 {
    moments
        .chunks(2 * latent)
        .flat_map(|px| {
            (0..latent).map(move |c| {
                let lv = px[latent + c].clamp(LOGVAR_MIN, LOGVAR_MAX);
                0.5 * (px[c] * px[c] + lv.exp() - 1.0 - lv)
            })
        })
        .sum::<f64>()
        / batch as f64
}

/// d(weight · posterior_kl)/d moments.
pub fn posterior_kl_backward(
    moments: &[f64],
    latent: usize,
    batch: usize,
    weight: f64,
) -> Vec<f64> {
    let f = weight / batch as f64;
    let mut d = vec![0.0; moments.len()];
    for (px, dpx) in moments.chunks(2 * latent).zip(d.chunks_mut(2 * latent)) {
        for c in 0..latent {
            dpx[c] = f * px[c];
            let raw = px[latent + c];
            if (LOGVAR_MIN..=LOGVAR_MAX).contains(&raw) {
                dpx[latent + c] = f * 0.5 * (raw.exp() - 1.0);
            }
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{assert_gradients_match, numeric_gradient, test_data};

    #[test]
    fn backward_matches_finite_differences() {
        let latent = 3;
        let pixels = 5;
        // Log-variances inside the clamp, and two far outside it (no gradient there).
        let mut moments: Vec<f64> = test_data(pixels * 2 * latent, 1)
            .iter()
            .map(|v| 2.0 * v)
            .collect();
        moments[latent] = -45.0;
        moments[2 * latent + latent + 1] = 31.0;
        let eps = test_data(pixels * latent, 2);
        let dz = test_data(pixels * latent, 3);
        let analytic = posterior_sample_backward(&moments, &eps, &dz, latent);
        let numeric = numeric_gradient(&moments, 1e-6, |m| {
            posterior_sample(m, &eps, latent)
                .iter()
                .zip(&dz)
                .map(|(a, b)| a * b)
                .sum()
        });
        assert_gradients_match("posterior_sample", &analytic, &numeric, 1e-7);
        assert_eq!(analytic[latent], 0.0);
        // The KL sum holds exp(logvar): a log-variance clamped at 20 (e^20 ≈ 5e8) would drown a
        // finite difference in rounding, so only the lower clamp is exercised here.
        moments[2 * latent + latent + 1] = 0.5;
        let analytic = posterior_kl_backward(&moments, latent, 2, 0.7);
        let numeric = numeric_gradient(&moments, 1e-6, |m| 0.7 * posterior_kl(m, latent, 2));
        assert_gradients_match("posterior_kl", &analytic, &numeric, 1e-7);
    }
}
