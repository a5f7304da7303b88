//! Reference for `shaders/noise.wgsl`: Philox4x32-10 (Salmon, Moraes, Dror & Shaw, "Parallel
//! random numbers: as easy as 1, 2, 3", SC'11), the counter mapping of [`crate::ops::noise`],
//! uniform integers, Box–Muller normals and the DDPM forward process `q_sample`.
//!
//! Integers are bit-exact with the GPU (only integer arithmetic); normals go through `ln`, `sin`
//! and `cos`, which WGSL does not specify to the bit, so they are computed here in f64 from the
//! same (exact) uniforms and the GPU is checked against them with a tolerance.

pub use crate::rng::{
    PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1, counter_of, key_of, philox4x32, philox4x32_10,
    random_u32,
};

/// Maps a 32-bit word to [0, n) by the multiply-high trick, floor(w * n / 2^32) (Lemire, "Fast
/// random integer generation in an interval", 2019, without the rejection step). `n = 0` means
/// the full range (the word itself). Each value has probability floor(2^32/n)/2^32 or
/// ceil(2^32/n)/2^32, so the bias is below n/2^32 relative (2.3e-7 for n = 1000 timesteps).
pub fn to_range(word: u32, n: u32) -> u32 {
    if n == 0 {
        word
    } else {
        ((word as u64 * n as u64) >> 32) as u32
    }
}

/// Uniform integer in [0, n) (`n = 0`: any u32) of element `index`.
pub fn uniform_int(seed: u64, purpose: u32, step: u32, index: u32, n: u32) -> u32 {
    to_range(random_u32(seed, purpose, step, index), n)
}

/// Uniform in (0, 1] from the top 24 bits of a word: (w >> 8) + 1 over 2^24, exact in f32.
/// Never 0, so ln(u) is finite: |z| <= sqrt(-2 ln 2^-24) = 5.77.
pub fn uniform_open_closed(word: u32) -> f64 {
    ((word >> 8) + 1) as f64 / 16_777_216.0
}

/// Uniform in [0, 1) from the top 24 bits of a word: (w >> 8) / 2^24, exact in f32.
pub fn uniform_closed_open(word: u32) -> f64 {
    (word >> 8) as f64 / 16_777_216.0
}

/// Box–Muller (Box & Muller 1958) on one Philox block: words (w0, w1) give z0 = r cos θ and
/// z1 = r sin θ with r = sqrt(-2 ln u(w0)), u in (0, 1], and θ = π (2 v(w1) − 1), v in [0, 1),
/// so θ is in [−π, π) where WGSL's sin/cos are accurate; (w2, w3) give z2, z3 the same way.
pub fn box_muller(words: [u32; 4]) -> [f64; 4] {
    let pair = |a: u32, b: u32| {
        let r = (-2.0 * uniform_open_closed(a).ln()).sqrt();
        let theta = std::f64::consts::PI * (2.0 * uniform_closed_open(b) - 1.0);
        (r * theta.cos(), r * theta.sin())
    };
    let (z0, z1) = pair(words[0], words[1]);
    let (z2, z3) = pair(words[2], words[3]);
    [z0, z1, z2, z3]
}

/// Standard normal of element `index` in stream (`seed`, `purpose`, `step`).
pub fn normal(seed: u64, purpose: u32, step: u32, index: u32) -> f64 {
    box_muller(philox4x32_10(
        counter_of(purpose, step, index),
        key_of(seed),
    ))[(index % 4) as usize]
}

/// DDPM forward process (Ho et al. 2020, eq. 4): x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε, per sample
/// b with t = timesteps[b]. The square roots are taken in f32 of the f32 ᾱ, as diffusers'
/// `DDPMScheduler.add_noise` does (`alphas_cumprod[timesteps] ** 0.5`, `(1 - alphas_cumprod) ** 0.5`
/// on f32 tensors); the final multiply-add is exact in f64.
pub fn q_sample(x0: &[f64], noise: &[f64], timesteps: &[u32], alphas_cumprod: &[f32]) -> Vec<f64> {
    let per_sample = x0.len() / timesteps.len().max(1);
    x0.iter()
        .zip(noise)
        .enumerate()
        .map(|(i, (&x, &e))| {
            let a = alphas_cumprod[timesteps[i / per_sample] as usize];
            let (sa, s1) = (a.sqrt() as f64, (1.0f32 - a).sqrt() as f64);
            sa * x + s1 * e
        })
        .collect()
}

/// Backward of `q_sample` for x0 and ε (the loss gradient flows only through the model, but the
/// derivative documents the op): dx0 = sqrt(ᾱ) dy, dε = sqrt(1 − ᾱ) dy.
pub fn q_sample_backward(
    dy: &[f64],
    timesteps: &[u32],
    alphas_cumprod: &[f32],
) -> (Vec<f64>, Vec<f64>) {
    let per_sample = dy.len() / timesteps.len().max(1);
    dy.iter()
        .enumerate()
        .map(|(i, &g)| {
            let a = alphas_cumprod[timesteps[i / per_sample] as usize];
            (a.sqrt() as f64 * g, (1.0f32 - a).sqrt() as f64 * g)
        })
        .unzip()
}

/// Random123 `kat_vectors`, the three "philox4x32 10" lines: (counter, key, expected output).
/// DEShawResearch/random123, tests/kat_vectors.
pub const PHILOX4X32_10_KAT: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
    (
        [0, 0, 0, 0],
        [0, 0],
        [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8],
    ),
    (
        [0xffff_ffff, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff],
        [0xffff_ffff, 0xffff_ffff],
        [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd],
    ),
    (
        // Digits of pi (0x243f6a88...), Random123's third vector.
        [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
        [0xa409_3822, 0x299f_31d0],
        [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1],
    ),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{assert_gradients_match, numeric_gradient, test_data};

    #[test]
    fn philox_known_answers() {
        for (ctr, key, want) in PHILOX4X32_10_KAT {
            assert_eq!(
                philox4x32_10(ctr, key),
                want,
                "ctr {ctr:08x?} key {key:08x?}"
            );
        }
    }

    #[test]
    fn multiply_high_range() {
        assert_eq!(to_range(0, 1000), 0);
        assert_eq!(to_range(u32::MAX, 1000), 999);
        assert_eq!(to_range(0x8000_0000, 1000), 500);
        assert_eq!(to_range(12345, 0), 12345);
        for i in 0..1000 {
            assert!(uniform_int(7, 1, 3, i, 17) < 17);
        }
    }

    #[test]
    fn uniforms_are_exact_f32_and_in_range() {
        for w in [0u32, 255, 256, u32::MAX] {
            let (a, b) = (uniform_open_closed(w), uniform_closed_open(w));
            assert!(a > 0.0 && a <= 1.0 && (0.0..1.0).contains(&b));
            assert_eq!(a as f32 as f64, a);
            assert_eq!(b as f32 as f64, b);
        }
        assert!(
            box_muller([0, 0, u32::MAX, u32::MAX])
                .iter()
                .all(|z| z.is_finite() && z.abs() < 5.8)
        );
    }

    #[test]
    fn q_sample_backward_matches_finite_differences() {
        let (b, per) = (3, 7);
        let x0 = test_data(b * per, 1);
        let eps = test_data(b * per, 2);
        let dy = test_data(b * per, 3);
        let ts = [0u32, 5, 9];
        let ac: Vec<f32> = (0..10).map(|t| 1.0 - 0.09 * t as f32).collect();
        let (dx0, deps) = q_sample_backward(&dy, &ts, &ac);
        let dot = |y: Vec<f64>| y.iter().zip(&dy).map(|(a, g)| a * g).sum::<f64>();
        let nx = numeric_gradient(&x0, 1e-6, |x| dot(q_sample(x, &eps, &ts, &ac)));
        let ne = numeric_gradient(&eps, 1e-6, |e| dot(q_sample(&x0, e, &ts, &ac)));
        assert_gradients_match("q_sample dx0", &dx0, &nx, 1e-7);
        assert_gradients_match("q_sample deps", &deps, &ne, 1e-7);
    }
}
