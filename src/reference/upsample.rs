//! Reference for `shaders/upsample.wgsl`: nearest x2 upsampling of NHWC x [N, H, W, C].
//!
//! y[n, oy, ox, c] = x[n, oy/2, ox/2, c]; backward dx[n, iy, ix, c] = sum over the 4 children.

pub use crate::data::resize::{avg_pool, upsample_bicubic};

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

#[cfg(test)]
mod resample_tests {
    use super::*;

    /// Values torch 2.15 printed for F.interpolate(x, scale_factor=k, mode="bicubic",
    /// align_corners=False) and F.avg_pool2d(x[:, :, :2], 2) of x = arange(12)^1.5 / 7 as
    /// [1, 1, 3, 4] (float64); every 5th output.
    #[test]
    fn bicubic_and_avg_pool_match_torch() {
        let x: Vec<f64> = (0..12).map(|v| (v as f64).powf(1.5) / 7.0).collect();
        let up2 = upsample_bicubic(&x, [1, 3, 4, 1], 2);
        let torch2 = [
            -0.132137913779,
            0.32176989706,
            0.313179918056,
            1.123436549603,
            1.324612136022,
            1.836131065672,
            3.311381464688,
            3.579162412433,
            3.385102773892,
            5.004810907182,
        ];
        for (i, t) in torch2.iter().enumerate() {
            assert!(
                (up2[5 * i] - t).abs() < 1e-9,
                "x2 [{}]: {} vs torch {t}",
                5 * i,
                up2[5 * i]
            );
        }
        let up4 = upsample_bicubic(&x, [1, 3, 4, 1], 4);
        let torch4 = [
            -0.13749327977,
            -0.045119283558,
            0.267591362319,
            0.567839922142,
            -0.031748465153,
            0.234905927008,
            0.628890465117,
            0.141798200448,
        ];
        for (i, t) in torch4.iter().enumerate() {
            assert!(
                (up4[5 * i] - t).abs() < 1e-9,
                "x4 [{}]: {} vs torch {t}",
                5 * i,
                up4[5 * i]
            );
        }
        let pooled = avg_pool(&x[..8], [1, 1, 2, 1], 2);
        assert!((pooled[0] - 0.7207264245535339).abs() < 1e-12);
        assert!((pooled[1] - 1.4729206136287152).abs() < 1e-12);
    }
}
