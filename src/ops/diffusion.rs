//! `shaders/diffusion.wgsl`: v-prediction targets, min-SNR-γ weights, EDM's and the VE-SDE's
//! noise levels, inputs and targets for training (the sampler updates are in
//! `shaders/samplers.wgsl`).

use super::{OpResult, expect_distinct, expect_numel, invalid, u32_of};
use crate::diffusion::PredictionType;
use crate::gpu::{KernelKey, Recorder, Tensor, grid_1d};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DiffusionParams {
    pub n: u32,
    pub per_sample: u32,
    pub prediction: u32,
    pub _reserved: u32,
    pub gamma: f32,
    /// Per-kernel constants: EDM (P_mean, P_std, σ_d), VE-SDE (σ_min, σ_max, ε).
    pub k: [f32; 3],
}

fn key(entry: &'static str) -> KernelKey {
    KernelKey::new("diffusion", entry)
}

pub(crate) fn prediction_code(p: PredictionType) -> u32 {
    match p {
        PredictionType::Epsilon => 0,
        PredictionType::VPrediction => 1,
        PredictionType::Sample => 2,
    }
}

fn samples_of(op: &str, t: &Tensor) -> OpResult<(usize, usize)> {
    let b = *t.shape().first().unwrap_or(&0);
    if b == 0 || t.numel() == 0 {
        return Err(invalid(format!("{op}: `{}` is empty", t.label())));
    }
    Ok((b, t.numel() / b))
}

/// The shapes of a noised-input op (EDM's, the VE-SDE's): x0, noise, input and target alike,
/// one σ per sample, the outputs apart from everything; returns the values per sample.
fn check_noised(
    op: &str,
    x0: &Tensor,
    noise: &Tensor,
    sigmas: &Tensor,
    input: &Tensor,
    target: &Tensor,
) -> OpResult<usize> {
    let (b, per) = samples_of(op, x0)?;
    expect_numel(op, "noise", noise, x0.numel())?;
    expect_numel(op, "input", input, x0.numel())?;
    expect_numel(op, "target", target, x0.numel())?;
    expect_numel(op, "sigmas", sigmas, b)?;
    expect_distinct(op, input, target)?;
    for t in [x0, noise, sigmas] {
        expect_distinct(op, t, input)?;
        expect_distinct(op, t, target)?;
    }
    Ok(per)
}

/// target = √ᾱ_t·noise − √(1−ᾱ_t)·x0 per sample (timesteps u32 [B]).
pub fn v_target(
    rec: &mut Recorder,
    x0: &Tensor,
    noise: &Tensor,
    timesteps: &Tensor,
    alphas_cumprod: &Tensor,
    target: &Tensor,
) -> OpResult {
    const OP: &str = "v_target";
    let (b, per) = samples_of(OP, x0)?;
    expect_numel(OP, "noise", noise, x0.numel())?;
    expect_numel(OP, "target", target, x0.numel())?;
    expect_numel(OP, "timesteps", timesteps, b)?;
    for t in [x0, noise, timesteps, alphas_cumprod] {
        expect_distinct(OP, t, target)?;
    }
    let p = DiffusionParams {
        n: u32_of(OP, "n", x0.numel())?,
        per_sample: per as u32,
        ..Default::default()
    };
    rec.dispatch(
        key(OP),
        &p,
        &[
            (1, x0.into()),
            (2, noise.into()),
            (3, timesteps.into()),
            (4, alphas_cumprod.into()),
            (5, target.into()),
        ],
        grid_1d(x0.numel().div_ceil(256)),
    );
    Ok(())
}

/// weights[b] = min-SNR-γ weight of timesteps[b] for the prediction type.
pub fn min_snr_weights(
    rec: &mut Recorder,
    timesteps: &Tensor,
    alphas_cumprod: &Tensor,
    gamma: f32,
    prediction: PredictionType,
    weights: &Tensor,
) -> OpResult {
    const OP: &str = "min_snr_weights";
    let b = timesteps.numel();
    expect_numel(OP, "weights", weights, b)?;
    if gamma.is_nan() || gamma <= 0.0 {
        return Err(invalid(format!("{OP}: γ must be positive, is {gamma}")));
    }
    let p = DiffusionParams {
        n: u32_of(OP, "n", b)?,
        prediction: prediction_code(prediction),
        gamma,
        ..Default::default()
    };
    rec.dispatch(
        key(OP),
        &p,
        &[
            (3, timesteps.into()),
            (4, alphas_cumprod.into()),
            (5, weights.into()),
        ],
        [b.div_ceil(64) as u32, 1, 1],
    );
    Ok(())
}

/// EDM's training noise levels (Karras et al. 2022, Table 1): from standard normal draws u [B],
/// σ = exp(u·p_std + p_mean) into `sigmas` and the U-Net's timesteps c_noise = ¼ ln σ into
/// `timesteps` (f32 [B]).
pub fn edm_sigmas(
    rec: &mut Recorder,
    draws: &Tensor,
    p_mean: f32,
    p_std: f32,
    sigmas: &Tensor,
    timesteps: &Tensor,
) -> OpResult {
    const OP: &str = "edm_sigmas";
    let b = draws.numel();
    expect_numel(OP, "sigmas", sigmas, b)?;
    expect_numel(OP, "timesteps", timesteps, b)?;
    expect_distinct(OP, sigmas, timesteps)?;
    for t in [sigmas, timesteps] {
        expect_distinct(OP, draws, t)?;
    }
    if !(p_mean.is_finite() && p_std.is_finite() && p_std >= 0.0) {
        return Err(invalid(format!(
            "{OP}: P_mean must be finite and P_std finite and >= 0, are {p_mean} and {p_std}"
        )));
    }
    let p = DiffusionParams {
        n: u32_of(OP, "n", b)?,
        k: [p_mean, p_std, 0.0],
        ..Default::default()
    };
    rec.dispatch(
        key(OP),
        &p,
        &[(1, draws.into()), (5, sigmas.into()), (6, timesteps.into())],
        [b.div_ceil(64) as u32, 1, 1],
    );
    Ok(())
}

/// EDM's preconditioned input c_in·(x0 + σ·noise) and target (x0 − c_skip·(x0 + σ·noise))/c_out
/// per element, σ per sample (`sigmas` [B]): the MSE of the U-Net output to `target` is EDM's
/// λ(σ)-weighted denoising loss (see `shaders/diffusion.wgsl`).
pub fn edm_noised(
    rec: &mut Recorder,
    x0: &Tensor,
    noise: &Tensor,
    sigmas: &Tensor,
    sigma_data: f32,
    input: &Tensor,
    target: &Tensor,
) -> OpResult {
    const OP: &str = "edm_noised";
    let per = check_noised(OP, x0, noise, sigmas, input, target)?;
    if !(sigma_data.is_finite() && sigma_data > 0.0) {
        return Err(invalid(format!(
            "{OP}: σ_data must be finite and > 0, is {sigma_data}"
        )));
    }
    let p = DiffusionParams {
        n: u32_of(OP, "n", x0.numel())?,
        per_sample: per as u32,
        k: [0.0, 0.0, sigma_data],
        ..Default::default()
    };
    rec.dispatch(
        key(OP),
        &p,
        &[
            (1, x0.into()),
            (2, noise.into()),
            (5, input.into()),
            (6, target.into()),
            (7, sigmas.into()),
        ],
        grid_1d(x0.numel().div_ceil(256)),
    );
    Ok(())
}

/// The VE-SDE's training noise levels: from u32 draws in [0, 2^24) (`draws` [B]),
/// t ~ U(ε, 1) and σ = σ_min·(σ_max/σ_min)^t into `sigmas` (the U-Net's timesteps) and the loss
/// weights σ² into `weights`.
pub fn ve_sigmas(
    rec: &mut Recorder,
    draws: &Tensor,
    (sigma_min, sigma_max, eps): (f32, f32, f32),
    sigmas: &Tensor,
    weights: &Tensor,
) -> OpResult {
    const OP: &str = "ve_sigmas";
    let b = draws.numel();
    expect_numel(OP, "sigmas", sigmas, b)?;
    expect_numel(OP, "weights", weights, b)?;
    expect_distinct(OP, sigmas, weights)?;
    for t in [sigmas, weights] {
        expect_distinct(OP, draws, t)?;
    }
    let ok = sigma_min.is_finite() && sigma_min > 0.0 && sigma_max.is_finite();
    if !(ok && sigma_max > sigma_min && (0.0..1.0).contains(&eps)) {
        return Err(invalid(format!(
            "{OP}: need 0 < σ_min < σ_max and ε in [0, 1), are {sigma_min}, {sigma_max} and {eps}"
        )));
    }
    let p = DiffusionParams {
        n: u32_of(OP, "n", b)?,
        k: [sigma_min, sigma_max, eps],
        ..Default::default()
    };
    rec.dispatch(
        key(OP),
        &p,
        &[(3, draws.into()), (5, sigmas.into()), (6, weights.into())],
        [b.div_ceil(64) as u32, 1, 1],
    );
    Ok(())
}

/// The VE-SDE's perturbed input (½x0 + ½) + σ·z (data in [0, 1]) and score target −z/σ per
/// element, σ per sample (`sigmas` [B]).
pub fn ve_noised(
    rec: &mut Recorder,
    x0: &Tensor,
    noise: &Tensor,
    sigmas: &Tensor,
    input: &Tensor,
    target: &Tensor,
) -> OpResult {
    const OP: &str = "ve_noised";
    let per = check_noised(OP, x0, noise, sigmas, input, target)?;
    let p = DiffusionParams {
        n: u32_of(OP, "n", x0.numel())?,
        per_sample: per as u32,
        ..Default::default()
    };
    rec.dispatch(
        key(OP),
        &p,
        &[
            (1, x0.into()),
            (2, noise.into()),
            (5, input.into()),
            (6, target.into()),
            (7, sigmas.into()),
        ],
        grid_1d(x0.numel().div_ceil(256)),
    );
    Ok(())
}
