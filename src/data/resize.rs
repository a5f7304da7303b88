//! Image resizing on the CPU, as torch does it (f64): k × k average pooling (the low-resolution
//! inputs of super-resolution training and evaluation) and bicubic upsampling (the baseline
//! `eval-sr` compares with). `shaders/upsample.wgsl` computes the same on the GPU, and the GPU
//! tests check it against these.

/// Keys' cubic convolution weights for the fractional offset t (A = −0.75, torch's).
fn cubic_weights(t: f64) -> [f64; 4] {
    let a = -0.75;
    let c1 = |x: f64| ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
    let c2 = |x: f64| ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
    [c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)]
}

/// torch F.interpolate(x, scale_factor=k, mode="bicubic", align_corners=False) on NHWC.
pub fn upsample_bicubic(x: &[f64], [n, h, w, c]: [usize; 4], k: usize) -> Vec<f64> {
    let (oh, ow) = (k * h, k * w);
    let mut out = vec![0.0; n * oh * ow * c];
    let src = |o: usize| (o as f64 + 0.5) / k as f64 - 0.5;
    for b in 0..n {
        for oy in 0..oh {
            let ry = src(oy);
            let fy = ry.floor();
            let wy = cubic_weights(ry - fy);
            for ox in 0..ow {
                let rx = src(ox);
                let fx = rx.floor();
                let wx = cubic_weights(rx - fx);
                for ch in 0..c {
                    let mut acc = 0.0;
                    for (a, wya) in wy.iter().enumerate() {
                        let sy = (fy as isize - 1 + a as isize).clamp(0, h as isize - 1) as usize;
                        for (bb, wxb) in wx.iter().enumerate() {
                            let sx =
                                (fx as isize - 1 + bb as isize).clamp(0, w as isize - 1) as usize;
                            acc += wya * wxb * x[((b * h + sy) * w + sx) * c + ch];
                        }
                    }
                    out[((b * oh + oy) * ow + ox) * c + ch] = acc;
                }
            }
        }
    }
    out
}

/// k × k average pooling of NHWC `x` [n, kh, kw, c] → [n, h, w, c].
pub fn avg_pool(x: &[f64], [n, h, w, c]: [usize; 4], k: usize) -> Vec<f64> {
    let (bh, bw) = (k * h, k * w);
    let mut out = vec![0.0; n * h * w * c];
    for b in 0..n {
        for y in 0..h {
            for xx in 0..w {
                for ch in 0..c {
                    let mut acc = 0.0;
                    for a in 0..k {
                        for d in 0..k {
                            acc += x[((b * bh + k * y + a) * bw + k * xx + d) * c + ch];
                        }
                    }
                    out[((b * h + y) * w + xx) * c + ch] = acc / (k * k) as f64;
                }
            }
        }
    }
    out
}
