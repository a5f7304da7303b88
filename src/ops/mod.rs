//! One module per shader: its parameter struct and the functions that record its dispatches,
//! named like the WGSL entry points. Every function validates shapes and aliasing first and
//! returns an error naming the op and the tensors, so a mistake never reaches wgpu validation.

pub mod adamw;
pub mod attention;
pub mod bands;
pub mod conv2d;
pub mod diffusion;
pub mod elementwise;
pub mod embedding;
pub mod gelu;
pub mod gemm;
pub mod grad_scaler;
pub mod group_norm;
pub mod layer_norm;
pub mod loss;
pub mod noise;
pub mod pack;
pub mod posterior;
pub mod reduce;
pub mod samplers;
pub mod softmax;
pub mod tiles;
pub mod timestep_embedding;
pub mod upsample;
pub mod variants;

use crate::gpu::{GpuError, Tensor};

pub type OpResult<T = ()> = Result<T, GpuError>;

pub(crate) fn invalid(msg: impl Into<String>) -> GpuError {
    GpuError::Invalid(msg.into())
}

/// Errors unless `t` has exactly `shape`.
pub(crate) fn expect_shape(op: &str, what: &str, t: &Tensor, shape: &[usize]) -> OpResult {
    if t.shape() != shape {
        return Err(invalid(format!(
            "{op}: `{what}` (`{}`) has shape {:?}, expected {:?}",
            t.label(),
            t.shape(),
            shape
        )));
    }
    Ok(())
}

/// Errors unless `t` has `n` elements.
pub(crate) fn expect_numel(op: &str, what: &str, t: &Tensor, n: usize) -> OpResult {
    if t.numel() != n {
        return Err(invalid(format!(
            "{op}: `{what}` (`{}`) has {} elements (shape {:?}), expected {n}",
            t.label(),
            t.numel(),
            t.shape()
        )));
    }
    Ok(())
}

/// Errors if an input and an output share a buffer (wgpu forbids binding one buffer read-only
/// and read-write in the same dispatch).
pub(crate) fn expect_distinct(op: &str, input: &Tensor, output: &Tensor) -> OpResult {
    if input.shares_buffer(output) {
        return Err(invalid(format!(
            "{op}: input `{}` and output `{}` share a buffer; use a separate output tensor",
            input.label(),
            output.label()
        )));
    }
    Ok(())
}

pub(crate) fn expect_rank(op: &str, what: &str, t: &Tensor, rank: usize) -> OpResult {
    if t.shape().len() != rank {
        return Err(invalid(format!(
            "{op}: `{what}` (`{}`) must have rank {rank}, has shape {:?}",
            t.label(),
            t.shape()
        )));
    }
    Ok(())
}

pub(crate) fn u32_of(op: &str, what: &str, v: usize) -> OpResult<u32> {
    u32::try_from(v).map_err(|_| invalid(format!("{op}: {what} = {v} does not fit in 32 bits")))
}

/// Whether a kernel's vec4 twin applies: every count, stride and offset (in elements) a multiple
/// of 4 and every buffer on a 16-byte boundary, so each invocation's 4 values are one texel.
pub(crate) fn whole_texels(counts: &[usize], tensors: &[&crate::gpu::Tensor]) -> bool {
    counts.iter().all(|c| c.is_multiple_of(4))
        && tensors.iter().all(|t| t.byte_offset().is_multiple_of(16))
}
