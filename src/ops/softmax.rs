//! `shaders/softmax.wgsl`: numerically stable softmax over the last axis, and its backward;
//! `shaders/softmax_subgroup.wgsl` on adapters whose GEMM path uses subgroups (one subgroup per
//! row, no workgroup memory: ~10× faster on lavapipe).

use super::{OpResult, expect_distinct, expect_shape, invalid, u32_of};
use crate::gpu::{GemmPath, KernelKey, Recorder, Tensor, grid_1d};

#[repr(C)]
#[derive(Clone, Copy, Default, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SoftmaxParams {
    pub rows: u32,
    pub len: u32,
    /// Threads per row (a power of two <= 64; portable kernels).
    pub tpr: u32,
    /// Rows per workgroup (subgroup kernels).
    pub rows_per_group: u32,
}

const WG: usize = 64;

/// Threads per row: about 8 columns per thread, a power of two from 1 to the workgroup's 64, so
/// short rows share a workgroup instead of leaving most of it idle.
fn threads_per_row(len: usize) -> usize {
    len.div_ceil(8).next_power_of_two().min(WG)
}

/// Elements a subgroup kernel's workgroup takes (whole rows): enough to amortise its start.
const SUBGROUP_ELEMENTS_PER_GROUP: usize = 1024;

/// The kernel and the workgroups for `p` on this adapter: the portable kernel takes 64 / tpr rows
/// per workgroup, the subgroup kernel `rows_per_group`. The third value: the subgroup kernel
/// reads whole texels (entry `…4`, vec4 bindings), for rows of a multiple of 4 elements in
/// `tensors` that start on 16-byte boundaries.
fn kernel(
    rec: &Recorder,
    entry: &'static str,
    p: &mut SoftmaxParams,
    tensors: &[&Tensor],
) -> (KernelKey, [u32; 3], bool) {
    match rec.gpu.gemm_path {
        GemmPath::Subgroup { lanes } => {
            let rows = SUBGROUP_ELEMENTS_PER_GROUP.div_ceil(p.len as usize).max(1);
            p.rows_per_group = rows as u32;
            let texels = super::whole_texels(&[p.len as usize], tensors);
            let entry = match (entry, texels) {
                ("softmax_forward", true) => "softmax_forward4",
                ("softmax_backward", true) => "softmax_backward4",
                _ => entry,
            };
            (
                KernelKey::new("softmax_subgroup", entry).constant("LANES", lanes as f64),
                grid_1d((p.rows as usize).div_ceil(rows)),
                texels,
            )
        }
        GemmPath::Portable => (
            KernelKey::new("softmax", entry),
            grid_1d((p.rows as usize).div_ceil(WG / p.tpr as usize)),
            false,
        ),
    }
}

/// Rows and row length of `t`: the last axis is the row (`[R, L]`, or any leading shape).
fn rows_of(op: &str, what: &str, t: &Tensor) -> OpResult<SoftmaxParams> {
    let len = t.shape().last().copied().unwrap_or(0);
    if len == 0 || t.numel() == 0 {
        return Err(invalid(format!(
            "{op}: `{what}` (`{}`) has an empty shape {:?}",
            t.label(),
            t.shape()
        )));
    }
    u32_of(op, &format!("numel of `{what}`"), t.numel())?;
    Ok(SoftmaxParams {
        rows: (t.numel() / len) as u32,
        len: len as u32,
        tpr: threads_per_row(len) as u32,
        rows_per_group: 0,
    })
}

/// y = softmax(x) along the last axis: y_i = exp(x_i - max x) / sum_j exp(x_j - max x).
pub fn softmax_forward(rec: &mut Recorder, x: &Tensor, y: &Tensor) -> OpResult {
    const OP: &str = "softmax_forward";
    let mut p = rows_of(OP, "x", x)?;
    expect_shape(OP, "y", y, x.shape())?;
    expect_distinct(OP, x, y)?;
    let (key, groups, texels) = kernel(rec, OP, &mut p, &[x, y]);
    let slots = if texels { [6, 7] } else { [1, 2] };
    rec.dispatch(
        key,
        &p,
        &[(slots[0], x.into()), (slots[1], y.into())],
        groups,
    );
    Ok(())
}

/// dx = y * (dy - sum_j dy_j y_j) along the last axis, from the forward output `y` (overwrites dx).
pub fn softmax_backward(rec: &mut Recorder, y: &Tensor, dy: &Tensor, dx: &Tensor) -> OpResult {
    const OP: &str = "softmax_backward";
    let mut p = rows_of(OP, "y", y)?;
    expect_shape(OP, "dy", dy, y.shape())?;
    expect_shape(OP, "dx", dx, y.shape())?;
    expect_distinct(OP, y, dx)?;
    expect_distinct(OP, dy, dx)?;
    let (key, groups, texels) = kernel(rec, OP, &mut p, &[y, dy, dx]);
    let slots = if texels { [8, 9, 10] } else { [3, 4, 5] };
    rec.dispatch(
        key,
        &p,
        &[
            (slots[0], y.into()),
            (slots[1], dy.into()),
            (slots[2], dx.into()),
        ],
        groups,
    );
    Ok(())
}
