//! Image quality metrics for super-resolution, on images in [0, 1]: PSNR (MAX 1) and SSIM
//! (Wang et al. 2004: 11×11 Gaussian window σ = 1.5, K1 = 0.01, K2 = 0.03, L = 1, averaged over
//! the window positions that fit inside the image — MATLAB `ssim_index`'s 'valid' filtering —
//! and over channels).

/// Peak signal-to-noise ratio in dB of `a` against `b` (values in [0, 1]); ∞ when identical.
pub fn psnr(a: &[f64], b: &[f64]) -> f64 {
    let mse = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / a.len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        -10.0 * mse.log10()
    }
}

fn gaussian_window() -> [[f64; 11]; 11] {
    let g: Vec<f64> = (0..11)
        .map(|i| (-((i as f64 - 5.0).powi(2)) / (2.0 * 1.5f64.powi(2))).exp())
        .collect();
    let sum: f64 = g.iter().sum();
    let mut w = [[0.0; 11]; 11];
    for (y, row) in w.iter_mut().enumerate() {
        for (x, v) in row.iter_mut().enumerate() {
            *v = g[y] * g[x] / (sum * sum);
        }
    }
    w
}

/// Mean SSIM of two NHWC images [h, w, c] with values in [0, 1].
pub fn ssim(a: &[f64], b: &[f64], h: usize, w: usize, c: usize) -> f64 {
    let win = gaussian_window();
    let (c1, c2) = ((0.01f64).powi(2), (0.03f64).powi(2));
    if h < 11 || w < 11 {
        return f64::NAN;
    }
    let mut total = 0.0;
    let mut count = 0usize;
    for ch in 0..c {
        let at = |img: &[f64], y: usize, x: usize| img[(y * w + x) * c + ch];
        for y0 in 0..=h - 11 {
            for x0 in 0..=w - 11 {
                let (mut ma, mut mb, mut saa, mut sbb, mut sab) = (0.0, 0.0, 0.0, 0.0, 0.0);
                for (dy, row) in win.iter().enumerate() {
                    for (dx, &g) in row.iter().enumerate() {
                        let (va, vb) = (at(a, y0 + dy, x0 + dx), at(b, y0 + dy, x0 + dx));
                        ma += g * va;
                        mb += g * vb;
                        saa += g * va * va;
                        sbb += g * vb * vb;
                        sab += g * va * vb;
                    }
                }
                let (va, vb, cov) = (saa - ma * ma, sbb - mb * mb, sab - ma * mb);
                total += ((2.0 * ma * mb + c1) * (2.0 * cov + c2))
                    / ((ma * ma + mb * mb + c1) * (va + vb + c2));
                count += 1;
            }
        }
    }
    total / count as f64
}

/// [-1, 1] model values → [0, 1], clamped.
pub fn to_unit(v: &[f32]) -> Vec<f64> {
    v.iter()
        .map(|&x| ((x as f64 + 1.0) / 2.0).clamp(0.0, 1.0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psnr_and_ssim_basics() {
        let a = vec![0.5; 28 * 28];
        assert_eq!(psnr(&a, &a), f64::INFINITY);
        let b: Vec<f64> = a.iter().map(|v| v + 0.1).collect();
        assert!((psnr(&a, &b) - 20.0).abs() < 1e-9);
        assert!((ssim(&a, &a, 28, 28, 1) - 1.0).abs() < 1e-12);
        let noisy: Vec<f64> = (0..28 * 28)
            .map(|i| ((i * 37 % 101) as f64) / 100.0)
            .collect();
        let s = ssim(&noisy, &a, 28, 28, 1);
        assert!(s < 0.5 && s > -1.0, "{s}");
    }
}

#[cfg(test)]
mod bicubic_baseline {
    use super::*;
    use crate::data::resize::{avg_pool, upsample_bicubic};

    /// Bicubic's PSNR/SSIM over the 10k MNIST test digits with these conventions reproduce the
    /// figures measured independently for the super-resolution targets: ×2 20.61 dB / 0.866,
    /// ×4 14.70 dB / 0.447 (which pins the SSIM window, the [0, 1] scaling and the clamping).
    #[test]
    fn bicubic_on_mnist_test() {
        let (n, images) = crate::data::mnist::test_images().unwrap();
        for k in [2usize, 4] {
            let (mut p, mut s) = (0.0, 0.0);
            for i in 0..n {
                let hr: Vec<f64> = images[i * 784..(i + 1) * 784]
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let lr = avg_pool(&hr, [1, 28 / k, 28 / k, 1], k);
                let up = upsample_bicubic(&lr, [1, 28 / k, 28 / k, 1], k);
                let up: Vec<f32> = up.iter().map(|&v| v as f32).collect();
                let hr32: Vec<f32> = hr.iter().map(|&v| v as f32).collect();
                let (a, b) = (to_unit(&up), to_unit(&hr32));
                p += psnr(&a, &b);
                s += ssim(&a, &b, 28, 28, 1);
            }
            let (p, s) = (p / n as f64, s / n as f64);
            eprintln!("bicubic x{k}: PSNR {p:.3} dB, SSIM {s:.4}");
            let (ep, es) = if k == 2 {
                (20.61, 0.866)
            } else {
                (14.70, 0.447)
            };
            assert!(
                (p - ep).abs() < 0.006 && (s - es).abs() < 0.0006,
                "x{k}: {p} dB, SSIM {s}"
            );
        }
    }
}
