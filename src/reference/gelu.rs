//! Reference for `shaders/gelu.wgsl`: GELU with the exact normal CDF, GEGLU and quick-GELU, in
//! f64. Rust's standard library has no erf, so the CDF uses its own: the Maclaurin series of
//! erf for |z| ≤ 2.5 and the continued fraction of erfc beyond (each accurate to ~1e-13).

use super::elementwise::sigmoid;

/// erf(z) for |z| ≤ 2.5: 2/√π Σ (−1)ⁿ z^(2n+1) / (n!(2n+1)).
fn erf_series(z: f64) -> f64 {
    let mut term = z; // (−1)ⁿ z^(2n+1) / n!
    let mut sum = z;
    for n in 1..200 {
        term *= -z * z / n as f64;
        let add = term / (2 * n + 1) as f64;
        sum += add;
        if add.abs() < 1e-17 * sum.abs() {
            break;
        }
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

/// erfc(z) for z > 2.5: e^(−z²)/√π · 1/(z + (1/2)/(z + 1/(z + (3/2)/(z + 2/(z + …))))).
fn erfc_continued_fraction(z: f64) -> f64 {
    let mut f = z;
    for k in (1..120).rev() {
        f = z + (k as f64 / 2.0) / f;
    }
    (-z * z).exp() / std::f64::consts::PI.sqrt() / f
}

pub fn erfc(z: f64) -> f64 {
    if z > 2.5 {
        erfc_continued_fraction(z)
    } else if z < -2.5 {
        2.0 - erfc_continued_fraction(-z)
    } else {
        1.0 - erf_series(z)
    }
}

/// Φ(v), the standard normal CDF.
pub fn normal_cdf(v: f64) -> f64 {
    0.5 * erfc(-v / std::f64::consts::SQRT_2)
}

pub fn gelu(v: f64) -> f64 {
    v * normal_cdf(v)
}

/// gelu'(v) = Φ(v) + v·φ(v).
pub fn gelu_grad(v: f64) -> f64 {
    normal_cdf(v) + v * (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// GEGLU: x [rows, 2·inner] = [hidden | gate] → hidden·gelu(gate) [rows, inner].
pub fn geglu_forward(x: &[f64], inner: usize) -> Vec<f64> {
    x.chunks(2 * inner)
        .flat_map(|row| (0..inner).map(move |j| row[j] * gelu(row[inner + j])))
        .collect()
}

/// d[hidden | gate] from dy [rows, inner].
pub fn geglu_backward(x: &[f64], inner: usize, dy: &[f64]) -> Vec<f64> {
    x.chunks(2 * inner)
        .zip(dy.chunks(inner))
        .flat_map(|(row, g)| {
            let dh = (0..inner).map(|j| g[j] * gelu(row[inner + j]));
            let dg = (0..inner).map(|j| g[j] * row[j] * gelu_grad(row[inner + j]));
            dh.chain(dg).collect::<Vec<_>>()
        })
        .collect()
}

pub fn quick_gelu(v: f64) -> f64 {
    v * sigmoid(1.702 * v)
}

pub fn quick_gelu_grad(v: f64) -> f64 {
    let s = sigmoid(1.702 * v);
    s + 1.702 * v * s * (1.0 - s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{assert_gradients_match, numeric_gradient, test_data};

    #[test]
    fn erf_matches_known_values() {
        // erf(0.5), erf(1), erf(2), erfc(3), erfc(5) to 15 digits (CPython's math.erf / math.erfc).
        let cases = [
            (1.0 - erfc(0.5), 0.520_499_877_813_046_5),
            (1.0 - erfc(1.0), 0.842_700_792_949_714_9),
            (1.0 - erfc(2.0), 0.995_322_265_018_952_7),
            (erfc(3.0), 2.209_049_699_858_544e-5),
            (erfc(5.0), 1.537_459_794_428_035e-12),
        ];
        for (got, want) in cases {
            assert!(((got - want) / want).abs() < 1e-12, "{got} vs {want}");
        }
        // Continuity where the series hands over to the continued fraction.
        let (a, b) = (1.0 - erf_series(2.5), erfc_continued_fraction(2.5));
        assert!(((a - b) / b).abs() < 1e-10, "{a} vs {b}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        let x: Vec<f64> = test_data(24, 7).iter().map(|v| 3.0 * v).collect();
        let h = 1e-6;
        let analytic: Vec<f64> = x.iter().map(|&v| gelu_grad(v)).collect();
        let numeric = numeric_gradient(&x, h, |v| v.iter().map(|&t| gelu(t)).sum());
        assert_gradients_match("gelu", &analytic, &numeric, 1e-7);
        let analytic: Vec<f64> = x.iter().map(|&v| quick_gelu_grad(v)).collect();
        let numeric = numeric_gradient(&x, h, |v| v.iter().map(|&t| quick_gelu(t)).sum());
        assert_gradients_match("quick_gelu", &analytic, &numeric, 1e-7);
        // GEGLU: rows of [hidden | gate] with inner 3, L = Σ y·w.
        let w = test_data(12, 8);
        let analytic = geglu_backward(&x, 3, &w);
        let numeric = numeric_gradient(&x, h, |v| {
            geglu_forward(v, 3).iter().zip(&w).map(|(a, b)| a * b).sum()
        });
        assert_gradients_match("geglu", &analytic, &numeric, 1e-7);
    }
}
