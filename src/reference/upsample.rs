//! Reference for `shaders/upsample.wgsl`: nearest x2 upsampling of NHWC x [N, H, W, C].
//!
//! y[n, oy, ox, c] = x[n, oy/2, ox/2, c]; backward dx[n, iy, ix, c] = sum over the 4 children.

pub fn upsample_nearest2x_forward(x: &[f64], n: usize, h: usize, w: usize, c: usize) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len() * 4);
    for b in 0..n {
        for oy in 0..2 * h {
            for ox in 0..2 * w {
                let src = ((b * h + oy / 2) * w + ox / 2) * c;
                y.extend_from_slice(&x[src..src + c]);
            }
        }
    }
    y
}

/// `dy` is [N, 2H, 2W, C]; returns dx [N, H, W, C].
pub fn upsample_nearest2x_backward(dy: &[f64], n: usize, h: usize, w: usize, c: usize) -> Vec<f64> {
    let mut dx = vec![0.0; n * h * w * c];
    for b in 0..n {
        for oy in 0..2 * h {
            for ox in 0..2 * w {
                let d = ((b * h + oy / 2) * w + ox / 2) * c;
                let s = ((b * 2 * h + oy) * 2 * w + ox) * c;
                for k in 0..c {
                    dx[d + k] += dy[s + k];
                }
            }
        }
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{assert_gradients_match, numeric_gradient, test_data};

    #[test]
    fn forward_layout() {
        // 1x1x2 image with 2 channels -> 2x4.
        let y = upsample_nearest2x_forward(&[1.0, 2.0, 3.0, 4.0], 1, 1, 2, 2);
        assert_eq!(
            y,
            vec![
                1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0, 1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0
            ]
        );
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (n, h, w, c) = (2, 3, 5, 3);
        let x = test_data(n * h * w * c, 7);
        let dy = test_data(x.len() * 4, 8);
        let analytic = upsample_nearest2x_backward(&dy, n, h, w, c);
        let numeric = numeric_gradient(&x, 1e-6, |x| {
            upsample_nearest2x_forward(x, n, h, w, c)
                .iter()
                .zip(&dy)
                .map(|(a, b)| a * b)
                .sum()
        });
        assert_gradients_match("upsample_nearest2x", &analytic, &numeric, 1e-8);
    }
}
