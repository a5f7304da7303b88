//! `shaders/timestep_embedding.wgsl`: diffusers' `get_timestep_embedding` (scale 1,
//! max_period 10000) and `GaussianFourierProjection`. No backward: timesteps are not learned,
//! and the fourier weights are frozen.

use super::{OpResult, expect_distinct, expect_numel, expect_rank, invalid, u32_of};
use crate::gpu::{KernelKey, Recorder, Tensor, grid_1d};

#[repr(C)]
#[derive(Clone, Copy, Default, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct TimestepEmbeddingParams {
    pub batch: u32,
    pub dim: u32,
    pub half_dim: u32,
    pub flip: u32,
}

const WG: usize = 256;
pub const MAX_PERIOD: f64 = 10000.0;

/// freq_i = exp(-ln(max_period) * i / (half - shift)) for i < dim/2, computed step by step in
/// f32 as torch does (`arange(f32) * -ln(10000)`, `/ (half - shift)`, `exp`); the exp is the f64
/// one rounded to f32, i.e. correctly rounded in practice.
pub fn timestep_frequencies(dim: usize, downscale_freq_shift: f32) -> Vec<f32> {
    let half = dim / 2;
    let neg_log = -(MAX_PERIOD.ln()) as f32;
    let denom = (half as f64 - downscale_freq_shift as f64) as f32;
    (0..half)
        .map(|i| (((i as f32 * neg_log) / denom) as f64).exp() as f32)
        .collect()
}

/// out [B, dim] = [sin(t * freq), cos(t * freq)] (or [cos, sin] when `flip_sin_to_cos`), with a
/// zero last column when dim is odd, for `timesteps` [B] (fractional values allowed).
///
/// The frequency table is uploaded into a small tensor when this is recorded.
pub fn timestep_embedding(
    rec: &mut Recorder,
    timesteps: &Tensor,
    out: &Tensor,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f32,
) -> OpResult {
    const OP: &str = "timestep_embedding";
    expect_rank(OP, "out", out, 2)?;
    let (batch, dim) = (out.shape()[0], out.shape()[1]);
    if batch == 0 || dim == 0 {
        return Err(invalid(format!(
            "{OP}: `out` (`{}`) has an empty shape {:?}",
            out.label(),
            out.shape()
        )));
    }
    expect_numel(OP, "timesteps", timesteps, batch)?;
    expect_distinct(OP, timesteps, out)?;
    let half = dim / 2;
    let denom = (half as f64 - downscale_freq_shift as f64) as f32;
    if half > 0 && !(denom.is_finite() && denom != 0.0) {
        return Err(invalid(format!(
            "{OP}: dim / 2 - downscale_freq_shift = {half} - {downscale_freq_shift} must be finite and non-zero"
        )));
    }
    let p = TimestepEmbeddingParams {
        batch: u32_of(OP, "B", batch)?,
        dim: u32_of(OP, "dim", dim)?,
        half_dim: half as u32,
        flip: flip_sin_to_cos as u32,
    };
    u32_of(OP, "numel of `out`", out.numel())?;
    let mut table = timestep_frequencies(dim, downscale_freq_shift);
    table.resize(half.max(1), 0.0); // never an empty buffer (dim = 1 writes only the pad column)
    let freqs = rec
        .gpu
        .tensor_from(&[table.len()], &table, "timestep_embedding.freqs")?;
    rec.dispatch(
        KernelKey::new("timestep_embedding", OP),
        &p,
        &[(1, timesteps.into()), (2, (&freqs).into()), (3, out.into())],
        grid_1d(out.numel().div_ceil(WG)),
    );
    Ok(())
}

/// out [B, 2·half] = [sin(v), cos(v)] with v = ln(t)·w·2π (diffusers' GaussianFourierProjection,
/// log = True; [cos, sin] when `flip_sin_to_cos`) for `timesteps` [B] (σ, positive) and the
/// frozen weights `w` [half].
pub fn fourier_embedding(
    rec: &mut Recorder,
    timesteps: &Tensor,
    weights: &Tensor,
    out: &Tensor,
    flip_sin_to_cos: bool,
) -> OpResult {
    const OP: &str = "fourier_embedding";
    expect_rank(OP, "out", out, 2)?;
    let (batch, dim) = (out.shape()[0], out.shape()[1]);
    let half = weights.numel();
    if batch == 0 || half == 0 || dim != 2 * half {
        return Err(invalid(format!(
            "{OP}: `out` {:?} must be [B, 2 x {half}] for {half} weights",
            out.shape()
        )));
    }
    expect_numel(OP, "timesteps", timesteps, batch)?;
    expect_distinct(OP, timesteps, out)?;
    expect_distinct(OP, weights, out)?;
    let p = TimestepEmbeddingParams {
        batch: u32_of(OP, "B", batch)?,
        dim: u32_of(OP, "dim", dim)?,
        half_dim: half as u32,
        flip: flip_sin_to_cos as u32,
    };
    u32_of(OP, "numel of `out`", out.numel())?;
    rec.dispatch(
        KernelKey::new("timestep_embedding", OP),
        &p,
        &[(1, timesteps.into()), (2, weights.into()), (3, out.into())],
        grid_1d(out.numel().div_ceil(WG)),
    );
    Ok(())
}
