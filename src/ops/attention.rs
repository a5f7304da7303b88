//! `shaders/attention.wgsl` (portable) and `shaders/attention_subgroup.wgsl` (subgroup GEMM
//! path): the core of multi-head attention, softmax(scale · Q Kᵀ) V, forward and backward, fused
//! into one kernel per pass (no Tq × Tk matrix in memory): self-attention, cross-attention (keys
//! unlike the queries in number) and the causal mask of CLIP's text encoder. Where neither applies
//! (heads wider than [`MAX_FUSED_HEAD_DIM`] or not a multiple of 4), `nn::attention::AttentionCore`
//! runs the unfused GEMM + softmax + GEMM (`AttentionCore::unfused`, which the tests compare).

use super::{OpResult, expect_distinct, expect_shape, invalid, u32_of};
use crate::gpu::{GemmPath, Gpu, KernelKey, Recorder, Tensor};

/// The widest head the fused kernels take (SD 1.x's 160-wide heads at its 8 × 8 level): each
/// lane holds a head's row of q, o (and of dO and two gradients in the backward) in registers,
/// 4 · DH4 floats each.
pub const MAX_FUSED_HEAD_DIM: usize = 160;

/// One attention call: `samples` samples of `query_tokens` queries over `key_tokens` keys (unlike
/// the queries in cross-attention), `heads` heads; `causal`: query i sees keys j ≤ i only.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionShape {
    pub samples: usize,
    pub query_tokens: usize,
    pub key_tokens: usize,
    pub heads: usize,
    pub causal: bool,
}

impl AttentionShape {
    /// Self-attention over `tokens` tokens, unmasked.
    pub fn self_attention(samples: usize, tokens: usize, heads: usize) -> Self {
        AttentionShape {
            samples,
            query_tokens: tokens,
            key_tokens: tokens,
            heads,
            causal: false,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AttentionParams {
    pub q_tokens: u32,
    pub k_tokens: u32,
    pub row_texels: u32,
    pub heads: u32,
    pub stat_rows: u32,
    pub scale: f32,
    pub causal: u32,
    pub _pad: u32,
}

/// Which fused kernel runs an attention: the subgroup path's (`attention_subgroup.wgsl`, a
/// workgroup of one subgroup sharing key rows by broadcast) or the portable one
/// (`attention.wgsl`, [`PORTABLE_ROWS`] invocations sharing tiles of [`PORTABLE_TILE`] rows in
/// workgroup memory).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FusedKernel {
    Subgroup { lanes: u32 },
    Portable,
}

/// Invocations (query or key rows) per workgroup of the portable kernel.
pub const PORTABLE_ROWS: u32 = 64;
/// Rows per workgroup-memory tile of the portable kernel.
pub const PORTABLE_TILE: u32 = 16;

impl FusedKernel {
    /// Query (or key) rows one workgroup serves.
    fn rows(self) -> u32 {
        match self {
            FusedKernel::Subgroup { lanes } => lanes,
            FusedKernel::Portable => PORTABLE_ROWS,
        }
    }
}

/// Bytes of workgroup memory the portable kernel takes for heads of `head_dim`: two tiles of
/// rows and two floats per tile row.
pub fn portable_workgroup_bytes(head_dim: usize) -> u64 {
    let tile = PORTABLE_TILE as u64;
    2 * tile * head_dim as u64 * 4 + 2 * tile * 4
}

/// The fused kernel that serves heads of `head_dim` over `channels` on this adapter, if any:
/// head widths a multiple of 4 up to [`MAX_FUSED_HEAD_DIM`], and on the portable path enough
/// workgroup memory for the tiles.
pub fn fused_kernel(gpu: &Gpu, head_dim: usize, channels: usize) -> Option<FusedKernel> {
    if !head_dim.is_multiple_of(4)
        || head_dim > MAX_FUSED_HEAD_DIM
        || head_dim == 0
        || !channels.is_multiple_of(head_dim)
    {
        return None;
    }
    match gpu.gemm_path {
        GemmPath::Subgroup { lanes } => Some(FusedKernel::Subgroup { lanes }),
        GemmPath::Portable => {
            let limits = &gpu.limits;
            let fits = portable_workgroup_bytes(head_dim)
                <= limits.max_compute_workgroup_storage_size as u64
                && PORTABLE_ROWS <= limits.max_compute_invocations_per_workgroup;
            fits.then_some(FusedKernel::Portable)
        }
    }
}

/// Elements of the statistics buffer of an attention over `rows` = samples · heads · query
/// tokens: the log-sum-exp of each row, then D_i = dO_i · O_i.
pub fn stats_len(samples: usize, heads: usize, query_tokens: usize) -> usize {
    2 * samples * heads * query_tokens
}

struct Call {
    kernel: FusedKernel,
    head_dim: usize,
    params: AttentionParams,
    /// Workgroups over blocks of query rows (forward, dQ) and of key rows (dK, dV).
    query_groups: [u32; 3],
    key_groups: [u32; 3],
}

impl Call {
    /// FLOPs of one of the unfused path's GEMMs (Q Kᵀ, P V or a gradient of either).
    fn gemm_flops(&self) -> f64 {
        let p = &self.params;
        2.0 * p.stat_rows as f64 * p.k_tokens as f64 * self.head_dim as f64
    }
}

/// Which rows a bound tensor has: the queries' (q, o, dO, dQ) or the keys' (k, v, dK, dV).
#[derive(Clone, Copy, PartialEq)]
enum Rows {
    Query,
    Key,
}

/// A tensor of a pass: its name, itself, its rows, and whether the pass writes it.
type Bound<'a> = (&'static str, &'a Tensor, Rows, bool);

/// Validates a pass: `q` `[samples · Tq, C]`, each of `bound` `[samples · T, C]` for its rows,
/// `stats` [`stats_len`], and each written tensor in a buffer apart from every other binding.
fn prepare(
    rec: &Recorder,
    op: &str,
    shape: AttentionShape,
    q: &Tensor,
    bound: &[Bound],
    stats: &Tensor,
    scale: f32,
) -> OpResult<Call> {
    let AttentionShape {
        samples,
        query_tokens: tq,
        key_tokens: tk,
        heads,
        causal,
    } = shape;
    let [rows, c] = *q.shape() else {
        return Err(invalid(format!(
            "{op}: `q` (`{}`) must be [samples · tokens, channels], got {:?}",
            q.label(),
            q.shape()
        )));
    };
    if tq == 0 || tk == 0 || heads == 0 || rows != samples * tq || c % heads != 0 {
        return Err(invalid(format!(
            "{op}: `q` (`{}`) of shape {:?} does not split into {samples} samples of {tq} tokens and {heads} heads",
            q.label(),
            q.shape()
        )));
    }
    if causal && tq != tk {
        return Err(invalid(format!(
            "{op}: a causal mask needs as many keys as queries (got {tk} keys for {tq} queries)"
        )));
    }
    let head_dim = c / heads;
    let Some(kernel) = fused_kernel(&rec.gpu, head_dim, c) else {
        return Err(invalid(format!(
            "{op}: the fused attention needs a head width that is a multiple of 4 up to {MAX_FUSED_HEAD_DIM} (and on the portable path {} bytes of workgroup memory; got heads of {head_dim} on the {} path)",
            portable_workgroup_bytes(head_dim),
            rec.gpu.gemm_path
        )));
    };
    for &(what, t, side, _) in bound {
        let tokens = if side == Rows::Query { tq } else { tk };
        expect_shape(op, what, t, &[samples * tokens, c])?;
    }
    expect_shape(op, "stats", stats, &[stats_len(samples, heads, tq)])?;
    let all: Vec<(&Tensor, bool)> = std::iter::once((q, false))
        .chain(std::iter::once((stats, true)))
        .chain(bound.iter().map(|&(_, t, _, w)| (t, w)))
        .collect();
    for (i, &(out, written)) in all.iter().enumerate() {
        if !written {
            continue;
        }
        for (j, &(other, _)) in all.iter().enumerate() {
            if j != i {
                expect_distinct(op, other, out)?;
            }
        }
    }
    let block = kernel.rows() as usize;
    let pairs = u32_of(op, "samples x heads", samples * heads)?;
    if pairs > 65535 {
        return Err(crate::gpu::GpuError::TooLarge(format!(
            "{op}: {samples} samples x {heads} heads need {pairs} workgroups, over the 65535 limit\n{}",
            crate::gpu::FIT_ADVICE
        )));
    }
    Ok(Call {
        kernel,
        head_dim,
        params: AttentionParams {
            q_tokens: tq as u32,
            k_tokens: tk as u32,
            row_texels: (c / 4) as u32,
            heads: heads as u32,
            stat_rows: u32_of(op, "stats", samples * heads * tq)?,
            scale,
            causal: causal as u32,
            _pad: 0,
        },
        query_groups: [u32_of(op, "query blocks", tq.div_ceil(block))?, pairs, 1],
        key_groups: [u32_of(op, "key blocks", tk.div_ceil(block))?, pairs, 1],
    })
}

fn key(entry: &'static str, call: &Call) -> KernelKey {
    kernel_key(entry, call.kernel, call.head_dim)
}

/// The kernel key of one entry point of `kernel` for heads of `head_dim` (also for the shader
/// table's tests).
pub fn kernel_key(entry: &'static str, kernel: FusedKernel, head_dim: usize) -> KernelKey {
    let dh4 = (head_dim / 4) as i64;
    match kernel {
        FusedKernel::Subgroup { lanes } => KernelKey::new("attention_subgroup", entry)
            .template("L", lanes as i64)
            .template("ROWS", lanes as i64)
            .template("DH4", dh4),
        FusedKernel::Portable => KernelKey::new("attention", entry)
            .template("ROWS", PORTABLE_ROWS as i64)
            .template("TILE", PORTABLE_TILE as i64)
            .template("DH4", dh4),
    }
}

/// o = softmax(scale · q kᵀ) v per sample and head (masked when `shape.causal`), and each query
/// row's log-sum-exp into the first half of `stats` (for the backward). q, o:
/// `[samples · Tq, heads · head_dim]`; k, v: `[samples · Tk, heads · head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    rec: &mut Recorder,
    shape: AttentionShape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    stats: &Tensor,
    scale: f32,
) -> OpResult {
    const OP: &str = "attention_forward";
    let bound = [
        ("k", k, Rows::Key, false),
        ("v", v, Rows::Key, false),
        ("o", o, Rows::Query, true),
    ];
    let call = prepare(rec, OP, shape, q, &bound, stats, scale)?;
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
        call.query_groups,
    );
    Ok(())
}

/// The tensors of a backward pass: the forward's inputs and output, the upstream gradient and
/// the three gradients it writes (overwritten).
pub struct AttentionGrads<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub o: &'a Tensor,
    pub d_o: &'a Tensor,
    pub dq: &'a Tensor,
    pub dk: &'a Tensor,
    pub dv: &'a Tensor,
}

/// dq, dk, dv (overwritten) of `attention_forward` for the upstream gradient `d_o`, from the
/// forward's `o` and `stats` (whose second half this pass fills with D_i = dO_i · O_i).
pub fn attention_backward(
    rec: &mut Recorder,
    shape: AttentionShape,
    t: &AttentionGrads,
    stats: &Tensor,
    scale: f32,
) -> OpResult {
    const OP: &str = "attention_backward";
    // o is bound read-write by the dQ pass (the forward's output binding).
    let bound = [
        ("k", t.k, Rows::Key, false),
        ("v", t.v, Rows::Key, false),
        ("d_o", t.d_o, Rows::Query, false),
        ("o", t.o, Rows::Query, true),
        ("dq", t.dq, Rows::Query, true),
        ("dk", t.dk, Rows::Key, true),
        ("dv", t.dv, Rows::Key, true),
    ];
    let call = prepare(rec, OP, shape, t.q, &bound, stats, scale)?;
    // The unfused backward's four GEMMs (dP, dV, dQ, dK), as the benchmark counts them; the
    // fused passes also recompute the scores (twice) and dP (twice), not counted.
    rec.add_flops(4.0 * call.gemm_flops());
    rec.dispatch(
        key("attention_backward_dq", &call),
        &call.params,
        &[
            (1, t.q.into()),
            (2, t.k.into()),
            (3, t.v.into()),
            (4, t.o.into()),
            (5, stats.into()),
            (6, t.d_o.into()),
            (7, t.dq.into()),
        ],
        call.query_groups,
    );
    rec.dispatch(
        key("attention_backward_dkv", &call),
        &call.params,
        &[
            (1, t.q.into()),
            (2, t.k.into()),
            (3, t.v.into()),
            (5, stats.into()),
            (6, t.d_o.into()),
            (7, t.dk.into()),
            (8, t.dv.into()),
        ],
        call.key_groups,
    );
    Ok(())
}
