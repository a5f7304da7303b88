//! `shaders/adamw.wgsl`: AdamW (torch.optim.AdamW semantics), the EMA of the weights
//! (diffusers `EMAModel`) and the global gradient norm with its clip factor
//! (torch.nn.utils.clip_grad_norm_), each one dispatch over the flat parameter buffer.
//!
//! Per-step values live in a small `hyper` tensor ([`AdamwHyper`], [`HYPER_LEN`] f32) that the
//! caller rewrites before each submit with [`write_hyper`] (a `queue.write_buffer`), so the
//! recorded plan is replayed unchanged. The gradient scale (clip factor) is element 0 of a
//! tensor, normally the `[clip, norm]` output of [`grad_norm`]; a tensor holding 1.0 disables it.

use super::{OpResult, expect_distinct, expect_numel, invalid, u32_of};
use crate::gpu::{Gpu, GpuError, KernelKey, Recorder, Tensor, grid_1d};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AdamwParams {
    pub n: u32,
    pub max_norm: f32,
    pub _pad: [u32; 2],
}

/// The `hyper` tensor's layout (the WGSL `Hyper` struct, same field order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AdamwHyper {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1 − lr·wd
    pub decay_mul: f32,
    /// lr / (1 − β1^t)
    pub step_size: f32,
    /// sqrt(1 − β2^t)
    pub bias_correction2_sqrt: f32,
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    /// 1 − EMA decay for this step ([`EmaConfig::get_decay`]).
    pub ema_one_minus_decay: f32,
    /// Non-zero: skip the step (AdamW and the EMA leave everything as is). The host writes 0;
    /// `grad_scaler_update` writes 1 when the gradients are not finite.
    pub skip: f32,
}

/// Elements of the `hyper` tensor.
pub const HYPER_LEN: usize = std::mem::size_of::<AdamwHyper>() / 4;

/// torch.optim.AdamW's constructor arguments (defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8,
/// weight_decay 1e-2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamwConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamwConfig {
    fn default() -> Self {
        AdamwConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl AdamwHyper {
    /// The values for optimizer step `step` (1-based, as torch's `state["step"]` after its
    /// increment) at learning rate `lr`, with EMA decay `ema_decay` (0 copies the weights).
    /// Scalars are formed in f64 like torch's Python floats, then rounded once to f32.
    pub fn new(cfg: &AdamwConfig, lr: f64, step: u32, ema_decay: f64) -> AdamwHyper {
        let t = step.max(1) as i32;
        let bias_correction1 = 1.0 - cfg.beta1.powi(t);
        let bias_correction2 = 1.0 - cfg.beta2.powi(t);
        AdamwHyper {
            lr: lr as f32,
            beta1: cfg.beta1 as f32,
            beta2: cfg.beta2 as f32,
            eps: cfg.eps as f32,
            weight_decay: cfg.weight_decay as f32,
            decay_mul: (1.0 - lr * cfg.weight_decay) as f32,
            step_size: (lr / bias_correction1) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            one_minus_beta1: (1.0 - cfg.beta1) as f32,
            one_minus_beta2: (1.0 - cfg.beta2) as f32,
            ema_one_minus_decay: (1.0 - ema_decay) as f32,
            skip: 0.0,
        }
    }
}

/// Uploads `hyper` into the hyper tensor (queued; takes effect at the next submit).
pub fn write_hyper(gpu: &Gpu, tensor: &Tensor, hyper: &AdamwHyper) -> Result<(), GpuError> {
    gpu.write(tensor, bytemuck::cast_slice(std::slice::from_ref(hyper)))
}

/// diffusers `EMAModel` settings (defaults as there: decay 0.9999, min_decay 0,
/// update_after_step 0, use_ema_warmup false, inv_gamma 1, power 2/3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EmaConfig {
    pub decay: f64,
    pub min_decay: f64,
    pub update_after_step: u64,
    pub use_ema_warmup: bool,
    pub inv_gamma: f64,
    pub power: f64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        EmaConfig {
            decay: 0.9999,
            min_decay: 0.0,
            update_after_step: 0,
            use_ema_warmup: false,
            inv_gamma: 1.0,
            power: 2.0 / 3.0,
        }
    }
}

impl EmaConfig {
    /// diffusers `EMAModel.get_decay(optimization_step)` (training_utils.py): with
    /// s = max(0, step − update_after_step − 1), 0 if s = 0, else
    /// 1 − (1 + s/inv_gamma)^−power (warmup, Karras-style) or (1 + s)/(10 + s), clamped to
    /// [min_decay, decay]. `EMAModel.step` increments its counter first, so the first update
    /// uses step 1 (decay 0: the EMA becomes a copy of the weights).
    pub fn get_decay(&self, optimization_step: u64) -> f64 {
        let step = optimization_step.saturating_sub(self.update_after_step + 1);
        if step == 0 {
            return 0.0;
        }
        let s = step as f64;
        let value = if self.use_ema_warmup {
            1.0 - (1.0 + s / self.inv_gamma).powf(-self.power)
        } else {
            (1.0 + s) / (10.0 + s)
        };
        value.min(self.decay).max(self.min_decay)
    }
}

const WG: usize = 256;
/// Elements per stage-1 workgroup of the gradient norm (`WG * ITEMS` in the shader).
pub const CHUNK: usize = 256 * 8;

fn key(entry: &'static str) -> KernelKey {
    KernelKey::new("adamw", entry)
}

fn expect_all_distinct(op: &str, tensors: &[(&str, &Tensor)]) -> OpResult {
    for (i, (wa, a)) in tensors.iter().enumerate() {
        for (wb, b) in &tensors[i + 1..] {
            if a.shares_buffer(b) {
                return Err(invalid(format!(
                    "{op}: `{wa}` (`{}`) and `{wb}` (`{}`) share a buffer; each needs its own",
                    a.label(),
                    b.label()
                )));
            }
        }
    }
    Ok(())
}

/// One AdamW step over the flat buffers: `params`, `grads`, `exp_avg` (m), `exp_avg_sq` (v) of
/// equal length; `hyper` of [`HYPER_LEN`] elements; gradients are multiplied by
/// `grad_scale[0]` (≥ 1 element).
pub fn adamw_step(
    rec: &mut Recorder,
    hyper: &Tensor,
    grad_scale: &Tensor,
    grads: &Tensor,
    params: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
) -> OpResult {
    const OP: &str = "adamw_step";
    let n = params.numel();
    expect_numel(OP, "grads", grads, n)?;
    expect_numel(OP, "exp_avg", exp_avg, n)?;
    expect_numel(OP, "exp_avg_sq", exp_avg_sq, n)?;
    expect_numel(OP, "hyper", hyper, HYPER_LEN)?;
    if grad_scale.numel() == 0 {
        return Err(invalid(format!(
            "{OP}: `grad_scale` (`{}`) is empty",
            grad_scale.label()
        )));
    }
    // Writable buffers must be distinct from each other and from every input.
    for out in [params, exp_avg, exp_avg_sq] {
        for input in [hyper, grad_scale, grads] {
            expect_distinct(OP, input, out)?;
        }
    }
    expect_all_distinct(
        OP,
        &[
            ("params", params),
            ("exp_avg", exp_avg),
            ("exp_avg_sq", exp_avg_sq),
        ],
    )?;
    let p = AdamwParams {
        n: u32_of(OP, "n", n)?,
        ..Default::default()
    };
    if super::whole_texels(&[n], &[grads, params, exp_avg, exp_avg_sq]) {
        rec.dispatch(
            key("adamw_step4"),
            &p,
            &[
                (1, hyper.into()),
                (12, grads.into()),
                (13, params.into()),
                (14, exp_avg.into()),
                (15, exp_avg_sq.into()),
                (6, grad_scale.into()),
            ],
            grid_1d((n / 4).div_ceil(WG)),
        );
        return Ok(());
    }
    rec.dispatch(
        key(OP),
        &p,
        &[
            (1, hyper.into()),
            (2, grads.into()),
            (3, params.into()),
            (4, exp_avg.into()),
            (5, exp_avg_sq.into()),
            (6, grad_scale.into()),
        ],
        grid_1d(n.div_ceil(WG)),
    );
    Ok(())
}

/// ema −= hyper.ema_one_minus_decay · (ema − params) (diffusers `EMAModel.step`).
pub fn ema_update(rec: &mut Recorder, hyper: &Tensor, params: &Tensor, ema: &Tensor) -> OpResult {
    const OP: &str = "ema_update";
    let n = params.numel();
    expect_numel(OP, "ema", ema, n)?;
    expect_numel(OP, "hyper", hyper, HYPER_LEN)?;
    expect_distinct(OP, params, ema)?;
    expect_distinct(OP, hyper, ema)?;
    let p = AdamwParams {
        n: u32_of(OP, "n", n)?,
        ..Default::default()
    };
    if super::whole_texels(&[n], &[params, ema]) {
        rec.dispatch(
            key("ema_update4"),
            &p,
            &[(1, hyper.into()), (16, ema.into()), (17, params.into())],
            grid_1d((n / 4).div_ceil(WG)),
        );
        return Ok(());
    }
    rec.dispatch(
        key(OP),
        &p,
        &[(1, hyper.into()), (7, ema.into()), (8, params.into())],
        grid_1d(n.div_ceil(WG)),
    );
    Ok(())
}

/// Records the global L2 norm of `grads` and torch's clip factor:
/// `out` = [min(1, max_norm / (norm + 1e-6)), norm] (2 elements; `max_norm` None: factor 1).
/// Deterministic two-stage sum of squares; allocates its partial-sum scratch tensor now.
pub fn grad_norm(
    rec: &mut Recorder,
    grads: &Tensor,
    max_norm: Option<f32>,
    out: &Tensor,
) -> OpResult {
    grad_norm_chunks(rec, std::slice::from_ref(grads), max_norm, out)
}

/// [`grad_norm`] over several tensors (the chunks of one flat gradient buffer that exceeds a
/// storage binding): each chunk writes its partial sums into its own 64-aligned slice of one
/// partials tensor (unused slots stay zero), and one finish pass sums them all in order.
pub fn grad_norm_chunks(
    rec: &mut Recorder,
    chunks: &[Tensor],
    max_norm: Option<f32>,
    out: &Tensor,
) -> OpResult {
    let one = rec
        .gpu
        .tensor_from(&[1], &[1.0], "grad norm: loss scale 1")?;
    grad_norm_unscaled(rec, chunks, max_norm, &one, out)
}

/// [`grad_norm_chunks`] of the gradients divided by `loss_scale[0]` (a GradScaler's scale,
/// element 0 of its state; `ops::grad_scaler`): the norm and clip factor torch's
/// `clip_grad_norm_` computes after `scaler.unscale_(optimizer)`. A non-finite gradient makes
/// the norm non-finite.
pub fn grad_norm_unscaled(
    rec: &mut Recorder,
    chunks: &[Tensor],
    max_norm: Option<f32>,
    loss_scale: &Tensor,
    out: &Tensor,
) -> OpResult {
    const OP: &str = "grad_norm";
    expect_numel(OP, "out", out, 2)?;
    if loss_scale.numel() == 0 {
        return Err(invalid(format!(
            "{OP}: `loss_scale` (`{}`) is empty",
            loss_scale.label()
        )));
    }
    if chunks.is_empty() {
        return Err(invalid(format!("{OP}: no gradient tensors")));
    }
    if let Some(m) = max_norm.filter(|m| !(*m > 0.0 && m.is_finite())) {
        return Err(invalid(format!(
            "{OP}: max_norm must be positive and finite, got {m}"
        )));
    }
    let slots: Vec<usize> = chunks
        .iter()
        .map(|g| g.numel().div_ceil(CHUNK).max(1).next_multiple_of(64))
        .collect();
    let partials = rec.gpu.tensor(&[slots.iter().sum()], "grad norm partials");
    let mut offset = 0;
    for (grads, &len) in chunks.iter().zip(&slots) {
        expect_distinct(OP, grads, out)?;
        let n = grads.numel();
        let groups = n.div_ceil(CHUNK).max(1);
        let view = partials.view(offset, &[len], "grad norm partials");
        let p = AdamwParams {
            n: u32_of(OP, "n", n)?,
            ..Default::default()
        };
        rec.dispatch(
            key("sumsq_partial"),
            &p,
            &[
                (2, grads.into()),
                (9, (&view).into()),
                (18, loss_scale.into()),
            ],
            grid_1d(groups),
        );
        offset += len;
    }
    let p2 = AdamwParams {
        n: u32_of(OP, "partials", offset)?,
        max_norm: max_norm.unwrap_or(0.0),
        ..Default::default()
    };
    rec.dispatch(
        key("grad_norm_finish"),
        &p2,
        &[(10, (&partials).into()), (11, out.into())],
        [1, 1, 1],
    );
    Ok(())
}
