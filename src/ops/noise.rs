//! `shaders/noise.wgsl`: counter-based random numbers (Philox4x32-10) and the DDPM forward
//! process `q_sample`.
//!
//! # Random number mapping
//!
//! Every random value of a run is a pure function of four numbers: the run `seed` (u64), a
//! `purpose` (u32, which stream: timesteps, noise, …; see [`purpose`]), the training `step`
//! (u32) and the `index` (u32) of the element within that stream for that step. Philox4x32-10
//! (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) is evaluated with
//!
//! ```text
//! key     = (seed & 0xffff_ffff, seed >> 32)
//! counter = (index / 4, step, purpose, 0)
//! word    = philox4x32_10(counter, key)[index % 4]
//! ```
//!
//! Because the counter names the element, not the thread, a value never depends on the batch
//! size, the dispatch shape, the workgroup size or the thread count: computing a sub-range
//! (`first` > 0) gives exactly the values of the same indices in the whole range, and element
//! `i` of sample `b` in a [B, H, W, C] noise tensor is index `b·H·W·C + i` whatever B is.
//! Streams differ in at least one counter word, and Philox is a bijection of the counter for a
//! fixed key, so two (purpose, step, block) triples never share a block. The fourth counter word
//! is reserved (0). One stream holds at most 2^32 elements per step.
//!
//! * Uniform integers in [0, n): `floor(word · n / 2^32)` (multiply-high, Lemire 2019, without
//!   rejection). Each value has probability ⌊2^32/n⌋/2^32 or ⌈2^32/n⌉/2^32: a relative bias
//!   below n/2^32 (2.3e-7 for n = 1000 timesteps), far below sampling noise. `n = 0` returns
//!   the raw words. Bit-exact with [`crate::reference::noise::uniform_int`].
//! * Normals: Box–Muller on the block's word pairs (w0, w1) and (w2, w3): with
//!   u = ((w >> 8) + 1) / 2^24 ∈ (0, 1] and v = (w >> 8) / 2^24 ∈ [0, 1) (24-bit, exact in f32),
//!   r = sqrt(−2 ln u), θ = π(2v − 1) ∈ [−π, π), elements 4k..4k+3 are
//!   r₀cos θ₀, r₀sin θ₀, r₁cos θ₁, r₁sin θ₁. |z| ≤ sqrt(−2 ln 2^−24) ≈ 5.77.
//!   ln u is an atanh series for u ≥ 0.5 (GPU `log` is only absolutely accurate near 1, which
//!   would spoil the small radii) and `log` below.
//!   These use the GPU's `log`, `sin`, `cos`, so they match the f64 reference to a tolerance,
//!   not to the bit; they are bit-reproducible on one adapter and driver.
//!
//! The seed and step live in a 4-word state tensor ([`rng_state_words`]: seed lo, seed hi,
//! step, 0) that the caller rewrites each step with `queue.write_buffer` ([`write_rng_state`]),
//! so a recorded plan is replayed every step without rebuilding.

use super::{OpResult, expect_distinct, expect_numel, invalid, u32_of};
use crate::gpu::{Gpu, GpuError, KernelKey, Recorder, Tensor, grid_1d};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct NoiseParams {
    pub n: u32,
    pub first: u32,
    pub purpose: u32,
    pub range: u32,
    pub per_sample: u32,
    pub num_t: u32,
    /// dropout: bits of the f32 scale 1 / (1 − p).
    pub scale_bits: u32,
    pub _pad: u32,
}

/// Stream ids used by the trainer (the `purpose` counter word).
pub mod purpose {
    /// Diffusion timesteps of the batch, uniform in [0, T).
    pub const TIMESTEPS: u32 = 1;
    /// The ε added by `q_sample`.
    pub const NOISE: u32 = 2;
    /// Data-set shuffling and augmentation.
    pub const DATA: u32 = 3;
    /// Sampling (inference) noise.
    pub const SAMPLING: u32 = 4;
    /// Label dropout of class-conditional training (drawn on the host from the same stream).
    pub const CLASS_DROP: u32 = 5;
    /// The VAE posterior's ε (z = μ + σ·ε): in VAE training, and the frozen VAE of latent
    /// diffusion training.
    pub const VAE_EPS: u32 = 6;
    /// EDM training: the standard normal draw behind each sample's noise level
    /// (ln σ = P_mean + P_std·u).
    pub const EDM_SIGMA: u32 = 7;
    /// Text-conditional training: which of a label's caption templates a sample gets (drawn on
    /// the host; the caption dropout reuses CLASS_DROP's stream).
    pub const CAPTION: u32 = 8;
    /// Dropout masks: `DROPOUT_BASE + i` for the i-th dropout layer of the model.
    pub const DROPOUT_BASE: u32 = 16;
}

const WG: usize = 256;

fn key(entry: &'static str) -> KernelKey {
    KernelKey::new("noise", entry)
}

/// The RNG state tensor's contents: [seed lo, seed hi, step, 0].
pub fn rng_state_words(seed: u64, step: u32) -> [u32; 4] {
    [seed as u32, (seed >> 32) as u32, step, 0]
}

/// Writes the RNG state (a tensor of 4 elements) for `step`; queued, takes effect at the next
/// submit.
pub fn write_rng_state(gpu: &Gpu, state: &Tensor, seed: u64, step: u32) -> Result<(), GpuError> {
    gpu.write_u32(state, &rng_state_words(seed, step))
}

fn check_state(op: &str, state: &Tensor, out: &Tensor) -> OpResult {
    expect_numel(op, "state", state, 4)?;
    expect_distinct(op, state, out)
}

fn check_range(op: &str, out: &Tensor, first: u32) -> OpResult<u32> {
    let n = u32_of(op, "n", out.numel())?;
    if first as u64 + n as u64 > 1 << 32 {
        return Err(invalid(format!(
            "{op}: elements {first}..{} of the stream exceed the 2^32 elements of one (purpose, step)",
            first as u64 + n as u64
        )));
    }
    Ok(n)
}

/// out[i] (u32 words) = uniform integer in [0, range) of stream element `first + i`
/// (`range = 0`: raw 32-bit words). `state` holds [seed lo, seed hi, step, 0].
pub fn random_uniform_u32(
    rec: &mut Recorder,
    state: &Tensor,
    purpose: u32,
    first: u32,
    range: u32,
    out: &Tensor,
) -> OpResult {
    const OP: &str = "random_uniform_u32";
    check_state(OP, state, out)?;
    let n = check_range(OP, out, first)?;
    let p = NoiseParams {
        n,
        first,
        purpose,
        range,
        ..Default::default()
    };
    rec.dispatch(
        key(OP),
        &p,
        &[(1, state.into()), (2, out.into())],
        grid_1d((n as usize).div_ceil(WG)),
    );
    Ok(())
}

/// out[i] = standard normal (f32) of stream element `first + i` (Box–Muller, see the module doc).
pub fn random_normal(
    rec: &mut Recorder,
    state: &Tensor,
    purpose: u32,
    first: u32,
    out: &Tensor,
) -> OpResult {
    const OP: &str = "random_normal";
    check_state(OP, state, out)?;
    let n = check_range(OP, out, first)?;
    let p = NoiseParams {
        n,
        first,
        purpose,
        ..Default::default()
    };
    rec.dispatch(
        key(OP),
        &p,
        &[(1, state.into()), (3, out.into())],
        grid_1d((n as usize).div_ceil(WG)),
    );
    Ok(())
}

/// x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε per sample (Ho et al. 2020, eq. 4; diffusers
/// `DDPMScheduler.add_noise`). `x0`, `noise`, `x_t`: [B, ...]; `timesteps`: B u32 words;
/// `alphas_cumprod`: [T] f32. Timesteps ≥ T are clamped to T − 1 on the GPU.
pub fn q_sample(
    rec: &mut Recorder,
    x0: &Tensor,
    noise: &Tensor,
    timesteps: &Tensor,
    alphas_cumprod: &Tensor,
    x_t: &Tensor,
) -> OpResult {
    const OP: &str = "q_sample";
    let b = *x0
        .shape()
        .first()
        .ok_or_else(|| invalid(format!("{OP}: `x0` (`{}`) has rank 0", x0.label())))?;
    let n = x0.numel();
    if b == 0 || n == 0 {
        return Err(invalid(format!(
            "{OP}: `x0` (`{}`) is empty, shape {:?}",
            x0.label(),
            x0.shape()
        )));
    }
    expect_numel(OP, "noise", noise, n)?;
    expect_numel(OP, "x_t", x_t, n)?;
    expect_numel(OP, "timesteps", timesteps, b)?;
    if alphas_cumprod.numel() == 0 {
        return Err(invalid(format!(
            "{OP}: `alphas_cumprod` (`{}`) is empty",
            alphas_cumprod.label()
        )));
    }
    for (what, t) in [
        ("x0", x0),
        ("noise", noise),
        ("timesteps", timesteps),
        ("alphas_cumprod", alphas_cumprod),
    ] {
        expect_distinct(OP, t, x_t).map_err(|e| invalid(format!("{e} ({what})")))?;
    }
    let p = NoiseParams {
        n: u32_of(OP, "n", n)?,
        per_sample: u32_of(OP, "per_sample", n / b)?,
        num_t: u32_of(OP, "T", alphas_cumprod.numel())?,
        ..Default::default()
    };
    rec.dispatch(
        key(OP),
        &p,
        &[
            (3, x_t.into()),
            (4, x0.into()),
            (5, noise.into()),
            (6, timesteps.into()),
            (7, alphas_cumprod.into()),
        ],
        grid_1d(n.div_ceil(WG)),
    );
    Ok(())
}

/// Known-answer test entry: `input` holds 8 u32 words per vector (counter[4], key[2], 0, 0),
/// `out` receives 4 words per vector: Philox4x32-10(counter, key).
pub fn philox_kat(rec: &mut Recorder, input: &Tensor, out: &Tensor) -> OpResult {
    const OP: &str = "philox_kat";
    if !input.numel().is_multiple_of(8) {
        return Err(invalid(format!(
            "{OP}: `input` (`{}`) must hold 8 words per vector, has {}",
            input.label(),
            input.numel()
        )));
    }
    let vectors = input.numel() / 8;
    expect_numel(OP, "out", out, vectors * 4)?;
    expect_distinct(OP, input, out)?;
    let p = NoiseParams {
        n: u32_of(OP, "vectors", vectors)?,
        ..Default::default()
    };
    rec.dispatch(
        key(OP),
        &p,
        &[(1, input.into()), (2, out.into())],
        grid_1d(vectors.div_ceil(WG)),
    );
    Ok(())
}

/// The keep threshold of dropout with drop probability `p`: a word w keeps its element when
/// w ≥ threshold, so P(drop) = threshold / 2^32 = p to within 2^-32.
pub fn dropout_threshold(p: f32) -> u32 {
    ((p as f64) * 4_294_967_296.0).round().min(u32::MAX as f64) as u32
}

/// y = x · keep / (1 − p) (inverted dropout) with keep drawn from stream element `first + i`.
/// Applying it to dy with the same state, purpose and `first` gives the backward pass.
pub fn dropout(
    rec: &mut Recorder,
    state: &Tensor,
    purpose: u32,
    first: u32,
    p: f32,
    x: &Tensor,
    y: &Tensor,
) -> OpResult {
    const OP: &str = "dropout";
    if !(0.0..1.0).contains(&p) {
        return Err(invalid(format!(
            "{OP}: drop probability {p} must be in [0, 1)"
        )));
    }
    check_state(OP, state, y)?;
    let n = check_range(OP, y, first)?;
    expect_numel(OP, "x", x, n as usize)?;
    expect_distinct(OP, x, y)?;
    let params = NoiseParams {
        n,
        first,
        purpose,
        range: dropout_threshold(p),
        scale_bits: (1.0 / (1.0 - p)).to_bits(),
        ..Default::default()
    };
    rec.dispatch(
        key(OP),
        &params,
        &[(1, state.into()), (3, y.into()), (4, x.into())],
        grid_1d((n as usize).div_ceil(WG)),
    );
    Ok(())
}
