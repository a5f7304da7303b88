//! `shaders/pack.wgsl`: buffers → `rgba32float` textures for the subgroup GEMM path, or
//! `rgba16float` ones for half-precision operands (`Recorder::half_operands`; those are always
//! packed by the kernel, which rounds, never copied).
//! Each call allocates its texture while the plan is recorded (never during a step).

use super::tiles::MatRef;
use super::{OpResult, expect_rank, u32_of};
use crate::gpu::{Gpu, GpuError, KernelKey, Recorder, Tensor, Texture2d};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct PackParams {
    pub rows: u32,
    pub cols: u32,
    pub rows_padded: u32,
    pub batch_inner: u32,
    pub offset: u32,
    pub ld: u32,
    pub batch_outer_stride: u32,
    pub batch_inner_stride: u32,
    pub trans: u32,
    pub width: u32,
    pub height: u32,
    pub channels: u32,
    pub k_channels: u32,
    pub n_channels: u32,
    pub taps: u32,
    pub io_swapped: u32,
    /// pack_conv_weight: taps per column block (see `pack_conv_weight`).
    pub fold_taps: u32,
    /// pack_nhwc: pixels per image row, and texture rows per image row (1: not folded).
    pub image_w: u32,
    pub fold_parts: u32,
    pub _pad: u32,
}

/// Whether a `rows × cols` matrix (cols packed 4 per texel) fits one texture on this adapter.
pub fn fits_texture(gpu: &Gpu, rows: usize, cols: usize) -> bool {
    let max = gpu.limits.max_texture_dimension_2d as usize;
    rows <= max && cols.div_ceil(4) <= max
}

/// How an NHWC activation [N, H, W, C] packs ([`pack_nhwc`]): one texture row per image row,
/// ⌈C/4⌉ texels per pixel; or, when an image row is wider than a texture (SD's VAE decoder:
/// 512 pixels of 256 channels = 32768 texels, lavapipe's side is 16384), folded into `parts`
/// texture rows of `1 << shift` pixels each. A power of two lets the conv kernel find a pixel's
/// part with a shift and a mask instead of a per-lane division (a scalar loop on lavapipe).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NhwcLayout {
    /// Texture width in texels and height in rows.
    pub width: u32,
    pub height: u32,
    /// Texture rows per image row (1: not folded) and log2 of the pixels in each.
    pub parts: u32,
    pub shift: u32,
}

/// The layout of an NHWC tensor's texture, folded only when `fold` allows and one row does not
/// fit; None when it does not fit a texture.
pub fn nhwc_layout(gpu: &Gpu, x: &Tensor, fold: bool) -> Option<NhwcLayout> {
    let max = gpu.limits.max_texture_dimension_2d as usize;
    let [n, h, w, c] = [x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]];
    let c4 = c.div_ceil(4);
    let (part_pixels, shift) = if w * c4 <= max {
        (w, 0)
    } else if fold && c4 <= max {
        let shift = (max / c4).ilog2();
        (1usize << shift, shift)
    } else {
        return None;
    };
    let parts = w.div_ceil(part_pixels);
    let (width, height) = (part_pixels * c4, n * h * parts);
    (height <= max).then_some(NhwcLayout {
        width: width as u32,
        height: height as u32,
        parts: parts as u32,
        shift,
    })
}

/// Whether an NHWC tensor packs into one texture unfolded ([`pack_nhwc`]).
pub fn nhwc_fits(gpu: &Gpu, x: &Tensor) -> bool {
    nhwc_layout(gpu, x, false).is_some()
}

/// How conv weights [Co, Ci, KH, KW] pack ([`pack_conv_weight`]): (taps per column block,
/// texture width in texels, height in rows), or None when even one tap is past the texture
/// limit. Rows are (tap, reduction channel padded to 4); a matrix taller than the adapter's
/// texture side (SD's 2560-channel 3×3 convs: 23040 rows, lavapipe's side is 16384) is folded
/// at whole taps into column blocks side by side.
pub fn conv_weight_layout(gpu: &Gpu, w: &Tensor, io_swapped: bool) -> Option<(u32, u32, u32)> {
    let max = gpu.limits.max_texture_dimension_2d as usize;
    let [co, ci, kh, kw] = [w.shape()[0], w.shape()[1], w.shape()[2], w.shape()[3]];
    let (k_channels, n_channels) = if io_swapped { (co, ci) } else { (ci, co) };
    let (taps, kpad, n4) = (
        kh * kw,
        k_channels.next_multiple_of(4),
        n_channels.div_ceil(4),
    );
    let fold_taps = (max / kpad).min(taps);
    if fold_taps == 0 {
        return None;
    }
    let width = n4 * taps.div_ceil(fold_taps);
    (width <= max).then_some((fold_taps as u32, width as u32, (fold_taps * kpad) as u32))
}

fn dispatch_pack(
    rec: &mut Recorder,
    entry: &'static str,
    p: &PackParams,
    src: &Tensor,
    label: &str,
) -> Texture2d {
    let tex = rec.texture(p.width, p.height, label);
    let groups = [p.width.div_ceil(16), p.height.div_ceil(4), 1];
    // The vec4 kernels read their source as `src4`.
    let src_slot = if entry.ends_with("_vec4") { 3 } else { 1 };
    rec.dispatch(
        pack_key(entry, tex.half),
        p,
        &[(src_slot, src.into()), (2, (&tex).into())],
        groups,
    );
    tex
}

/// A pack kernel writing an `rgba32float` or (`half`) an `rgba16float` texture.
pub fn pack_key(entry: &'static str, half: bool) -> KernelKey {
    KernelKey::new("pack", entry).template("HALF", half as i64)
}

fn check_fits(rec: &Recorder, op: &str, rows: usize, cols: usize) -> OpResult {
    if !fits_texture(&rec.gpu, rows, cols) {
        return Err(GpuError::TooLarge(format!(
            "{op}: a {rows}x{cols} operand exceeds the adapter's {}-texel texture limit (max_texture_dimension_2d)\n{}",
            rec.gpu.limits.max_texture_dimension_2d,
            crate::gpu::FIT_ADVICE
        )));
    }
    Ok(())
}

/// Packs op(M) (`rows × cols` per batch, batches stacked with `rows_padded` rows each).
#[allow(clippy::too_many_arguments)]
pub fn pack_matrix(
    rec: &mut Recorder,
    m: &MatRef,
    rows: usize,
    cols: usize,
    rows_padded: usize,
    batch_outer: usize,
    batch_inner: usize,
    label: &str,
) -> OpResult<Texture2d> {
    const OP: &str = "pack_matrix";
    let rec = rec.pack_recorder(m.tensor);
    let height = rows_padded * batch_outer * batch_inner;
    check_fits(rec, OP, height, cols)?;
    let p = PackParams {
        rows: rows as u32,
        cols: cols as u32,
        rows_padded: rows_padded as u32,
        batch_inner: batch_inner as u32,
        offset: u32_of(OP, "offset", m.offset)?,
        ld: m.ld as u32,
        batch_outer_stride: m.batch_outer as u32,
        batch_inner_stride: m.batch_inner as u32,
        trans: m.trans as u32,
        width: cols.div_ceil(4) as u32,
        height: height as u32,
        ..Default::default()
    };
    // The same operand packed the same way earlier in the plan, its buffer untouched since (a
    // layer input that several GEMMs take as B, e.g. the weight gradients of Q, K and V).
    let layout = format!("pack_matrix {:?}", bytemuck::bytes_of(&p));
    if let Some(tex) = rec.packed(m.tensor, &layout) {
        return Ok(tex);
    }
    let aligned = !m.trans
        && cols.is_multiple_of(4)
        && [m.ld, m.offset, m.batch_outer, m.batch_inner]
            .iter()
            .all(|v| v.is_multiple_of(4))
        && m.tensor.byte_offset().is_multiple_of(16);
    // Rows of whole texels with a 256-byte pitch, stored back to back from the tensor's
    // (256-byte aligned) start: the buffer already is the texture's image, and a
    // `copy_buffer_to_texture` (memcpy speed) replaces the kernel.
    let batches_contiguous = (batch_inner == 1 || m.batch_inner == rows * cols)
        && (batch_outer == 1 || m.batch_outer == batch_inner * rows * cols);
    if aligned
        && rec.texture_copies(m.tensor)
        && (cols * m.tensor.dtype().bytes()).is_multiple_of(256)
        && m.ld == cols
        && rows_padded == rows
        && m.offset == 0
        && batches_contiguous
        && m.tensor.byte_offset().is_multiple_of(256)
    {
        let tex = rec.texture(p.width, p.height, label);
        rec.copy_to_texture(m.tensor, &tex);
        rec.remember_pack(m.tensor, layout, &tex);
        return Ok(tex);
    }
    // (texel column, row, batch) grids: see pack.wgsl.
    let batches = (batch_outer * batch_inner) as u32;
    if batches > 65535 {
        return Err(GpuError::TooLarge(format!(
            "{OP}: {batches} batches exceed the 65535 dispatch limit\n{}",
            crate::gpu::FIT_ADVICE
        )));
    }
    let rows_padded = rows_padded as u32;
    let tex = rec.texture(p.width, p.height, label);
    let (entry, groups, src_slot) = if aligned {
        (
            "pack_matrix_vec4",
            [p.width.div_ceil(16), rows_padded.div_ceil(4), batches],
            3,
        )
    } else {
        (
            "pack_matrix",
            [p.width.div_ceil(16), rows_padded.div_ceil(4), batches],
            1,
        )
    };
    rec.dispatch(
        pack_key(entry, tex.half),
        &p,
        &[(src_slot, m.tensor.into()), (2, (&tex).into())],
        groups,
    );
    rec.remember_pack(m.tensor, layout, &tex);
    Ok(tex)
}

/// Packs an NHWC activation [N, H, W, C] as a texture W·⌈C/4⌉ texels wide and N·H rows high
/// (the layout the backward-weight conv reads).
pub fn pack_nhwc(rec: &mut Recorder, x: &Tensor, label: &str) -> OpResult<Texture2d> {
    Ok(pack_nhwc_layout(rec, x, false, label)?.0)
}

/// Packs an NHWC activation as [`nhwc_layout`] with folding allowed (the A operand of the
/// forward and backward-input convs). When the rows are already whole texels with a
/// 256-byte-aligned pitch, a plain `copy_buffer_to_texture` (memcpy speed) replaces the kernel:
/// a folded row of whole parts is a contiguous run of the buffer too.
pub fn pack_nhwc_layout(
    rec: &mut Recorder,
    x: &Tensor,
    fold: bool,
    label: &str,
) -> OpResult<(Texture2d, NhwcLayout)> {
    const OP: &str = "pack_nhwc";
    expect_rank(OP, "x", x, 4)?;
    let [n, h, w, c] = [x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]];
    let Some(layout) = nhwc_layout(&rec.gpu, x, fold) else {
        return Err(GpuError::TooLarge(format!(
            "{OP}: an activation {:?} ({} texels a row, {} rows) does not fit the adapter's {}-texel textures{} (max_texture_dimension_2d)\n{}",
            x.shape(),
            w * c.div_ceil(4),
            n * h,
            rec.gpu.limits.max_texture_dimension_2d,
            if fold {
                " even with its rows folded"
            } else {
                ""
            },
            crate::gpu::FIT_ADVICE
        )));
    };
    let key = format!("{OP} {layout:?}");
    if let Some(tex) = rec.packed(x, &key) {
        return Ok((tex, layout));
    }
    // Whole texels per pixel and whole parts per image row: each texture row is a run of the
    // buffer, so the texture's image is the buffer itself.
    let runs = c % 4 == 0 && w.is_multiple_of(1 << layout.shift);
    let tex = if runs
        && rec.texture_copies(x)
        && (layout.width as usize * 4 * x.dtype().bytes()).is_multiple_of(256)
        && x.byte_offset().is_multiple_of(256)
    {
        let tex = rec.texture(layout.width, layout.height, label);
        rec.copy_to_texture(x, &tex);
        tex
    } else {
        let p = PackParams {
            width: layout.width,
            height: layout.height,
            channels: c as u32,
            image_w: w as u32,
            fold_parts: layout.parts,
            ..Default::default()
        };
        let entry = if runs && x.byte_offset().is_multiple_of(16) {
            "pack_nhwc_vec4"
        } else {
            "pack_nhwc"
        };
        dispatch_pack(rec, entry, &p, x, label)
    };
    rec.remember_pack(x, key, &tex);
    Ok((tex, layout))
}

/// Packs conv weights [Co, Ci, KH, KW] as the B operand: rows (tap, reduction channel padded
/// to 4), texels of 4 output channels, folded at whole taps when taller than a texture
/// ([`conv_weight_layout`]). `io_swapped` = backward-input (reduce over Co). Returns the
/// texture and its taps per column block (`GemmParams::b_fold_taps`).
pub fn pack_conv_weight(
    rec: &mut Recorder,
    w: &Tensor,
    io_swapped: bool,
    label: &str,
) -> OpResult<(Texture2d, u32)> {
    const OP: &str = "pack_conv_weight";
    expect_rank(OP, "weight", w, 4)?;
    let rec = rec.pack_recorder(w);
    let [co, ci, kh, kw] = [w.shape()[0], w.shape()[1], w.shape()[2], w.shape()[3]];
    let (k_channels, n_channels) = if io_swapped { (co, ci) } else { (ci, co) };
    let Some((fold_taps, width, height)) = conv_weight_layout(&rec.gpu, w, io_swapped) else {
        return Err(GpuError::TooLarge(format!(
            "{OP}: the weights {:?} do not fit the adapter's {}-texel textures even folded at whole taps (max_texture_dimension_2d)\n{}",
            w.shape(),
            rec.gpu.limits.max_texture_dimension_2d,
            crate::gpu::FIT_ADVICE
        )));
    };
    let p = PackParams {
        width,
        height,
        k_channels: k_channels as u32,
        n_channels: n_channels as u32,
        taps: (kh * kw) as u32,
        io_swapped: io_swapped as u32,
        fold_taps,
        ..Default::default()
    };
    // The bands of a banded conv (ops/bands.rs) share one pack of their weights.
    let layout = format!("{OP} {:?}", bytemuck::bytes_of(&p));
    if let Some(tex) = rec.packed(w, &layout) {
        return Ok((tex, fold_taps));
    }
    let tex = dispatch_pack(rec, "pack_conv_weight", &p, w, label);
    rec.remember_pack(w, layout, &tex);
    Ok((tex, fold_taps))
}
