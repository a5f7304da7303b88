//! `shaders/layer_norm.wgsl`: LayerNorm over the last dimension (torch.nn.LayerNorm(C) with an
//! elementwise affine), the norm of CLIP's encoder layers and of the U-Net's transformer blocks.
//!
//! Forward is one dispatch (a workgroup per row) that also saves (mean, rstd) per row. Backward
//! is one dispatch for dx and, for dγ and dβ, per-chunk column partials summed in chunk order by
//! `reduce::sum_slices`: bitwise reproducible, no atomics. Parameter gradients accumulate (`+=`),
//! as every parameter gradient of the step does.

use super::{OpResult, expect_distinct, expect_numel, invalid, reduce, u32_of};
use crate::gpu::{KernelKey, Recorder, Tensor, grid_1d};

#[repr(C)]
#[derive(Clone, Copy, Default, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LayerNormParams {
    pub rows: u32,
    pub cols: u32,
    pub eps: f32,
    /// Backward: 1 adds into dx instead of overwriting it.
    pub add_dx: u32,
    /// Parameter partials: rows per chunk and the number of chunks.
    pub chunk: u32,
    pub chunks: u32,
    pub _pad: [u32; 2],
}

const OP: &str = "layer_norm";
/// Rows each invocation of the parameter-gradient partials sums.
const PARTIAL_ROWS: usize = 64;
/// Invocations per workgroup of `layer_norm_param_partials`.
const PARTIAL_WG: usize = 64;

/// Rows at most this wide are normalized one invocation per row (`*_rows` entries), wider ones
/// one workgroup per row (see the shader's header).
pub const ROWS_MAX_COLS: usize = 512;
/// Rows per workgroup of the `*_rows` entries.
const ROWS_WG: usize = 64;

fn key(entry: &'static str) -> KernelKey {
    KernelKey::new("layer_norm", entry)
}

/// The entry (per-row workgroups, or the `_rows` variant for narrow rows) and its grid.
fn row_entry(
    wide: &'static str,
    narrow: &'static str,
    rows: usize,
    cols: usize,
) -> (KernelKey, [u32; 3]) {
    if cols <= ROWS_MAX_COLS {
        (key(narrow), grid_1d(rows.div_ceil(ROWS_WG)))
    } else {
        (key(wide), grid_1d(rows))
    }
}

/// (rows, cols) of `x` normalized over its last `cols` = γ's length, checked against the
/// other operands.
fn dims(x: &Tensor, gamma: &Tensor, eps: f32) -> OpResult<(usize, usize)> {
    let cols = gamma.numel();
    if cols == 0 || x.numel() == 0 || !x.numel().is_multiple_of(cols) {
        return Err(invalid(format!(
            "{OP}: `{}` {:?} does not split into rows of γ's {cols} values",
            x.label(),
            x.shape()
        )));
    }
    if x.shape().last() != Some(&cols) {
        return Err(invalid(format!(
            "{OP}: `{}` {:?} must end in the normalized dimension {cols}",
            x.label(),
            x.shape()
        )));
    }
    if !(eps.is_finite() && eps > 0.0) {
        return Err(invalid(format!(
            "{OP}: eps must be finite and > 0, is {eps}"
        )));
    }
    Ok((x.numel() / cols, cols))
}

/// The per-row statistics buffer LayerNorm's forward fills and its backward reads.
pub fn stats_tensor(rec: &Recorder, x: &Tensor, cols: usize, label: &str) -> Tensor {
    rec.gpu.tensor(&[x.numel() / cols.max(1), 2], label)
}

/// y = LayerNorm(x)·γ + β over the last dimension; `stats` [rows, 2] receives (mean, rstd).
pub fn layer_norm_forward(
    rec: &mut Recorder,
    x: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    eps: f32,
    y: &Tensor,
    stats: &Tensor,
) -> OpResult {
    let (rows, cols) = dims(x, gamma, eps)?;
    expect_numel(OP, "beta", beta, cols)?;
    expect_numel(OP, "y", y, x.numel())?;
    expect_numel(OP, "stats", stats, 2 * rows)?;
    expect_distinct(OP, x, y)?;
    let p = LayerNormParams {
        rows: u32_of(OP, "rows", rows)?,
        cols: u32_of(OP, "cols", cols)?,
        eps,
        ..Default::default()
    };
    let (entry, grid) = row_entry("layer_norm_forward", "layer_norm_forward_rows", rows, cols);
    rec.dispatch(
        entry,
        &p,
        &[
            (1, x.into()),
            (2, gamma.into()),
            (3, beta.into()),
            (4, y.into()),
            (5, stats.into()),
        ],
        grid,
    );
    Ok(())
}

/// The gradients LayerNorm's backward writes: dx (overwritten, or added to when `add_dx`) and
/// dγ, dβ (always accumulated).
pub struct LayerNormGrads<'a> {
    pub dx: &'a Tensor,
    pub add_dx: bool,
    pub dgamma: &'a Tensor,
    pub dbeta: &'a Tensor,
}

/// Backward of [`layer_norm_forward`] from dy, with the forward's `stats`.
pub fn layer_norm_backward(
    rec: &mut Recorder,
    x: &Tensor,
    gamma: &Tensor,
    stats: &Tensor,
    dy: &Tensor,
    grads: &LayerNormGrads,
) -> OpResult {
    let (rows, cols) = dims(x, gamma, 1.0)?;
    expect_numel(OP, "stats", stats, 2 * rows)?;
    expect_numel(OP, "dy", dy, x.numel())?;
    expect_numel(OP, "dx", grads.dx, x.numel())?;
    expect_numel(OP, "dgamma", grads.dgamma, cols)?;
    expect_numel(OP, "dbeta", grads.dbeta, cols)?;
    expect_distinct(OP, dy, grads.dx)?;
    let chunks = rows.div_ceil(PARTIAL_ROWS);
    if chunks > 65535 {
        return Err(invalid(format!(
            "{OP}: {rows} rows exceed {} (the partial sums' grid)",
            65535 * PARTIAL_ROWS
        )));
    }
    let mut p = LayerNormParams {
        rows: u32_of(OP, "rows", rows)?,
        cols: u32_of(OP, "cols", cols)?,
        eps: 1.0,
        add_dx: grads.add_dx as u32,
        chunk: PARTIAL_ROWS as u32,
        chunks: chunks as u32,
        ..Default::default()
    };
    let narrow = "layer_norm_backward_dx_rows";
    let (entry, grid) = row_entry("layer_norm_backward_dx", narrow, rows, cols);
    rec.dispatch(
        entry,
        &p,
        &[
            (1, x.into()),
            (2, gamma.into()),
            (5, stats.into()),
            (6, dy.into()),
            (7, grads.dx.into()),
        ],
        grid,
    );
    p.add_dx = 0;
    let dgamma_partials = rec.gpu.tensor(&[chunks, cols], "layer_norm dγ partials");
    let dbeta_partials = rec.gpu.tensor(&[chunks, cols], "layer_norm dβ partials");
    rec.dispatch(
        key("layer_norm_param_partials"),
        &p,
        &[
            (1, x.into()),
            (5, stats.into()),
            (6, dy.into()),
            (8, (&dgamma_partials).into()),
            (9, (&dbeta_partials).into()),
        ],
        [cols.div_ceil(PARTIAL_WG) as u32, chunks as u32, 1],
    );
    reduce::sum_slices(
        rec,
        &dgamma_partials,
        chunks,
        cols,
        cols,
        grads.dgamma,
        true,
    )?;
    reduce::sum_slices(rec, &dbeta_partials, chunks, cols, cols, grads.dbeta, true)
}
