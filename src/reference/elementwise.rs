//! References for `shaders/elementwise.wgsl`.

pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub fn silu_forward(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| v * sigmoid(v)).collect()
}

/// dx = dy * silu'(x), silu'(x) = s (1 + x (1 - s)).
pub fn silu_backward(x: &[f64], dy: &[f64]) -> Vec<f64> {
    x.iter()
        .zip(dy)
        .map(|(&v, &g)| {
            let s = sigmoid(v);
            g * s * (1.0 + v * (1.0 - s))
        })
        .collect()
}

/// transformers' causal mask on scores [blocks · T, T]: later keys get float32's lowest value.
pub fn causal_mask(scores: &[f64], keys: usize) -> Vec<f64> {
    scores
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            if i % keys > (i / keys) % keys {
                f32::MIN as f64
            } else {
                s
            }
        })
        .collect()
}

/// h[n, q, c] + alpha * v[n, c], h NHWC with `pixels` pixels per sample.
pub fn add_channel_bias(
    h: &[f64],
    v: &[f64],
    alpha: f64,
    pixels: usize,
    channels: usize,
) -> Vec<f64> {
    h.iter()
        .enumerate()
        .map(|(i, &x)| x + alpha * v[(i / (pixels * channels)) * channels + i % channels])
        .collect()
}

/// Backward of add_channel_bias for v: dv[n, c] = alpha * sum_q dh[n, q, c].
pub fn add_channel_bias_backward(
    dh: &[f64],
    alpha: f64,
    samples: usize,
    pixels: usize,
    channels: usize,
) -> Vec<f64> {
    let mut dv = vec![0.0; samples * channels];
    for (i, g) in dh.iter().enumerate() {
        dv[(i / (pixels * channels)) * channels + i % channels] += alpha * g;
    }
    dv
}

/// Channel concatenation of two NHWC tensors with the same pixels.
pub fn concat_channels(a: &[f64], ca: usize, b: &[f64], cb: usize) -> Vec<f64> {
    let pixels = a.len() / ca;
    let mut out = Vec::with_capacity(pixels * (ca + cb));
    for q in 0..pixels {
        out.extend_from_slice(&a[q * ca..(q + 1) * ca]);
        out.extend_from_slice(&b[q * cb..(q + 1) * cb]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{assert_gradients_match, numeric_gradient, test_data};

    #[test]
    fn silu_backward_matches_finite_differences() {
        let x: Vec<f64> = test_data(33, 1).iter().map(|v| v * 6.0).collect();
        let dy = test_data(33, 2);
        let analytic = silu_backward(&x, &dy);
        let numeric = numeric_gradient(&x, 1e-6, |x| {
            silu_forward(x).iter().zip(&dy).map(|(y, g)| y * g).sum()
        });
        assert_gradients_match("silu", &analytic, &numeric, 1e-7);
    }

    #[test]
    fn add_channel_bias_backward_matches_finite_differences() {
        let (n, q, c) = (3, 5, 7);
        let h = test_data(n * q * c, 3);
        let v = test_data(n * c, 4);
        let dh = test_data(n * q * c, 5);
        let analytic = add_channel_bias_backward(&dh, 0.5, n, q, c);
        let numeric = numeric_gradient(&v, 1e-6, |v| {
            add_channel_bias(&h, v, 0.5, q, c)
                .iter()
                .zip(&dh)
                .map(|(y, g)| y * g)
                .sum()
        });
        assert_gradients_match("add_channel_bias", &analytic, &numeric, 1e-7);
    }
}
