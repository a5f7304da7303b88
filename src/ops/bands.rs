//! Row bands: the forward of a convolution, a GroupNorm or a nearest upsampling whose NHWC
//! tensor is larger than one storage binding runs once per band of rows of one sample.
//!
//! A storage binding is far smaller than a buffer on some adapters (lavapipe: 128 MiB of a
//! 2 GiB buffer), and SD's VAE decoder at 512 × 512 holds 256 MiB activations (256 channels at
//! full size). NHWC keeps each sample's rows contiguous, so a band of rows is a plain view of
//! the same buffer, bound at an offset. What each op does with its bands is exact, not an
//! approximation (no tiling seams): a convolution reads its band's rows plus the halo its
//! kernel needs, with the padding only where the image really ends; a GroupNorm sums its
//! statistics over all bands before normalising any of them.

use super::{OpResult, invalid};
use crate::gpu::{Recorder, Tensor};

/// Whether one sample of the NHWC tensor `t` is larger than one storage binding of this
/// adapter, so that only bands of its rows can be bound. A batch whose samples fit one by one
/// is not split (a batch too large for a binding is refused with the advice to use a smaller
/// one, as before: splitting it per sample would record thousands of dispatches).
pub fn exceeds_binding(rec: &Recorder, t: &Tensor) -> bool {
    t.shape().len() == 4
        && t.shape()[0] > 0
        && t.byte_len() / t.shape()[0] as u64 > rec.gpu.limits.max_storage_buffer_binding_size
}

/// The largest binding, in bytes.
pub fn max_binding(rec: &Recorder) -> u64 {
    rec.gpu.limits.max_storage_buffer_binding_size
}

/// Rows `[r0, r1)` of sample `i` of an NHWC tensor, as a `[1, r1 - r0, W, C]` view.
pub fn rows(t: &Tensor, i: usize, r0: usize, r1: usize) -> Tensor {
    let [_, h, w, c] = [t.shape()[0], t.shape()[1], t.shape()[2], t.shape()[3]];
    t.view(
        (i * h + r0) * w * c,
        &[1, r1 - r0, w, c],
        &format!("{} rows {r0}..{r1} of sample {i}", t.label()),
    )
}

/// The rows per band of a banded op over `total` rows: the most that `fits` (its bindings
/// within the limit), evened out so the bands differ by at most one row. Errors, naming `op`
/// and `t`, when not even one row fits or a row of some of `tensors` cannot start a binding.
pub fn rows_per_band(
    rec: &Recorder,
    op: &str,
    tensors: &[&Tensor],
    total: usize,
    fits: impl Fn(usize) -> bool,
) -> OpResult<usize> {
    for t in tensors {
        expect_row_aligned(rec, op, t)?;
    }
    match (1..=total).take_while(|&r| fits(r)).last() {
        Some(rows) => Ok(total.div_ceil(total.div_ceil(rows))),
        None => Err(no_band_fits(rec, op, tensors[0])),
    }
}

/// Errors unless a band of any row of `t` can be bound: its rows must start at offsets the
/// adapter allows (`min_storage_buffer_offset_alignment`).
fn expect_row_aligned(rec: &Recorder, op: &str, t: &Tensor) -> OpResult {
    let row_bytes = (t.shape()[2] * t.shape()[3] * 4) as u64;
    let align = rec.gpu.limits.min_storage_buffer_offset_alignment as u64;
    if !t.byte_offset().is_multiple_of(align) || !row_bytes.is_multiple_of(align) {
        return Err(invalid(format!(
            "{op}: `{}` {:?} is larger than one storage binding ({} bytes) and its rows of {row_bytes} bytes cannot be bound one band at a time (offsets must be multiples of {align}); use smaller images",
            t.label(),
            t.shape(),
            max_binding(rec)
        )));
    }
    Ok(())
}

/// Errors when not even one row fits a binding.
fn no_band_fits(rec: &Recorder, op: &str, t: &Tensor) -> crate::gpu::GpuError {
    invalid(format!(
        "{op}: one row of `{}` {:?} is larger than a storage binding ({} bytes); use smaller images",
        t.label(),
        t.shape(),
        max_binding(rec)
    ))
}
