//! `shaders/softmax.wgsl`: numerically stable softmax over the last axis, and its backward.

use super::{OpResult, expect_distinct, expect_shape, invalid, u32_of};
use crate::gpu::{KernelKey, Recorder, Tensor, grid_1d};

#[repr(C)]
#[derive(Clone, Copy, Default, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct SoftmaxParams {
    pub rows: u32,
    pub len: u32,
    /// Threads per row (a power of two <= 64).
    pub tpr: u32,
    pub _pad: u32,
}

const WG: usize = 64;

/// Threads per row: about 8 columns per thread, a power of two from 1 to the workgroup's 64, so
/// short rows share a workgroup instead of leaving most of it idle.
fn threads_per_row(len: usize) -> usize {
    len.div_ceil(8).next_power_of_two().min(WG)
}

/// Workgroups for `p`: 64 / tpr rows each.
fn groups(p: &SoftmaxParams) -> [u32; 3] {
    grid_1d((p.rows as usize).div_ceil(WG / p.tpr as usize))
}

fn key(entry: &'static str) -> KernelKey {
    KernelKey::new("softmax", entry)
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
        _pad: 0,
    })
}

/// y = softmax(x) along the last axis: y_i = exp(x_i - max x) / sum_j exp(x_j - max x).
pub fn softmax_forward(rec: &mut Recorder, x: &Tensor, y: &Tensor) -> OpResult {
    const OP: &str = "softmax_forward";
    let p = rows_of(OP, "x", x)?;
    expect_shape(OP, "y", y, x.shape())?;
    expect_distinct(OP, x, y)?;
    rec.dispatch(key(OP), &p, &[(1, x.into()), (2, y.into())], groups(&p));
    Ok(())
}

/// dx = y * (dy - sum_j dy_j y_j) along the last axis, from the forward output `y` (overwrites dx).
pub fn softmax_backward(rec: &mut Recorder, y: &Tensor, dy: &Tensor, dx: &Tensor) -> OpResult {
    const OP: &str = "softmax_backward";
    let p = rows_of(OP, "y", y)?;
    expect_shape(OP, "dy", dy, y.shape())?;
    expect_shape(OP, "dx", dx, y.shape())?;
    expect_distinct(OP, y, dx)?;
    expect_distinct(OP, dy, dx)?;
    rec.dispatch(
        key(OP),
        &p,
        &[(3, y.into()), (4, dy.into()), (5, dx.into())],
        groups(&p),
    );
    Ok(())
}
