//! Reference for `shaders/timestep_embedding.wgsl`: diffusers `get_timestep_embedding`
//! (scale 1, max_period 10000).
//!
//! The argument emb = t * freq is computed exactly as torch does, in f32 (frequencies from
//! f32 `arange * -ln(10000)`, an f32 divide by (dim/2 - shift) and exp, then one f32 multiply by
//! t), and then sin/cos are taken in f64 of that f32 argument: the reference for what a correct
//! f32 kernel can deliver. No backward: timesteps are not learned.

/// `timesteps` holds f32 values (fractional allowed); returns [B, dim] row-major.
pub fn timestep_embedding(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f32,
) -> Vec<f64> {
    let half = dim / 2;
    let neg_log = -(10000f64.ln()) as f32;
    let denom = (half as f64 - downscale_freq_shift as f64) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (((i as f32 * neg_log) / denom) as f64).exp() as f32)
        .collect();
    let mut out = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let emb: Vec<f64> = freqs.iter().map(|&f| (t as f32 * f) as f64).collect();
        let sin = emb.iter().map(|e| e.sin());
        let cos = emb.iter().map(|e| e.cos());
        if flip_sin_to_cos {
            out.extend(cos.chain(sin));
        } else {
            out.extend(sin.chain(cos));
        }
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    out
}

/// diffusers' GaussianFourierProjection (log = True): v = ((ln t · w) · 2) · π as torch's f32
/// products (ln t in f32), sin/cos in f64 of that f32 argument; [sin, cos] ([cos, sin] with
/// flip). Returns [B, 2·len(w)].
pub fn fourier_embedding(timesteps: &[f64], weights: &[f32], flip_sin_to_cos: bool) -> Vec<f64> {
    let pi = std::f32::consts::PI;
    let mut out = Vec::with_capacity(timesteps.len() * 2 * weights.len());
    for &t in timesteps {
        let log_t = (t as f32 as f64).ln() as f32;
        let v: Vec<f64> = weights
            .iter()
            .map(|&w| (((log_t * w) * 2.0) * pi) as f64)
            .collect();
        let sin = v.iter().map(|e| e.sin());
        let cos = v.iter().map(|e| e.cos());
        if flip_sin_to_cos {
            out.extend(cos.chain(sin));
        } else {
            out.extend(sin.chain(cos));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_flip_and_padding() {
        // dim 5, shift 1: half 2, freqs exp(0) = 1 and exp(-ln(10000) * 1 / 1) = 1e-4.
        let e = timestep_embedding(&[0.0, 2.0], 5, false, 1.0);
        assert_eq!(&e[..5], &[0.0, 0.0, 1.0, 1.0, 0.0]);
        assert!((e[5] - 2f64.sin()).abs() < 1e-7 && (e[7] - 2f64.cos()).abs() < 1e-7);
        assert!((e[6] - 2e-4f64.sin()).abs() < 1e-9 && e[9] == 0.0);
        let f = timestep_embedding(&[2.0], 4, true, 1.0);
        assert_eq!(f[0], e[7]);
        assert_eq!(f[2], e[5]);
    }

    #[test]
    fn close_to_the_exact_formula() {
        // The f32 argument differs from the exact one by a few ulp: |emb| <= 999, so ~1e-4 rad.
        let (dim, shift) = (32, 0.0);
        let e = timestep_embedding(&[999.0], dim, false, shift);
        for (i, &got) in e.iter().enumerate().take(dim / 2) {
            let exact = 999.0 * (-(10000f64.ln()) * i as f64 / (dim / 2) as f64).exp();
            assert!(
                (got - exact.sin()).abs() < 3e-4,
                "i = {i}: {got} vs {}",
                exact.sin()
            );
        }
    }
}
