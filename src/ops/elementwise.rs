//! `shaders/elementwise.wgsl`: add, scale, axpby, SiLU, per-channel broadcast add, channel copies.

use super::{OpResult, expect_distinct, expect_numel, expect_rank, invalid, u32_of};
use crate::gpu::{KernelKey, Recorder, Tensor, grid_1d};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ElementwiseParams {
    pub n: u32,
    pub channels: u32,
    pub src_stride: u32,
    pub src_offset: u32,
    pub dst_stride: u32,
    pub dst_offset: u32,
    pub alpha: f32,
    pub beta: f32,
    pub pixels_per_sample: u32,
    pub _pad: [u32; 3],
}

const WG: usize = 256;

fn key(entry: &'static str) -> KernelKey {
    KernelKey::new("elementwise", entry)
}

/// Whether the vectorised entry point (`<entry>4`, bindings 4-6 instead of 1-3) applies.
use super::whole_texels as vectorised;

/// Records `entry` over `items` scalar work items, or its vectorised twin over `items / 4`
/// with the bindings moved to the vec4 slots.
fn dispatch(
    rec: &mut Recorder,
    entries: (&'static str, &'static str),
    vec4: bool,
    p: &ElementwiseParams,
    bindings: &[(u32, &Tensor)],
    items: usize,
) {
    let (entry, slot_shift, items) = if vec4 {
        (entries.1, 3, items / 4)
    } else {
        (entries.0, 0, items)
    };
    let bindings: Vec<_> = bindings
        .iter()
        .map(|(slot, t)| (slot + slot_shift, (*t).into()))
        .collect();
    rec.dispatch(key(entry), p, &bindings, grid_1d(items.div_ceil(WG)));
}

/// out = a + b
pub fn add(rec: &mut Recorder, a: &Tensor, b: &Tensor, out: &Tensor) -> OpResult {
    let n = a.numel();
    expect_numel("add", "b", b, n)?;
    expect_numel("add", "out", out, n)?;
    expect_distinct("add", a, out)?;
    expect_distinct("add", b, out)?;
    let p = ElementwiseParams {
        n: u32_of("add", "n", n)?,
        ..Default::default()
    };
    let vec4 = vectorised(&[n], &[a, b, out]);
    dispatch(
        rec,
        ("add", "add4"),
        vec4,
        &p,
        &[(1, a), (2, b), (3, out)],
        n,
    );
    Ok(())
}

/// y = alpha * x + beta * y  (beta = 0 overwrites y)
pub fn axpby(rec: &mut Recorder, alpha: f32, x: &Tensor, beta: f32, y: &Tensor) -> OpResult {
    let n = x.numel();
    expect_numel("axpby", "y", y, n)?;
    expect_distinct("axpby", x, y)?;
    let p = ElementwiseParams {
        n: u32_of("axpby", "n", n)?,
        alpha,
        beta,
        ..Default::default()
    };
    let vec4 = vectorised(&[n], &[x, y]);
    dispatch(rec, ("axpby", "axpby4"), vec4, &p, &[(1, x), (2, y)], n);
    Ok(())
}

/// y = alpha * y
pub fn scale(rec: &mut Recorder, alpha: f32, y: &Tensor) -> OpResult {
    let n = y.numel();
    let p = ElementwiseParams {
        n: u32_of("scale", "n", n)?,
        alpha,
        ..Default::default()
    };
    rec.dispatch(key("scale"), &p, &[(2, y.into())], grid_1d(n.div_ceil(WG)));
    Ok(())
}

/// z[b, …] = x[b, …] / divisors[b]: each sample of `x` divided by its own scalar (a fourier
/// U-Net's output divided by σ; the same op divides the gradient in the backward pass).
pub fn divide_per_sample(
    rec: &mut Recorder,
    x: &Tensor,
    divisors: &Tensor,
    z: &Tensor,
) -> OpResult {
    const OP: &str = "divide_per_sample";
    let n = x.numel();
    let b = divisors.numel();
    if b == 0 || !n.is_multiple_of(b) {
        return Err(invalid(format!(
            "{OP}: {n} elements of `{}` do not split into {b} samples",
            x.label()
        )));
    }
    expect_numel(OP, "z", z, n)?;
    expect_distinct(OP, x, z)?;
    expect_distinct(OP, divisors, z)?;
    let p = ElementwiseParams {
        n: u32_of(OP, "n", n)?,
        pixels_per_sample: (n / b) as u32,
        ..Default::default()
    };
    rec.dispatch(
        key(OP),
        &p,
        &[(1, x.into()), (2, divisors.into()), (3, z.into())],
        grid_1d(n.div_ceil(WG)),
    );
    Ok(())
}

/// Causal self-attention: in the scores [blocks · T, T] (`T` keys per row, row r the query
/// r mod T), every score of a later key becomes float32's lowest (transformers' causal mask),
/// in place, before the softmax.
pub fn causal_mask(rec: &mut Recorder, scores: &Tensor) -> OpResult {
    const OP: &str = "causal_mask";
    expect_rank(OP, "scores", scores, 2)?;
    let (rows, keys) = (scores.shape()[0], scores.shape()[1]);
    if keys == 0 || !rows.is_multiple_of(keys) {
        return Err(invalid(format!(
            "{OP}: `{}` {:?} must be [blocks · T, T] (self-attention over T tokens)",
            scores.label(),
            scores.shape()
        )));
    }
    let n = scores.numel();
    let p = ElementwiseParams {
        n: u32_of(OP, "n", n)?,
        channels: keys as u32,
        ..Default::default()
    };
    rec.dispatch(key(OP), &p, &[(2, scores.into())], grid_1d(n.div_ceil(WG)));
    Ok(())
}

/// y = silu(x)
pub fn silu_forward(rec: &mut Recorder, x: &Tensor, y: &Tensor) -> OpResult {
    let n = x.numel();
    expect_numel("silu_forward", "y", y, n)?;
    expect_distinct("silu_forward", x, y)?;
    let p = ElementwiseParams {
        n: u32_of("silu_forward", "n", n)?,
        ..Default::default()
    };
    rec.dispatch(
        key("silu_forward"),
        &p,
        &[(1, x.into()), (2, y.into())],
        grid_1d(n.div_ceil(WG)),
    );
    Ok(())
}

/// dx = dy * silu'(x), or dx += … when `accumulate`.
pub fn silu_backward(
    rec: &mut Recorder,
    x: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
    accumulate: bool,
) -> OpResult {
    let n = x.numel();
    expect_numel("silu_backward", "dy", dy, n)?;
    expect_numel("silu_backward", "dx", dx, n)?;
    expect_distinct("silu_backward", x, dx)?;
    expect_distinct("silu_backward", dy, dx)?;
    let p = ElementwiseParams {
        n: u32_of("silu_backward", "n", n)?,
        beta: if accumulate { 1.0 } else { 0.0 },
        ..Default::default()
    };
    rec.dispatch(
        key("silu_backward"),
        &p,
        &[(1, x.into()), (2, dy.into()), (3, dx.into())],
        grid_1d(n.div_ceil(WG)),
    );
    Ok(())
}

/// h[n, y, x, c] += alpha * v[n, c] (NHWC `h`, `v` of shape [N, C]).
pub fn add_channel_bias(rec: &mut Recorder, v: &Tensor, alpha: f32, h: &Tensor) -> OpResult {
    const OP: &str = "add_channel_bias";
    expect_rank(OP, "h", h, 4)?;
    let (n, c) = (h.shape()[0], h.shape()[3]);
    expect_numel(OP, "v", v, n * c)?;
    expect_distinct(OP, v, h)?;
    let p = ElementwiseParams {
        n: u32_of(OP, "n", h.numel())?,
        channels: c as u32,
        pixels_per_sample: (h.shape()[1] * h.shape()[2]) as u32,
        alpha,
        ..Default::default()
    };
    let vec4 = vectorised(&[c], &[v, h]);
    // The vec4 kernel takes one pixel per invocation (`dispatch` counts items / 4 for it).
    let items = if vec4 { 4 * h.numel() / c } else { h.numel() };
    dispatch(
        rec,
        (OP, "add_channel_bias4"),
        vec4,
        &p,
        &[(1, v), (2, h)],
        items,
    );
    Ok(())
}

/// dst[q, dst_offset + c] = src[q, src_offset + c] (+ dst[…] when `accumulate`) for c < channels,
/// over every pixel q: `src` and `dst` are channels-last with any leading shape and the same
/// number of pixels. Concatenation along channels is two such copies; its backward two more.
pub fn copy_channels(
    rec: &mut Recorder,
    src: &Tensor,
    src_offset: usize,
    dst: &Tensor,
    dst_offset: usize,
    channels: usize,
    accumulate: bool,
) -> OpResult {
    const OP: &str = "copy_channels";
    let (sc, dc) = (
        *src.shape().last().unwrap_or(&0),
        *dst.shape().last().unwrap_or(&0),
    );
    if sc == 0 || dc == 0 {
        return Err(invalid(format!(
            "{OP}: empty tensors `{}` {:?} / `{}` {:?}",
            src.label(),
            src.shape(),
            dst.label(),
            dst.shape()
        )));
    }
    let pixels = src.numel() / sc;
    if dst.numel() / dc != pixels {
        return Err(invalid(format!(
            "{OP}: `{}` {:?} and `{}` {:?} have different pixel counts",
            src.label(),
            src.shape(),
            dst.label(),
            dst.shape()
        )));
    }
    if src_offset + channels > sc || dst_offset + channels > dc {
        return Err(invalid(format!(
            "{OP}: channels {src_offset}..{} of `{}` ({sc} channels) -> {dst_offset}..{} of `{}` ({dc} channels) out of range",
            src_offset + channels,
            src.label(),
            dst_offset + channels,
            dst.label()
        )));
    }
    expect_distinct(OP, src, dst)?;
    let p = ElementwiseParams {
        n: u32_of(OP, "pixels", pixels)?,
        channels: channels as u32,
        src_stride: sc as u32,
        src_offset: src_offset as u32,
        dst_stride: dc as u32,
        dst_offset: dst_offset as u32,
        beta: if accumulate { 1.0 } else { 0.0 },
        ..Default::default()
    };
    let vec4 = vectorised(&[channels, sc, src_offset, dc, dst_offset], &[src, dst]);
    // The vec4 kernel takes one pixel per invocation (`dispatch` counts items / 4 for it).
    let items = if vec4 { 4 * pixels } else { pixels * channels };
    dispatch(
        rec,
        (OP, "copy_channels4"),
        vec4,
        &p,
        &[(1, src), (2, dst)],
        items,
    );
    Ok(())
}

/// y[i] = x[i] as f32, where x holds u32 values (e.g. timesteps drawn by the RNG).
pub fn cast_u32_to_f32(rec: &mut Recorder, x: &Tensor, y: &Tensor) -> OpResult {
    const OP: &str = "cast_u32_to_f32";
    let n = x.numel();
    expect_numel(OP, "y", y, n)?;
    expect_distinct(OP, x, y)?;
    let p = ElementwiseParams {
        n: u32_of(OP, "n", n)?,
        ..Default::default()
    };
    rec.dispatch(
        key(OP),
        &p,
        &[(1, x.into()), (2, y.into())],
        grid_1d(n.div_ceil(WG)),
    );
    Ok(())
}
