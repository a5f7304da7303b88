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
    /// The label of the table view's first row (see [`embedding_add_forward`]).
    pub first: u32,
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
        first: 0,
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
    // A table larger than one storage binding is read in parts of whole rows, one dispatch
    // each; every label falls in exactly one part.
    let (rows, dim) = (p.rows as usize, p.dim as usize);
    let max = rec.gpu.limits.max_storage_buffer_binding_size as usize;
    let align = rec.gpu.limits.min_storage_buffer_offset_alignment as usize;
    // Parts start at row multiples of `step`, so every part's offset is bindable.
    let step = align / gcd(align, dim * 4);
    let part_rows = (max / (dim * 4)) / step * step;
    let part_rows = if rows * dim * 4 <= max {
        rows
    } else if part_rows > 0 && table.byte_offset().is_multiple_of(align as u64) {
        part_rows
    } else {
        return Err(invalid(format!(
            "{OP}: the table `{}` {:?} is larger than one storage binding ({max} bytes) and its rows cannot be bound in parts (offsets must be multiples of {align} bytes)",
            table.label(),
            table.shape()
        )));
    };
    for first in (0..rows).step_by(part_rows.max(1)) {
        let n = part_rows.min(rows - first);
        let part = table.view(first * dim, &[n, dim], table.label());
        let pp = EmbeddingParams {
            rows: n as u32,
            first: first as u32,
            ..p
        };
        rec.dispatch(
            key(OP),
            &pp,
            &[(1, labels.into()), (2, (&part).into()), (3, out.into())],
            [(p.batch * p.dim).div_ceil(64), 1, 1],
        );
    }
    Ok(())
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
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
