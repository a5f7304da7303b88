//! `shaders/posterior.wgsl`: the VAE's diagonal Gaussian posterior, z = μ + exp(clamp(logvar,
//! −30, 20)/2)·ε from the encoder's moments (NHWC: μ in the first L channels, the log-variance
//! in the last L), and its backward to the moments; the KL divergence to N(0, I) averaged over
//! the batch, and its gradient.

use super::loss::sum_partials;
use super::{OpResult, expect_distinct, expect_numel, invalid, u32_of};
use crate::gpu::{KernelKey, Recorder, Tensor, grid_1d};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct PosteriorParams {
    pub n: u32,
    pub latent: u32,
    pub factor: f32,
    /// 1: the KL gradient is also multiplied by the GradScaler's scale (binding 7).
    pub scaled: u32,
}

/// Latent elements per workgroup of the KL's first stage (`CHUNK` in the shader).
pub const KL_CHUNK: usize = 256 * 8;

fn key(entry: &'static str) -> KernelKey {
    KernelKey::new("posterior", entry)
}

/// L for moments [B, .., 2L] (μ and the log-variance side by side on the last axis).
fn latent_channels(op: &str, moments: &Tensor) -> OpResult<usize> {
    let two_l = *moments.shape().last().unwrap_or(&0);
    if two_l == 0 || !two_l.is_multiple_of(2) || moments.shape().len() < 2 {
        return Err(invalid(format!(
            "{op}: `moments` (`{}`) {:?} must be [B, .., 2L]: an even, non-zero last axis (mean and log-variance)",
            moments.label(),
            moments.shape()
        )));
    }
    Ok(two_l / 2)
}

/// (elements of z, L) for moments [.., 2L] and z [.., L].
fn shape(op: &str, moments: &Tensor, z: &Tensor) -> OpResult<(usize, usize)> {
    let l = latent_channels(op, moments)?;
    expect_numel(op, "z", z, moments.numel() / 2)?;
    if z.shape().last() != Some(&l) {
        return Err(invalid(format!(
            "{op}: `z` (`{}`) {:?} must have {l} channels, half of the moments'",
            z.label(),
            z.shape()
        )));
    }
    Ok((z.numel(), l))
}

/// z = μ + σ·ε (ε = zeros gives the mode).
pub fn posterior_sample(
    rec: &mut Recorder,
    moments: &Tensor,
    eps: &Tensor,
    z: &Tensor,
) -> OpResult {
    const OP: &str = "posterior_sample";
    let (n, l) = shape(OP, moments, z)?;
    expect_numel(OP, "eps", eps, n)?;
    expect_distinct(OP, moments, z)?;
    expect_distinct(OP, eps, z)?;
    let p = PosteriorParams {
        n: u32_of(OP, "n", n)?,
        latent: l as u32,
        ..Default::default()
    };
    rec.dispatch(
        key("posterior_sample"),
        &p,
        &[(1, moments.into()), (2, eps.into()), (3, z.into())],
        grid_1d(n.div_ceil(256)),
    );
    Ok(())
}

/// dmoments = (dz, dz·ε·σ/2 inside the clamp, 0 outside), written over both halves.
pub fn posterior_sample_backward(
    rec: &mut Recorder,
    moments: &Tensor,
    eps: &Tensor,
    dz: &Tensor,
    dmoments: &Tensor,
) -> OpResult {
    const OP: &str = "posterior_sample_backward";
    let (n, l) = shape(OP, moments, dz)?;
    expect_numel(OP, "eps", eps, n)?;
    expect_numel(OP, "dmoments", dmoments, moments.numel())?;
    for t in [moments, eps, dz] {
        expect_distinct(OP, t, dmoments)?;
    }
    let p = PosteriorParams {
        n: u32_of(OP, "n", n)?,
        latent: l as u32,
        ..Default::default()
    };
    rec.dispatch(
        key("posterior_sample_backward"),
        &p,
        &[
            (1, moments.into()),
            (2, eps.into()),
            (4, dz.into()),
            (5, dmoments.into()),
        ],
        grid_1d(n.div_ceil(256)),
    );
    Ok(())
}

/// kl[0] = (1/B) Σ ½(μ² + exp(logvar) − 1 − logvar) over the batch's latents (`moments` [B, ..,
/// 2L]; diffusers' `posterior.kl()` per sample, averaged).
pub fn posterior_kl(rec: &mut Recorder, moments: &Tensor, kl: &Tensor) -> OpResult {
    const OP: &str = "posterior_kl";
    let latent = latent_channels(OP, moments)?;
    expect_numel(OP, "kl", kl, 1)?;
    expect_distinct(OP, moments, kl)?;
    let n = moments.numel() / 2;
    let groups = n.div_ceil(KL_CHUNK).max(1);
    let partials = rec.gpu.tensor(&[groups], "kl partials");
    let p = PosteriorParams {
        n: u32_of(OP, "n", n)?,
        latent: latent as u32,
        ..Default::default()
    };
    rec.dispatch(
        key("posterior_kl_partial"),
        &p,
        &[(1, moments.into()), (6, (&partials).into())],
        grid_1d(groups),
    );
    sum_partials(rec, &partials, moments.shape()[0] as f32, kl);
    Ok(())
}

/// dmoments += d(weight · kl)/d moments, with kl as [`posterior_kl`] computes it; with a
/// `loss_scale` (a GradScaler's state, its scale first) the gradient of weight · kl · scale, as
/// the rest of a scaled step's gradients are.
pub fn posterior_kl_backward(
    rec: &mut Recorder,
    moments: &Tensor,
    weight: f32,
    loss_scale: Option<&Tensor>,
    dmoments: &Tensor,
) -> OpResult {
    const OP: &str = "posterior_kl_backward";
    let latent = latent_channels(OP, moments)?;
    expect_numel(OP, "dmoments", dmoments, moments.numel())?;
    expect_distinct(OP, moments, dmoments)?;
    if let Some(scale) = loss_scale {
        expect_distinct(OP, scale, dmoments)?;
    }
    let n = moments.numel() / 2;
    let p = PosteriorParams {
        n: u32_of(OP, "n", n)?,
        latent: latent as u32,
        factor: (weight as f64 / moments.shape()[0] as f64) as f32,
        scaled: loss_scale.is_some() as u32,
    };
    let scale = loss_scale.cloned().unwrap_or_else(|| rec.dummy());
    rec.dispatch(
        key("posterior_kl_backward"),
        &p,
        &[
            (1, moments.into()),
            (5, dmoments.into()),
            (7, (&scale).into()),
        ],
        grid_1d(n.div_ceil(256)),
    );
    Ok(())
}
