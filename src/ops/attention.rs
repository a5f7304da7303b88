//! `shaders/attention_subgroup.wgsl`: the core of multi-head attention, softmax(scale · Q Kᵀ) V,
//! forward and backward, fused into one kernel per pass for short sequences and small heads on
//! the subgroup GEMM path. Where it does not apply (the portable path, heads wider than
//! [`MAX_FUSED_HEAD_DIM`]), `nn::layers::AttentionBlock` runs the unfused GEMM + softmax + GEMM,
//! which is also the fused kernels' reference in the tests beside `reference::attention`.

use super::{OpResult, expect_distinct, expect_shape, invalid, u32_of};
use crate::gpu::{GemmPath, Gpu, KernelKey, Recorder, Tensor};

/// The widest head the fused kernels take: each lane holds a head's row of q, o (and of dO and
/// two gradients in the backward) in registers, 4 · DH4 floats each.
pub const MAX_FUSED_HEAD_DIM: usize = 32;

#[repr(C)]
#[derive(Clone, Copy, Default, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AttentionParams {
    pub tokens: u32,
    pub row_texels: u32,
    pub heads: u32,
    pub stat_rows: u32,
    pub scale: f32,
    pub _pad: [u32; 3],
}

/// The subgroup lanes when the fused kernels serve heads of `head_dim` over `channels`.
pub fn fused_lanes(gpu: &Gpu, head_dim: usize, channels: usize) -> Option<u32> {
    match gpu.gemm_path {
        GemmPath::Subgroup { lanes }
            if head_dim.is_multiple_of(4)
                && head_dim <= MAX_FUSED_HEAD_DIM
                && channels.is_multiple_of(head_dim)
                && channels >= head_dim =>
        {
            Some(lanes)
        }
        _ => None,
    }
}

/// Elements of the statistics buffer of an attention over `rows` = samples · heads · tokens
/// query rows: the log-sum-exp of each row, then D_i = dO_i · O_i.
pub fn stats_len(samples: usize, heads: usize, tokens: usize) -> usize {
    2 * samples * heads * tokens
}

struct Call {
    key_lanes: u32,
    head_dim: usize,
    params: AttentionParams,
    groups: [u32; 3],
}

impl Call {
    /// FLOPs of one of the unfused path's GEMMs (Q Kᵀ, P V or a gradient of either).
    fn gemm_flops(&self) -> f64 {
        2.0 * self.params.stat_rows as f64 * self.params.tokens as f64 * self.head_dim as f64
    }
}

/// Validates a pass: `q` and every other tensor `[samples · tokens, C]` but `stats`, and each
/// of `written` (bound read-write) in a buffer of its own, apart from every other binding.
#[allow(clippy::too_many_arguments)]
fn prepare(
    rec: &Recorder,
    op: &str,
    q: &Tensor,
    read: &[(&str, &Tensor)],
    written: &[(&str, &Tensor)],
    stats: &Tensor,
    tokens: usize,
    heads: usize,
    scale: f32,
) -> OpResult<Call> {
    let [rows, c] = *q.shape() else {
        return Err(invalid(format!(
            "{op}: `q` (`{}`) must be [samples · tokens, channels], got {:?}",
            q.label(),
            q.shape()
        )));
    };
    if tokens == 0 || heads == 0 || rows == 0 || rows % tokens != 0 || c % heads != 0 {
        return Err(invalid(format!(
            "{op}: `q` (`{}`) of shape {:?} does not split into {tokens} tokens per sample and {heads} heads",
            q.label(),
            q.shape()
        )));
    }
    let head_dim = c / heads;
    let Some(lanes) = fused_lanes(&rec.gpu, head_dim, c) else {
        return Err(invalid(format!(
            "{op}: the fused attention needs the subgroup GEMM path and a head width that is a multiple of 4 up to {MAX_FUSED_HEAD_DIM} (got {head_dim} on the {} path)",
            rec.gpu.gemm_path
        )));
    };
    for (what, t) in read.iter().chain(written) {
        expect_shape(op, what, t, &[rows, c])?;
    }
    let samples = rows / tokens;
    expect_shape(op, "stats", stats, &[stats_len(samples, heads, tokens)])?;
    // Inputs first, then the read-write bindings: each of those apart from every other.
    let bound: Vec<&Tensor> = std::iter::once(q)
        .chain(read.iter().map(|(_, t)| *t))
        .chain(std::iter::once(stats))
        .chain(written.iter().map(|(_, t)| *t))
        .collect();
    let first_written = 1 + read.len();
    for (i, out) in bound.iter().enumerate().skip(first_written) {
        for (j, other) in bound.iter().enumerate() {
            if j != i {
                expect_distinct(op, other, out)?;
            }
        }
    }
    let blocks = tokens.div_ceil(lanes as usize);
    let groups = [
        u32_of(op, "token blocks", blocks)?,
        u32_of(op, "samples x heads", samples * heads)?,
        1,
    ];
    if groups.iter().any(|&g| g > 65535) {
        return Err(crate::gpu::GpuError::TooLarge(format!(
            "{op}: {samples} samples x {heads} heads need {} workgroups, over the 65535 limit\n{}",
            groups[1],
            crate::gpu::FIT_ADVICE
        )));
    }
    Ok(Call {
        key_lanes: lanes,
        head_dim,
        params: AttentionParams {
            tokens: tokens as u32,
            row_texels: (c / 4) as u32,
            heads: heads as u32,
            stat_rows: u32_of(op, "stats", samples * heads * tokens)?,
            scale,
            _pad: [0; 3],
        },
        groups,
    })
}

fn key(entry: &'static str, call: &Call) -> KernelKey {
    kernel_key(entry, call.key_lanes, call.head_dim)
}

/// The kernel key of one entry point for `lanes` and `head_dim` (for the shader table's tests).
pub fn kernel_key(entry: &'static str, lanes: u32, head_dim: usize) -> KernelKey {
    KernelKey::new("attention_subgroup", entry)
        .template("L", lanes as i64)
        .template("DH4", (head_dim / 4) as i64)
}

/// o = softmax(scale · q kᵀ) v per sample and head, and each query row's log-sum-exp into the
/// first half of `stats` (for the backward). q, k, v, o: `[samples · tokens, heads · head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    rec: &mut Recorder,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    stats: &Tensor,
    tokens: usize,
    heads: usize,
    scale: f32,
) -> OpResult {
    const OP: &str = "attention_forward";
    let call = prepare(
        rec,
        OP,
        q,
        &[("k", k), ("v", v)],
        &[("o", o)],
        stats,
        tokens,
        heads,
        scale,
    )?;
    // Q Kᵀ and P V, as the unfused path's GEMMs count them.
    rec.add_flops(2.0 * call.gemm_flops());
    rec.dispatch(
        key("attention_forward", &call),
        &call.params,
        &[
            (1, q.into()),
            (2, k.into()),
            (3, v.into()),
            (4, o.into()),
            (5, stats.into()),
        ],
        call.groups,
    );
    Ok(())
}

/// dq, dk, dv (overwritten) of `attention_forward` for the upstream gradient `d_o`, from the
/// forward's `o` and `stats` (whose second half this pass fills with D_i = dO_i · O_i).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    rec: &mut Recorder,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    d_o: &Tensor,
    stats: &Tensor,
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    tokens: usize,
    heads: usize,
    scale: f32,
) -> OpResult {
    const OP: &str = "attention_backward";
    // o is bound read-write by the dQ pass (the forward's output binding).
    let call = prepare(
        rec,
        OP,
        q,
        &[("k", k), ("v", v), ("d_o", d_o)],
        &[("o", o), ("dq", dq), ("dk", dk), ("dv", dv)],
        stats,
        tokens,
        heads,
        scale,
    )?;
    // The unfused backward's four GEMMs (dP, dV, dQ, dK), as the benchmark counts them; the
    // fused passes also recompute the scores (twice) and dP (twice), not counted.
    rec.add_flops(4.0 * call.gemm_flops());
    rec.dispatch(
        key("attention_backward_dq", &call),
        &call.params,
        &[
            (1, q.into()),
            (2, k.into()),
            (3, v.into()),
            (4, o.into()),
            (5, stats.into()),
            (6, d_o.into()),
            (7, dq.into()),
        ],
        call.groups,
    );
    rec.dispatch(
        key("attention_backward_dkv", &call),
        &call.params,
        &[
            (1, q.into()),
            (2, k.into()),
            (3, v.into()),
            (5, stats.into()),
            (6, d_o.into()),
            (7, dk.into()),
            (8, dv.into()),
        ],
        call.groups,
    );
    Ok(())
}
