//! `shaders/reduce.wgsl`: deterministic slice sums (bias gradients, split-K partials).

use super::{OpResult, expect_distinct, expect_numel, invalid, u32_of};
use crate::gpu::{KernelKey, Recorder, Tensor};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ReduceParams {
    pub n: u32,
    pub slices: u32,
    pub stride: u32,
    pub chunk: u32,
    pub out_stride: u32,
    pub beta: f32,
    /// 1: each term is rounded to f16 before it is added (the bias gradients of a
    /// half-precision run).
    pub round_half: u32,
    pub _pad: u32,
}

/// Records one slice-sum pass over `groups` output groups: 4 columns per invocation
/// (`sum_slices4`) when the columns, strides and offsets are whole texels, else one.
fn dispatch_sums(rec: &mut Recorder, p: &ReduceParams, src: &Tensor, dst: &Tensor, groups: u32) {
    let counts = [p.n, p.stride, p.out_stride].map(|v| v as usize);
    if super::whole_texels(&counts, &[src, dst]) {
        rec.dispatch(
            KernelKey::new("reduce", "sum_slices4"),
            p,
            &[(3, src.into()), (4, dst.into())],
            [(p.n / 4).div_ceil(16), groups, 1],
        );
    } else {
        rec.dispatch(
            KernelKey::new("reduce", "sum_slices"),
            p,
            &[(1, src.into()), (2, dst.into())],
            [p.n.div_ceil(64), groups, 1],
        );
    }
}

/// out[j] (+)= Σ_{s < slices} src[s·stride + j] for j < n, one pass (fixed order).
pub fn sum_slices(
    rec: &mut Recorder,
    src: &Tensor,
    slices: usize,
    stride: usize,
    n: usize,
    out: &Tensor,
    accumulate: bool,
) -> OpResult {
    sum_terms(rec, (src, slices, stride, n), out, accumulate, false)
}

/// [`sum_slices`] of `(src, slices, stride, n)`, each term rounded to f16 first with
/// `round_half`.
fn sum_terms(
    rec: &mut Recorder,
    (src, slices, stride, n): (&Tensor, usize, usize, usize),
    out: &Tensor,
    accumulate: bool,
    round_half: bool,
) -> OpResult {
    const OP: &str = "sum_slices";
    if slices == 0 || n == 0 {
        return Err(invalid(format!(
            "{OP}: nothing to sum ({slices} slices of {n})"
        )));
    }
    if (slices - 1) * stride + n > src.numel() {
        return Err(invalid(format!(
            "{OP}: `{}` ({} elements) is too small for {slices} slices of {n} at stride {stride}",
            src.label(),
            src.numel()
        )));
    }
    expect_numel(OP, "out", out, n)?;
    expect_distinct(OP, src, out)?;
    let p = ReduceParams {
        n: u32_of(OP, "n", n)?,
        slices: u32_of(OP, "slices", slices)?,
        stride: u32_of(OP, "stride", stride)?,
        chunk: slices as u32,
        out_stride: 0,
        beta: if accumulate { 1.0 } else { 0.0 },
        round_half: round_half as u32,
        ..Default::default()
    };
    dispatch_sums(rec, &p, src, out, 1);
    Ok(())
}

/// Column sums of a row-major [rows, cols] matrix: out[c] (+)= Σ_r m[r, c]. Long columns are
/// summed in two fixed-order stages (chunks of rows, then the chunk partials) for parallelism.
/// The bias gradients of the GEMMs and convolutions: with half-precision operands
/// ([`Recorder::half_operands`]) each dY term is rounded to f16 as the weight gradient's GEMM
/// reads it (the subgroup conv kernel that sums the bias beside dW sums its f16 texels too).
pub fn sum_rows(
    rec: &mut Recorder,
    m: &Tensor,
    rows: usize,
    cols: usize,
    out: &Tensor,
    accumulate: bool,
) -> OpResult {
    const OP: &str = "sum_rows";
    expect_numel(OP, "matrix", m, rows * cols)?;
    let chunk = 64;
    let round_half = rec.half_operands();
    if rows <= 2 * chunk {
        return sum_terms(rec, (m, rows, cols, cols), out, accumulate, round_half);
    }
    let groups = rows.div_ceil(chunk);
    let partial = rec.gpu.tensor(&[groups, cols], "sum_rows partials");
    let p = ReduceParams {
        n: u32_of(OP, "cols", cols)?,
        slices: u32_of(OP, "rows", rows)?,
        stride: cols as u32,
        chunk: chunk as u32,
        out_stride: cols as u32,
        beta: 0.0,
        round_half: round_half as u32,
        ..Default::default()
    };
    if groups > 65535 {
        return Err(invalid(format!(
            "{OP}: {rows} rows exceed the two-stage limit"
        )));
    }
    dispatch_sums(rec, &p, m, &partial, groups as u32);
    sum_slices(rec, &partial, groups, cols, cols, out, accumulate)
}

/// out[n, c] (+)= Σ over the pixels of sample n of h[n, y, x, c] (NHWC): the gradient of a
/// per-sample channel bias (the time-embedding projection added in a resnet block).
pub fn sum_pixels_per_sample(
    rec: &mut Recorder,
    h: &Tensor,
    out: &Tensor,
    accumulate: bool,
) -> OpResult {
    const OP: &str = "sum_pixels_per_sample";
    super::expect_rank(OP, "h", h, 4)?;
    let (n, c) = (h.shape()[0], h.shape()[3]);
    let pixels = h.shape()[1] * h.shape()[2];
    expect_numel(OP, "out", out, n * c)?;
    expect_distinct(OP, h, out)?;
    if n > 65535 {
        return Err(invalid(format!(
            "{OP}: batch {n} exceeds the dispatch limit"
        )));
    }
    let p = ReduceParams {
        n: u32_of(OP, "channels", c)?,
        slices: u32_of(OP, "pixels", n * pixels)?,
        stride: c as u32,
        chunk: pixels as u32,
        out_stride: c as u32,
        beta: if accumulate { 1.0 } else { 0.0 },
        ..Default::default()
    };
    dispatch_sums(rec, &p, h, out, n as u32);
    Ok(())
}
