//! `shaders/posterior.wgsl`: the VAE's diagonal Gaussian posterior, z = μ + exp(clamp(logvar,
//! −30, 20)/2)·ε from the encoder's moments (NHWC: μ in the first L channels, the log-variance
//! in the last L), and its backward to the moments.

use super::{OpResult, expect_distinct, expect_numel, invalid, u32_of};
use crate::gpu::{KernelKey, Recorder, Tensor, grid_1d};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct PosteriorParams {
    pub n: u32,
    pub latent: u32,
    pub _pad: [u32; 2],
}

fn key(entry: &'static str) -> KernelKey {
    KernelKey::new("posterior", entry)
}

/// (elements of z, L) for moments [.., 2L] and z [.., L].
fn shape(op: &str, moments: &Tensor, z: &Tensor) -> OpResult<(usize, usize)> {
    let two_l = *moments.shape().last().unwrap_or(&0);
    if two_l == 0 || !two_l.is_multiple_of(2) {
        return Err(invalid(format!(
            "{op}: `moments` (`{}`) {:?} must have an even, non-zero last axis (mean and log-variance)",
            moments.label(),
            moments.shape()
        )));
    }
    let l = two_l / 2;
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
