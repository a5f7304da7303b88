//! `shaders/samplers.wgsl`: `scale_model_input` and the sampler updates (DDPM, DDIM,
//! DPM-Solver++ 2M, Euler/Heun). The per-step constants live in an 8-float `coeffs` tensor
//! written by the host before each submit ([`crate::diffusion::scheduler::Update::kernel_coeffs`]).

use super::diffusion::prediction_code;
use super::{OpResult, expect_distinct, expect_numel, invalid, u32_of};
use crate::diffusion::PredictionType;
use crate::diffusion::scheduler::SamplerKind;
use crate::gpu::{KernelKey, Recorder, Tensor, grid_1d};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SamplerParams {
    pub n: u32,
    pub prediction: u32,
    pub clip: u32,
    pub clip_range: f32,
    pub copies: u32,
    pub guidance: f32,
    pub per_image: u32,
    pub _pad: u32,
}

/// Elements of the per-step constants tensor.
pub const COEFFS_LEN: usize = crate::diffusion::scheduler::KERNEL_COEFFS;

fn key(entry: &'static str) -> KernelKey {
    KernelKey::new("samplers", entry)
}

/// out = x · coeffs[7] (diffusers' `scale_model_input`), written `copies` times one after the
/// other (out has `copies` × x's elements: the halves of a guided batch).
pub fn scale_model_input(
    rec: &mut Recorder,
    x: &Tensor,
    coeffs: &Tensor,
    out: &Tensor,
    copies: usize,
) -> OpResult {
    const OP: &str = "scale_model_input";
    let n = x.numel();
    if copies == 0 {
        return Err(invalid(format!("{OP}: copies must be at least 1")));
    }
    expect_numel(OP, "out", out, n * copies)?;
    expect_numel(OP, "coeffs", coeffs, COEFFS_LEN)?;
    expect_distinct(OP, x, out)?;
    expect_distinct(OP, coeffs, out)?;
    let p = SamplerParams {
        n: u32_of(OP, "n", n)?,
        copies: copies as u32,
        ..Default::default()
    };
    rec.dispatch(
        key(OP),
        &p,
        &[(3, coeffs.into()), (4, out.into()), (7, x.into())],
        grid_1d(n.div_ceil(256)),
    );
    Ok(())
}

/// Classifier-free guidance: out = u + s·(c − u), with `model_output` = [c; u] (twice out's
/// elements).
pub fn guidance_combine(
    rec: &mut Recorder,
    model_output: &Tensor,
    scale: f32,
    out: &Tensor,
) -> OpResult {
    const OP: &str = "guidance_combine";
    let n = out.numel();
    expect_numel(OP, "model_output", model_output, 2 * n)?;
    expect_distinct(OP, model_output, out)?;
    if !scale.is_finite() {
        return Err(invalid(format!(
            "{OP}: the guidance scale must be finite, is {scale}"
        )));
    }
    let p = SamplerParams {
        n: u32_of(OP, "n", n)?,
        guidance: scale,
        ..Default::default()
    };
    rec.dispatch(
        key(OP),
        &p,
        &[(1, model_output.into()), (4, out.into())],
        grid_1d(n.div_ceil(256)),
    );
    Ok(())
}

/// The state a sampler's update reads and writes besides x.
pub struct UpdateBuffers<'a> {
    /// The sample, updated in place.
    pub x: &'a Tensor,
    /// The model output (guided, where guidance applies).
    pub model_output: &'a Tensor,
    /// This step's fresh noise (DDPM, DDIM with η > 0; otherwise unread).
    pub z: &'a Tensor,
    /// The step's constants ([`COEFFS_LEN`] floats).
    pub coeffs: &'a Tensor,
    /// DPM-Solver: the previous x0 estimate; Heun: the saved sample. Zero it before a loop.
    pub aux0: &'a Tensor,
    /// Heun: the saved derivative; PLMS: the second-newest model output.
    pub aux1: &'a Tensor,
    /// PLMS: the third-newest model output.
    pub aux2: &'a Tensor,
    /// PLMS: the sample its first step started from.
    pub aux3: &'a Tensor,
}

/// Records the update of `kind` on `b.x`; `clip` is the clip_sample range, if the scheduler
/// clips.
pub fn sampler_update(
    rec: &mut Recorder,
    kind: SamplerKind,
    prediction: PredictionType,
    clip: Option<f32>,
    b: &UpdateBuffers,
) -> OpResult {
    let entry = match kind {
        SamplerKind::Ddpm => "ddpm_step",
        SamplerKind::Ddim => "ddim_step",
        SamplerKind::DpmSolverPp2m => "dpm_solver_step",
        SamplerKind::Euler | SamplerKind::Heun => "sigma_step",
        SamplerKind::Pc | SamplerKind::Ode => "ve_step",
        SamplerKind::Pndm => "plms_step",
    };
    let n = b.x.numel();
    for (what, t) in [
        ("model_output", b.model_output),
        ("z", b.z),
        ("aux0", b.aux0),
        ("aux1", b.aux1),
    ] {
        expect_numel(entry, what, t, n)?;
    }
    if kind == SamplerKind::Pndm {
        expect_numel(entry, "aux2", b.aux2, n)?;
        expect_numel(entry, "aux3", b.aux3, n)?;
    }
    expect_numel(entry, "coeffs", b.coeffs, COEFFS_LEN)?;
    for t in [
        b.model_output,
        b.z,
        b.coeffs,
        b.aux0,
        b.aux1,
        b.aux2,
        b.aux3,
    ] {
        expect_distinct(entry, t, b.x)?;
    }
    if let Some(r) = clip
        && !(r.is_finite() && r > 0.0)
    {
        return Err(invalid(format!(
            "{entry}: clip range must be positive, is {r}"
        )));
    }
    let p = SamplerParams {
        n: u32_of(entry, "n", n)?,
        prediction: prediction_code(prediction),
        clip: clip.is_some() as u32,
        clip_range: clip.unwrap_or(0.0),
        ..Default::default()
    };
    let mut bindings = vec![
        (1, b.model_output.into()),
        (3, b.coeffs.into()),
        (4, b.x.into()),
    ];
    match kind {
        SamplerKind::Ddpm | SamplerKind::Ddim => bindings.push((2, b.z.into())),
        SamplerKind::DpmSolverPp2m => bindings.push((5, b.aux0.into())),
        SamplerKind::Euler | SamplerKind::Heun => {
            bindings.push((5, b.aux0.into()));
            bindings.push((6, b.aux1.into()));
        }
        SamplerKind::Pc | SamplerKind::Ode => {
            bindings.push((2, b.z.into()));
            bindings.push((6, b.aux1.into()));
        }
        SamplerKind::Pndm => {
            bindings.push((5, b.aux0.into()));
            bindings.push((6, b.aux1.into()));
            bindings.push((10, b.aux2.into()));
            bindings.push((11, b.aux3.into()));
        }
    }
    if kind == SamplerKind::Pc {
        ve_step_size(rec, b)?;
    }
    rec.dispatch(key(entry), &p, &bindings, grid_1d(n.div_ceil(256)));
    Ok(())
}

/// The VE-SDE corrector's step size from the batch's score and noise norms into `aux1[0]`
/// (recorded before every predictor–corrector update; the predictor does not read it). The
/// images of the batch are `model_output.shape()[0]`.
fn ve_step_size(rec: &mut Recorder, b: &UpdateBuffers) -> OpResult {
    const OP: &str = "ve_step_size";
    let n = b.x.numel();
    let images = *b.x.shape().first().unwrap_or(&0);
    if images == 0 || !n.is_multiple_of(images) {
        return Err(invalid(format!(
            "{OP}: `{}` {:?} is not a batch of images",
            b.x.label(),
            b.x.shape()
        )));
    }
    let p = SamplerParams {
        n: u32_of(OP, "n", n)?,
        per_image: u32_of(OP, "per_image", n / images)?,
        ..Default::default()
    };
    rec.dispatch(
        key(OP),
        &p,
        &[
            (1, b.model_output.into()),
            (2, b.z.into()),
            (3, b.coeffs.into()),
            (6, b.aux1.into()),
        ],
        [1, 1, 1],
    );
    Ok(())
}

/// Inpainting: x ← keep·(coeffs[5]·known + coeffs[6]·z) + (1 − keep)·x, with `known` and `keep`
/// one image each, applied to every image of the batch.
pub fn inpaint_known(
    rec: &mut Recorder,
    x: &Tensor,
    z: &Tensor,
    coeffs: &Tensor,
    known: &Tensor,
    keep: &Tensor,
) -> OpResult {
    const OP: &str = "inpaint_known";
    let n = x.numel();
    let per = known.numel();
    expect_numel(OP, "z", z, n)?;
    expect_numel(OP, "keep", keep, per)?;
    expect_numel(OP, "coeffs", coeffs, COEFFS_LEN)?;
    if per == 0 || !n.is_multiple_of(per) {
        return Err(invalid(format!(
            "{OP}: the batch ({n} values) is not a whole number of images of {per}"
        )));
    }
    for t in [z, coeffs, known, keep] {
        expect_distinct(OP, t, x)?;
    }
    let p = SamplerParams {
        n: u32_of(OP, "n", n)?,
        per_image: u32_of(OP, "per_image", per)?,
        ..Default::default()
    };
    rec.dispatch(
        key(OP),
        &p,
        &[
            (2, z.into()),
            (3, coeffs.into()),
            (4, x.into()),
            (8, known.into()),
            (9, keep.into()),
        ],
        grid_1d(n.div_ceil(256)),
    );
    Ok(())
}

/// x ← coeffs[5]·x + coeffs[6]·z (RePaint's jump back up).
pub fn renoise(rec: &mut Recorder, x: &Tensor, z: &Tensor, coeffs: &Tensor) -> OpResult {
    const OP: &str = "renoise";
    let n = x.numel();
    expect_numel(OP, "z", z, n)?;
    expect_numel(OP, "coeffs", coeffs, COEFFS_LEN)?;
    expect_distinct(OP, z, x)?;
    expect_distinct(OP, coeffs, x)?;
    let p = SamplerParams {
        n: u32_of(OP, "n", n)?,
        ..Default::default()
    };
    rec.dispatch(
        key(OP),
        &p,
        &[(2, z.into()), (3, coeffs.into()), (4, x.into())],
        grid_1d(n.div_ceil(256)),
    );
    Ok(())
}
