//! noise.wgsl against reference::noise.
//!
//! * Philox4x32-10 and the uniform integers are pure integer arithmetic: compared bit for bit
//!   (Random123's known-answer vectors, and the CPU reference over every element).
//! * Normals use the GPU's `log`, `sin`, `cos`: compared to the f64 Box–Muller of the same
//!   (exact) uniforms, element by element within 1e-5·|ref| + 5e-7·r (r the Box–Muller radius,
//!   ≤ 5.77, so never looser than 2.9e-6 absolute; see THETA_ERR), then checked statistically
//!   on 2^20 samples.
//! * q_sample does two f32 square roots and a multiply-add per element (≤ ~3 ulp of the larger
//!   term): rtol 1e-5 plus atol 1e-6·(max|x0| + max|ε|), the size of the terms that may cancel.

use std::sync::Arc;

use crate::common::*;
use wgpu_diffusion::gpu::{Gpu, Tensor};
use wgpu_diffusion::ops::noise as op;
use wgpu_diffusion::reference::noise as r;

const SIZES: [usize; 5] = [1, 3, 7, 33, 70_001];
const SEEDS: [u64; 3] = [0, 42, 0xDEAD_BEEF_0123_4567];

fn state(g: &Arc<Gpu>, seed: u64, step: u32) -> Tensor {
    let t = g.tensor(&[4], "rng state");
    op::write_rng_state(g, &t, seed, step).unwrap();
    t
}

fn uniforms(
    g: &Arc<Gpu>,
    seed: u64,
    purpose: u32,
    step: u32,
    first: u32,
    range: u32,
    n: usize,
) -> Vec<u32> {
    let (st, out) = (state(g, seed, step), g.tensor(&[n], "uniforms"));
    run(g, |rec| {
        op::random_uniform_u32(rec, &st, purpose, first, range, &out).unwrap()
    });
    g.read_u32(&out).unwrap()
}

fn normals(g: &Arc<Gpu>, seed: u64, purpose: u32, step: u32, first: u32, n: usize) -> Vec<f32> {
    let (st, out) = (state(g, seed, step), g.tensor(&[n], "normals"));
    run(g, |rec| {
        op::random_normal(rec, &st, purpose, first, &out).unwrap()
    });
    read(g, &out)
}

#[test]
fn philox_known_answer_vectors_on_gpu() {
    let g = gpu();
    let mut input = Vec::new();
    for (ctr, key, _) in r::PHILOX4X32_10_KAT {
        input.extend_from_slice(&ctr);
        input.extend_from_slice(&key);
        input.extend_from_slice(&[0, 0]);
    }
    let tin = g.tensor(&[input.len()], "kat in");
    g.write_u32(&tin, &input).unwrap();
    let tout = g.tensor(&[4 * r::PHILOX4X32_10_KAT.len()], "kat out");
    run(&g, |rec| op::philox_kat(rec, &tin, &tout).unwrap());
    let got = g.read_u32(&tout).unwrap();
    for (k, (ctr, key, want)) in r::PHILOX4X32_10_KAT.iter().enumerate() {
        assert_eq!(
            &got[4 * k..4 * k + 4],
            want,
            "GPU Philox4x32-10 ctr {ctr:08x?} key {key:08x?}"
        );
        assert_eq!(
            r::philox4x32_10(*ctr, *key),
            *want,
            "CPU Philox4x32-10 ctr {ctr:08x?} key {key:08x?}"
        );
    }
}

#[test]
fn uniforms_match_reference_bit_exact() {
    let g = gpu();
    for &n in &SIZES {
        for &seed in &SEEDS {
            for (purpose, step, first, range) in [
                (1, 0, 0, 0),
                (2, 7, 5, 1000),
                (3, u32::MAX, 1 << 31, 7),
                (0, 3, 0, 1),
            ] {
                let got = uniforms(&g, seed, purpose, step, first, range, n);
                let want: Vec<u32> = (0..n as u32)
                    .map(|i| r::uniform_int(seed, purpose, step, first + i, range))
                    .collect();
                assert_eq!(
                    got, want,
                    "uniforms n={n} seed={seed:#x} purpose={purpose} step={step} first={first} range={range}"
                );
            }
        }
    }
}

/// Bound on the f32 angle's error: θ = π(2v − 1) with 2v − 1 exact, the f32 π off by 8.7e-8
/// relative and one rounding of the product (half an ulp of π, 1.2e-7): ≤ 4e-7 rad; with a
/// few ulp for sin/cos themselves, 5e-7. z = r·cos θ then errs by ≤ 5e-7·r absolutely (this
/// dominates near the zeros of cos and sin, where no relative tolerance can hold), plus a
/// relative error of a few ulp from log, sqrt and the products, covered by rtol 1e-5.
const THETA_ERR: f64 = 5e-7;

#[test]
fn normals_match_reference() {
    let g = gpu();
    for &n in &SIZES {
        for &seed in &SEEDS {
            let got = normals(&g, seed, 2, 11, 3, n);
            let mut worst = (0usize, 0.0f64);
            for (i, &z) in got.iter().enumerate() {
                let index = 3 + i as u32;
                let want = r::normal(seed, 2, 11, index);
                let words = r::philox4x32_10(r::counter_of(2, 11, index), r::key_of(seed));
                let radius = (-2.0
                    * r::uniform_open_closed(words[(index % 4 / 2 * 2) as usize]).ln())
                .sqrt();
                let excess = (z as f64 - want).abs() / (1e-5 * want.abs() + THETA_ERR * radius);
                // NaN counts as worst.
                if excess.is_nan() || excess > worst.1 {
                    worst = (i, excess);
                }
            }
            assert!(
                worst.1 <= 1.0,
                "random_normal n={n} seed={seed:#x}: element {} off by {}x its tolerance: gpu {} ref {}",
                worst.0,
                worst.1,
                got[worst.0],
                r::normal(seed, 2, 11, 3 + worst.0 as u32)
            );
        }
    }
}

/// Standard normal CDF via erfc (Numerical Recipes' Chebyshev fit `erfcc`, fractional error
/// < 1.2e-7, far below the KS threshold of 1.6e-3 used here).
fn normal_cdf(x: f64) -> f64 {
    let z = (x / std::f64::consts::SQRT_2).abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 {
        1.0 - 0.5 * erfc
    } else {
        0.5 * erfc
    }
}

fn correlation(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (
        a.iter().map(|&x| x as f64).sum::<f64>() / n,
        b.iter().map(|&x| x as f64).sum::<f64>() / n,
    );
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (dx, dy) = (x as f64 - ma, y as f64 - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    sab / (saa * sbb).sqrt()
}

#[test]
fn normals_are_standard_normal_and_streams_uncorrelated() {
    let g = gpu();
    let n = 1 << 20;
    let (seed, purpose, step) = (1234u64, 2u32, 5u32);
    let z = normals(&g, seed, purpose, step, 0, n);
    let nf = n as f64;

    // Mean ~ N(0, 1/n), sample variance ~ N(1, 2/n): 5-sigma bounds (deterministic seed, so
    // this either always passes or always fails).
    let mean = z.iter().map(|&x| x as f64).sum::<f64>() / nf;
    let var = z.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (nf - 1.0);
    assert!(mean.abs() < 5.0 / nf.sqrt(), "mean {mean}");
    assert!(
        (var - 1.0).abs() < 5.0 * (2.0 / nf).sqrt(),
        "variance {var}"
    );
    assert!(
        z.iter().all(|x| x.is_finite() && x.abs() < 5.78),
        "|z| must stay below sqrt(-2 ln 2^-24)"
    );

    // Kolmogorov–Smirnov against N(0, 1): reject at the 1 % level when D > 1.63 / sqrt(n).
    let mut sorted: Vec<f64> = z.iter().map(|&x| x as f64).collect();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let d = sorted
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let c = normal_cdf(x);
            (c - i as f64 / nf)
                .abs()
                .max(((i + 1) as f64 / nf - c).abs())
        })
        .fold(0.0f64, f64::max);
    assert!(
        d < 1.63 / nf.sqrt(),
        "KS statistic D = {d} (limit {})",
        1.63 / nf.sqrt()
    );

    // Neighbouring streams and elements: |corr| < 4/sqrt(n) (4 sigma for independent samples).
    let limit = 4.0 / nf.sqrt();
    let neighbours = [
        ("purpose p+1", normals(&g, seed, purpose + 1, step, 0, n)),
        ("step s+1", normals(&g, seed, purpose, step + 1, 0, n)),
        ("seed+1", normals(&g, seed + 1, purpose, step, 0, n)),
    ];
    for (what, other) in &neighbours {
        let c = correlation(&z, other);
        assert!(
            c.abs() < limit,
            "correlation with {what}: {c} (limit {limit})"
        );
    }
    for lag in [1usize, 2, 4] {
        let c = correlation(&z[..n - lag], &z[lag..]);
        assert!(
            c.abs() < limit,
            "correlation of element i with i+{lag}: {c} (limit {limit})"
        );
    }
    // Squares too: Box–Muller pairs share r, which a plain correlation cannot see.
    let sq: Vec<f32> = z.iter().map(|x| x * x).collect();
    let c = correlation(&sq[..n - 1], &sq[1..]);
    assert!(
        c.abs() < limit,
        "correlation of z_i^2 with z_(i+1)^2: {c} (limit {limit})"
    );
    // Uniform timesteps: chi-square-free check that each of 10 bins holds 10 % ± 5 sigma.
    let u = uniforms(&g, seed, 1, step, 0, 10, n);
    let mut bins = [0usize; 10];
    u.iter().for_each(|&v| bins[v as usize] += 1);
    let sigma = (nf * 0.1 * 0.9).sqrt();
    assert!(
        bins.iter()
            .all(|&b| (b as f64 - nf * 0.1).abs() < 5.0 * sigma),
        "timestep bins {bins:?}"
    );
}

#[test]
fn deterministic_and_independent_of_dispatch_shape() {
    let g = gpu();
    let n = 70_001;
    let (seed, purpose, step) = (99u64, 2u32, 17u32);
    let whole_n = normals(&g, seed, purpose, step, 0, n);
    let again = normals(&g, seed, purpose, step, 0, n);
    assert!(
        whole_n
            .iter()
            .zip(&again)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "two runs differ"
    );
    let whole_u = uniforms(&g, seed, purpose, step, 0, 0, n);
    // Sub-ranges, unaligned to the 4-word blocks and to workgroups, dispatched on their own.
    for (first, len) in [
        (0usize, 1usize),
        (1, 3),
        (5, 7),
        (255, 258),
        (40_000, 30_001),
    ] {
        let part_n = normals(&g, seed, purpose, step, first as u32, len);
        assert!(
            part_n
                .iter()
                .zip(&whole_n[first..first + len])
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "normals {first}..{} differ from the whole range",
            first + len
        );
        let part_u = uniforms(&g, seed, purpose, step, first as u32, 0, len);
        assert_eq!(
            part_u,
            whole_u[first..first + len],
            "uniforms {first}..{}",
            first + len
        );
    }
}

/// f32 ᾱ of the DDPM linear schedule (β from 1e-4 to 0.02 over T steps, Ho et al. 2020).
fn alphas_cumprod(t: usize) -> Vec<f32> {
    let mut acc = 1.0f32;
    (0..t)
        .map(|i| {
            let beta = 1e-4 + (0.02 - 1e-4) * i as f32 / (t - 1).max(1) as f32;
            acc *= 1.0 - beta;
            acc
        })
        .collect()
}

#[test]
fn q_sample_matches_reference() {
    let g = gpu();
    let num_t = 1000;
    let ac = alphas_cumprod(num_t);
    let tac = g.tensor_from(&[num_t], &ac, "alphas_cumprod").unwrap();
    for (i, &(b, per)) in [(1usize, 1usize), (3, 1), (7, 3), (3, 33), (7, 10_001)]
        .iter()
        .enumerate()
    {
        let n = b * per;
        let x0 = random(n, 70 + i as u64);
        let tx0 = upload(&g, &[b, per], &x0, "x0");
        let st = state(&g, 5, i as u32);
        let (tts, teps, txt) = (
            g.tensor(&[b], "timesteps"),
            g.tensor(&[b, per], "eps"),
            g.tensor(&[b, per], "x_t"),
        );
        let mut outputs = Vec::new();
        for _ in 0..2 {
            run(&g, |rec| {
                op::random_uniform_u32(rec, &st, op::purpose::TIMESTEPS, 0, num_t as u32, &tts)
                    .unwrap();
                op::random_normal(rec, &st, op::purpose::NOISE, 0, &teps).unwrap();
                op::q_sample(rec, &tx0, &teps, &tts, &tac, &txt).unwrap();
            });
            outputs.push(read(&g, &txt));
        }
        let ts = g.read_u32(&tts).unwrap();
        let want_ts: Vec<u32> = (0..b as u32)
            .map(|k| r::uniform_int(5, op::purpose::TIMESTEPS, i as u32, k, num_t as u32))
            .collect();
        assert_eq!(ts, want_ts, "timesteps b={b}");
        let eps: Vec<f64> = read(&g, &teps).iter().map(|&v| v as f64).collect();
        let want = r::q_sample(&x0, &eps, &ts, &ac);
        let atol = 1e-6 * (max_abs(&x0) + max_abs(&eps));
        assert_close(
            &format!("q_sample {b}x{per}"),
            &outputs[0],
            &want,
            atol,
            1e-5,
        );
        assert!(
            outputs[0]
                .iter()
                .zip(&outputs[1])
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "q_sample: two runs differ"
        );
    }
}

#[test]
fn invalid_arguments_are_errors() {
    let g = gpu();
    let mut rec = g.recorder();
    let (st, out) = (g.tensor(&[3], "st"), g.tensor(&[8], "out"));
    let e = op::random_normal(&mut rec, &st, 0, 0, &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("random_normal") && e.contains("`state`"), "{e}");
    let st = g.tensor(&[4], "st");
    let e = op::random_uniform_u32(&mut rec, &st, 0, u32::MAX, 0, &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("2^32"), "{e}");
    let e = op::random_normal(&mut rec, &out.view(0, &[4], "alias"), 0, 0, &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("share a buffer"), "{e}");
    let (x0, ts, ac) = (
        g.tensor(&[2, 5], "x0"),
        g.tensor(&[3], "ts"),
        g.tensor(&[10], "ac"),
    );
    let e = op::q_sample(
        &mut rec,
        &x0,
        &g.tensor(&[2, 5], "eps"),
        &ts,
        &ac,
        &g.tensor(&[2, 5], "xt"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("q_sample") && e.contains("`timesteps`"), "{e}");
    let e = op::q_sample(&mut rec, &x0, &x0, &g.tensor(&[2], "ts"), &ac, &x0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("share a buffer"), "{e}");
}

/// Inverted dropout: the mask is the reference Philox stream (bit-exact keep decisions), kept
/// values are scaled by 1/(1-p) (two f32 roundings, of the scale and of the product: rtol
/// 2.5e-7; a wrong keep decision would be off by the whole value), and the drop rate is p.
#[test]
fn dropout_matches_the_reference_mask() {
    use wgpu_diffusion::ops::noise::{dropout, dropout_threshold, write_rng_state};
    use wgpu_diffusion::reference::noise::random_u32;
    let g = gpu();
    let (seed, step, purpose, p) = (7u64, 3u32, 17u32, 0.3f32);
    for &(n, first) in &[(1usize, 0u32), (33, 5), (70_001, 1000)] {
        let x: Vec<f64> = random(n, 90).iter().map(|v| v + 2.0).collect();
        let tx = upload(&g, &[n], &x, "x");
        let ty = g.tensor(&[n], "y");
        let state = g.tensor(&[4], "rng");
        write_rng_state(&g, &state, seed, step).unwrap();
        run(&g, |rec| {
            dropout(rec, &state, purpose, first, p, &tx, &ty).unwrap()
        });
        let scale = (1.0f32 / (1.0 - p)) as f64;
        let threshold = dropout_threshold(p);
        let expect: Vec<f64> = (0..n)
            .map(|i| {
                if random_u32(seed, purpose, step, first + i as u32) >= threshold {
                    x[i] * scale
                } else {
                    0.0
                }
            })
            .collect();
        assert_close(
            &format!("dropout n={n}"),
            &read(&g, &ty),
            &expect,
            0.0,
            2.5e-7,
        );
        if n > 10_000 {
            let dropped = expect.iter().filter(|v| **v == 0.0).count() as f64 / n as f64;
            assert!(
                (dropped - p as f64).abs() < 0.01,
                "drop rate {dropped} for p = {p}"
            );
        }
    }
}
