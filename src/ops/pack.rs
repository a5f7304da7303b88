//! `shaders/pack.wgsl`: buffers → `rgba32float` textures for the subgroup GEMM path.
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
    pub _pad: [u32; 3],
}

/// Whether a `rows × cols` matrix (cols packed 4 per texel) fits one texture on this adapter.
pub fn fits_texture(gpu: &Gpu, rows: usize, cols: usize) -> bool {
    let max = gpu.limits.max_texture_dimension_2d as usize;
    rows <= max && cols.div_ceil(4) <= max
}

/// Whether an NHWC tensor packs into one texture ([`pack_nhwc`]).
pub fn nhwc_fits(gpu: &Gpu, x: &Tensor) -> bool {
    let [n, h, w, c] = [x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]];
    fits_texture(gpu, n * h, w * c.div_ceil(4) * 4)
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
    let tex = Texture2d::new(&rec.gpu, p.width, p.height, label);
    let groups = [p.width.div_ceil(16), p.height.div_ceil(4), 1];
    rec.dispatch(
        KernelKey::new("pack", entry),
        p,
        &[(1, src.into()), (2, (&tex).into())],
        groups,
    );
    tex
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
        && (cols * 4).is_multiple_of(256)
        && m.ld == cols
        && rows_padded == rows
        && m.offset == 0
        && batches_contiguous
        && m.tensor.byte_offset().is_multiple_of(256)
    {
        let tex = Texture2d::new(&rec.gpu, p.width, p.height, label);
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
    let tex = Texture2d::new(&rec.gpu, p.width, p.height, label);
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
        KernelKey::new("pack", entry),
        &p,
        &[(src_slot, m.tensor.into()), (2, (&tex).into())],
        groups,
    );
    rec.remember_pack(m.tensor, layout, &tex);
    Ok(tex)
}

/// Packs an NHWC activation [N, H, W, C] as a texture W·⌈C/4⌉ texels wide and N·H rows high.
/// When the rows are already whole texels with a 256-byte-aligned pitch, a plain
/// `copy_buffer_to_texture` (memcpy speed) replaces the kernel.
pub fn pack_nhwc(rec: &mut Recorder, x: &Tensor, label: &str) -> OpResult<Texture2d> {
    const OP: &str = "pack_nhwc";
    expect_rank(OP, "x", x, 4)?;
    let [n, h, w, c] = [x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]];
    let width = w * c.div_ceil(4);
    check_fits(rec, OP, n * h, width * 4)?;
    if let Some(tex) = rec.packed(x, OP) {
        return Ok(tex);
    }
    let tex = if c % 4 == 0 && (width * 16) % 256 == 0 && x.byte_offset().is_multiple_of(256) {
        let tex = Texture2d::new(&rec.gpu, width as u32, (n * h) as u32, label);
        rec.copy_to_texture(x, &tex);
        tex
    } else {
        let p = PackParams {
            width: width as u32,
            height: (n * h) as u32,
            channels: c as u32,
            ..Default::default()
        };
        dispatch_pack(rec, "pack_nhwc", &p, x, label)
    };
    rec.remember_pack(x, OP, &tex);
    Ok(tex)
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
    Ok((
        dispatch_pack(rec, "pack_conv_weight", &p, w, label),
        fold_taps,
    ))
}
