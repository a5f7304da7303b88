//! `shaders/embedding.wgsl`: a learned embedding row per label added to activations (class
//! conditioning), and its deterministic backward into the table's gradient.

use super::{OpResult, expect_distinct, expect_numel, expect_rank, invalid, u32_of};
use crate::gpu::{KernelKey, Recorder, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct EmbeddingParams {
    pub batch: u32,
    pub dim: u32,
    pub rows: u32,
    pub _pad: u32,
}

fn key(entry: &'static str) -> KernelKey {
    KernelKey::new("embedding", entry)
}

fn params(
    op: &str,
    labels: &Tensor,
    table: &Tensor,
    batch_rows: &Tensor,
) -> OpResult<EmbeddingParams> {
    expect_rank(op, "table", table, 2)?;
    expect_rank(op, "activations", batch_rows, 2)?;
    let (rows, dim) = (table.shape()[0], table.shape()[1]);
    let batch = batch_rows.shape()[0];
    if rows == 0 || dim == 0 {
        return Err(invalid(format!(
            "{op}: the table `{}` is empty",
            table.label()
        )));
    }
    if batch_rows.shape()[1] != dim {
        return Err(invalid(format!(
            "{op}: `{}` has {} columns, the table {dim}",
            batch_rows.label(),
            batch_rows.shape()[1]
        )));
    }
    expect_numel(op, "labels", labels, batch)?;
    Ok(EmbeddingParams {
        batch: u32_of(op, "batch", batch)?,
        dim: u32_of(op, "dim", dim)?,
        rows: u32_of(op, "rows", rows)?,
        _pad: 0,
    })
}

/// out[b, :] += table[labels[b], :] (labels: u32 [B]; table [rows, dim]; out [B, dim]).
pub fn embedding_add_forward(
    rec: &mut Recorder,
    labels: &Tensor,
    table: &Tensor,
    out: &Tensor,
) -> OpResult {
    const OP: &str = "embedding_add_forward";
    let p = params(OP, labels, table, out)?;
    expect_distinct(OP, labels, out)?;
    expect_distinct(OP, table, out)?;
    rec.dispatch(
        key(OP),
        &p,
        &[(1, labels.into()), (2, table.into()), (3, out.into())],
        [(p.batch * p.dim).div_ceil(64), 1, 1],
    );
    Ok(())
}

/// d_table[k, :] += Σ_{b: labels[b] = k} d_out[b, :], summed in ascending b.
pub fn embedding_backward(
    rec: &mut Recorder,
    labels: &Tensor,
    d_out: &Tensor,
    d_table: &Tensor,
) -> OpResult {
    const OP: &str = "embedding_backward";
    let p = params(OP, labels, d_table, d_out)?;
    expect_distinct(OP, labels, d_table)?;
    expect_distinct(OP, d_out, d_table)?;
    rec.dispatch(
        key(OP),
        &p,
        &[(1, labels.into()), (4, d_out.into()), (5, d_table.into())],
        [(p.rows * p.dim).div_ceil(64), 1, 1],
    );
    Ok(())
}
