//! Reference for `shaders/softmax.wgsl`: softmax over rows of length `len`.
//!
//! y_i = exp(x_i - max x) / sum_j exp(x_j - max x); backward dx_i = y_i (dy_i - sum_j dy_j y_j).

pub fn softmax_forward(x: &[f64], len: usize) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks(len) {
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let s: f64 = row.iter().map(|v| (v - m).exp()).sum();
        y.extend(row.iter().map(|v| (v - m).exp() / s));
    }
    y
}

pub fn softmax_backward(y: &[f64], dy: &[f64], len: usize) -> Vec<f64> {
    let mut dx = Vec::with_capacity(y.len());
    for (yr, gr) in y.chunks(len).zip(dy.chunks(len)) {
        let d: f64 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
        dx.extend(yr.iter().zip(gr).map(|(a, b)| a * (b - d)));
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{assert_gradients_match, numeric_gradient, test_data};

    #[test]
    fn rows_sum_to_one_and_large_inputs_do_not_overflow() {
        let y = softmax_forward(&[1000.0, 1000.0, 0.0, 1.0, 2.0, 3.0], 3);
        for row in y.chunks(3) {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        }
        assert!((y[0] - 0.5).abs() < 1e-15);
    }

    #[test]
    fn backward_matches_finite_differences() {
        for &(rows, len) in &[(1, 1), (3, 7), (2, 33)] {
            let x: Vec<f64> = test_data(rows * len, 5).iter().map(|v| 4.0 * v).collect();
            let dy = test_data(rows * len, 6);
            let y = softmax_forward(&x, len);
            let analytic = softmax_backward(&y, &dy, len);
            let numeric = numeric_gradient(&x, 1e-6, |x| {
                softmax_forward(x, len)
                    .iter()
                    .zip(&dy)
                    .map(|(a, b)| a * b)
                    .sum()
            });
            assert_gradients_match(&format!("softmax {rows}x{len}"), &analytic, &numeric, 1e-7);
        }
    }
}
