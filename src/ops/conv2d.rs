//! conv2d forward, backward-input and backward-weight (+ bias gradient) as implicit GEMMs:
//! entry points of `shaders/gemm.wgsl` (portable) and `shaders/gemm_subgroup.wgsl` (subgroup
//! path), which share one tile core with the GEMM. Activations are NHWC, weights are torch's
//! [Co, Ci, KH, KW] (diffusers' state-dict layout, so checkpoints load as they are).

use super::tiles::{
    GemmParams, PORTABLE_TILES, SUBGROUP_BACKWARD_WEIGHT_WORKGROUPS, SUBGROUPS_PER_WORKGROUP,
    balanced_splits, portable_key, store_width, subgroup_backward_weight_tile, subgroup_conv_tile,
    subgroup_tile_key,
};
use super::{
    OpResult, bands, expect_distinct, expect_numel, expect_rank, expect_shape, invalid, pack,
    reduce, u32_of,
};
use crate::gpu::{Binding, GemmPath, GpuError, Recorder, Tensor};

/// Stride and padding. google/ddpm downsamplers pad right/bottom by one with padding 0
/// (`Conv2dGeometry::asymmetric_down()`); diffusers' default pads 1 on every side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dGeometry {
    pub stride: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub pad_bottom: usize,
    pub pad_right: usize,
}

impl Conv2dGeometry {
    pub fn same(stride: usize, pad: usize) -> Conv2dGeometry {
        Conv2dGeometry {
            stride,
            pad_top: pad,
            pad_left: pad,
            pad_bottom: pad,
            pad_right: pad,
        }
    }
    /// F.pad(x, (0, 1, 0, 1)) then a stride-2 conv with padding 0 (diffusers Downsample2D, padding=0).
    pub fn asymmetric_down() -> Conv2dGeometry {
        Conv2dGeometry {
            stride: 2,
            pad_top: 0,
            pad_left: 0,
            pad_bottom: 1,
            pad_right: 1,
        }
    }
    /// Output size for an input of `h × w` and a `kh × kw` kernel, or None when it is empty.
    pub fn output_size(&self, h: usize, w: usize, kh: usize, kw: usize) -> Option<(usize, usize)> {
        let ph = h + self.pad_top + self.pad_bottom;
        let pw = w + self.pad_left + self.pad_right;
        if self.stride == 0 || ph < kh || pw < kw {
            return None;
        }
        Some(((ph - kh) / self.stride + 1, (pw - kw) / self.stride + 1))
    }
}

/// Checked dimensions of one conv.
#[derive(Clone, Copy, Debug)]
pub struct ConvDims {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub ci: usize,
    pub oh: usize,
    pub ow: usize,
    pub co: usize,
    pub kh: usize,
    pub kw: usize,
}

impl ConvDims {
    pub fn flops(&self) -> f64 {
        2.0 * (self.n * self.oh * self.ow * self.co * self.ci * self.kh * self.kw) as f64
    }
}

/// Validates x [N,H,W,Ci] and w [Co,Ci,KH,KW] against the geometry.
pub fn conv_dims(
    op: &str,
    x_shape: &[usize],
    w: &Tensor,
    g: &Conv2dGeometry,
) -> OpResult<ConvDims> {
    expect_rank(op, "weight", w, 4)?;
    let [co, wci, kh, kw] = [w.shape()[0], w.shape()[1], w.shape()[2], w.shape()[3]];
    let [n, h, wd, ci] = match *x_shape {
        [a, b, c, d] => [a, b, c, d],
        _ => {
            return Err(invalid(format!(
                "{op}: the input must be NHWC [N, H, W, C], has shape {x_shape:?}"
            )));
        }
    };
    if wci != ci {
        return Err(invalid(format!(
            "{op}: weight `{}` {:?} expects {wci} input channels, the input has {ci}",
            w.label(),
            w.shape()
        )));
    }
    if g.pad_top >= kh || g.pad_left >= kw || g.pad_bottom >= kh || g.pad_right >= kw {
        return Err(invalid(format!(
            "{op}: padding {g:?} must be smaller than the {kh}x{kw} kernel"
        )));
    }
    let (oh, ow) = g.output_size(h, wd, kh, kw).ok_or_else(|| {
        invalid(format!(
            "{op}: a {kh}x{kw} kernel with {g:?} gives no output for a {h}x{wd} input"
        ))
    })?;
    if n * h * wd * ci.max(co) == 0 {
        return Err(invalid(format!(
            "{op}: empty tensor (input {x_shape:?}, weight {:?})",
            w.shape()
        )));
    }
    Ok(ConvDims {
        n,
        h,
        w: wd,
        ci,
        oh,
        ow,
        co,
        kh,
        kw,
    })
}

fn conv_params(d: &ConvDims, g: &Conv2dGeometry) -> GemmParams {
    GemmParams {
        batch: d.n as u32,
        in_h: d.h as u32,
        in_w: d.w as u32,
        in_c: d.ci as u32,
        out_h: d.oh as u32,
        out_w: d.ow as u32,
        out_c: d.co as u32,
        kernel_h: d.kh as u32,
        kernel_w: d.kw as u32,
        stride: g.stride as u32,
        pad_top: g.pad_top as u32,
        pad_left: g.pad_left as u32,
        alpha: 1.0,
        batch_inner: 1,
        ..Default::default()
    }
}

fn subgroup_lanes(rec: &Recorder) -> Option<u32> {
    match rec.gpu.gemm_path {
        GemmPath::Subgroup { lanes } => Some(lanes),
        GemmPath::Portable => None,
    }
}

/// y = conv2d(x, w) + bias. x [N,H,W,Ci], w [Co,Ci,KH,KW], y [N,OH,OW,Co].
pub fn conv2d_forward(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    y: &Tensor,
    g: &Conv2dGeometry,
) -> OpResult {
    const OP: &str = "conv2d_forward";
    let d = conv_dims(OP, x.shape(), w, g)?;
    expect_shape(OP, "y", y, &[d.n, d.oh, d.ow, d.co])?;
    if let Some(b) = bias {
        expect_numel(OP, "bias", b, d.co)?;
        expect_distinct(OP, b, y)?;
    }
    expect_distinct(OP, x, y)?;
    expect_distinct(OP, w, y)?;
    if bands::exceeds_binding(rec, x) || bands::exceeds_binding(rec, y) {
        return conv2d_forward_banded(rec, x, w, bias, y, g, &d);
    }
    let mut p = conv_params(&d, g);
    p.m = u32_of(OP, "output pixels", d.n * d.oh * d.ow)?;
    p.n = d.co as u32;
    p.k = u32_of(OP, "k", d.kh * d.kw * d.ci)?;
    p.c_ld = d.co as u32;
    p.has_bias = bias.is_some() as u32;
    let bias_t = bias.cloned().unwrap_or_else(|| rec.dummy());
    rec.add_flops(d.flops());
    run_implicit(rec, OP, "conv2d_forward", p, x, w, false, &bias_t, y)
}

/// [`conv2d_forward`] of tensors larger than one storage binding, one band of output rows of
/// one sample at a time (see `ops/bands.rs`). Output rows `[o0, o1)` read input rows
/// `[o0·s − pad_top, (o1 − 1)·s − pad_top + kh)`; the part of that range outside the image is
/// the band's own top/bottom padding, so each band is exactly the whole conv's rows.
fn conv2d_forward_banded(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    y: &Tensor,
    g: &Conv2dGeometry,
    d: &ConvDims,
) -> OpResult {
    const OP: &str = "conv2d_forward";
    let max = bands::max_binding(rec) as usize;
    let (in_row, out_row) = (d.w * d.ci * 4, d.ow * d.co * 4);
    // The output band and its input band (with the halo) must both fit.
    let fits = |r: usize| r * out_row <= max && ((r - 1) * g.stride + d.kh) * in_row <= max;
    let rows = bands::rows_per_band(rec, OP, &[x, y], d.oh, fits)?;
    for i in 0..d.n {
        for o0 in (0..d.oh).step_by(rows) {
            let o1 = (o0 + rows).min(d.oh);
            let first = (o0 * g.stride) as isize - g.pad_top as isize;
            let end = (o1 - 1) * g.stride + d.kh - g.pad_top;
            let r0 = first.max(0) as usize;
            let r1 = end.min(d.h);
            let band = Conv2dGeometry {
                pad_top: (r0 as isize - first) as usize,
                pad_bottom: end - r1,
                ..*g
            };
            conv2d_forward(
                rec,
                &bands::rows(x, i, r0, r1),
                w,
                bias,
                &bands::rows(y, i, o0, o1),
                &band,
            )?;
        }
    }
    Ok(())
}

/// dx (+)= conv2d backward with respect to the input. dy [N,OH,OW,Co], w [Co,Ci,KH,KW], dx [N,H,W,Ci].
pub fn conv2d_backward_input(
    rec: &mut Recorder,
    dy: &Tensor,
    w: &Tensor,
    dx: &Tensor,
    g: &Conv2dGeometry,
    accumulate: bool,
) -> OpResult {
    const OP: &str = "conv2d_backward_input";
    let d = conv_dims(OP, dx.shape(), w, g)?;
    expect_shape(OP, "dy", dy, &[d.n, d.oh, d.ow, d.co])?;
    expect_distinct(OP, dy, dx)?;
    rec.add_flops(d.flops());
    expect_distinct(OP, w, dx)?;
    let mut p = conv_params(&d, g);
    p.m = u32_of(OP, "input pixels", d.n * d.h * d.w)?;
    p.n = d.ci as u32;
    p.k = u32_of(OP, "k", d.kh * d.kw * d.co)?;
    p.c_ld = d.ci as u32;
    p.beta = if accumulate { 1.0 } else { 0.0 };
    let dummy = rec.dummy();
    run_implicit(rec, OP, "conv2d_backward_input", p, dy, w, true, &dummy, dx)
}

#[allow(clippy::too_many_arguments)]
fn run_implicit(
    rec: &mut Recorder,
    op: &str,
    entry: &'static str,
    p: GemmParams,
    a: &Tensor,
    w: &Tensor,
    transposed: bool,
    bias: &Tensor,
    out: &Tensor,
) -> OpResult {
    let (m, n) = (p.m as usize, p.n as usize);
    // An input whose rows are wider than a texture (SD's VAE decoder at 512², 256 channels:
    // 32768 texels a row) folds its rows; one past a texture even so runs on the portable
    // kernel, which reads storage buffers (slow on lavapipe).
    let packable = pack::nhwc_layout(&rec.gpu, a, true).is_some()
        && pack::conv_weight_layout(&rec.gpu, w, transposed).is_some();
    if let Some(lanes) = subgroup_lanes(rec).filter(|_| packable) {
        let (a_tex, a_layout) = pack::pack_nhwc_layout(rec, a, true, "conv A")?;
        let (b_tex, fold_taps) = pack::pack_conv_weight(rec, w, transposed, "conv weights")?;
        let mut tile = subgroup_conv_tile(lanes, n);
        tile.half = b_tex.half;
        tile.c_width = store_width(
            tile.lane_columns,
            n,
            &[p.c_offset as usize, p.c_ld as usize],
            out.byte_offset(),
        );
        let rows = (lanes * tile.row_blocks * SUBGROUPS_PER_WORKGROUP) as usize;
        let groups = [
            n.div_ceil((tile.lane_columns * lanes) as usize) as u32,
            m.div_ceil(rows) as u32,
            1,
        ];
        check_groups(op, groups)?;
        let mut p = p;
        p.trans_a = transposed as u32;
        p.b_fold_taps = fold_taps;
        p.a_fold_parts = a_layout.parts;
        p.a_fold_shift = a_layout.shift;
        rec.dispatch_as(
            entry,
            subgroup_tile_key("conv2d_implicit", lanes, tile),
            &p,
            &[
                (1, (&a_tex).into()),
                (2, (&b_tex).into()),
                (3, bias.into()),
                (4, out.into()),
            ],
            groups,
        );
    } else {
        let t = PORTABLE_TILES;
        let groups = [
            n.div_ceil(t.bn as usize) as u32,
            m.div_ceil(t.bm as usize) as u32,
            1,
        ];
        check_groups(op, groups)?;
        rec.dispatch(
            portable_key(entry, t, rec.half_operands()),
            &p,
            &[
                (1, a.into()),
                (2, w.into()),
                (3, bias.into()),
                (4, out.into()),
            ],
            groups,
        );
    }
    Ok(())
}

fn check_groups(op: &str, groups: [u32; 3]) -> OpResult {
    if groups.iter().any(|&g| g > 65535) {
        return Err(GpuError::TooLarge(format!(
            "{op}: the problem needs {groups:?} workgroups, over the 65535 limit\n{}",
            crate::gpu::FIT_ADVICE
        )));
    }
    Ok(())
}

/// On the subgroup path the backward-weight kernel also sums dy into the bias gradient, written
/// `bias_at` elements after dw's start in the same output: parameter gradients lie in one buffer
/// with each bias right after its weight, so dw .. db is one binding (and one split-K sum). Only
/// the parameter store's alignment padding may lie between them: the split-K sum writes the
/// whole span (zeros into the padding), which must not reach another tensor.
fn fused_bias_offset(
    lanes: Option<u32>,
    db: Option<&Tensor>,
    dw: &Tensor,
    numel: usize,
) -> Option<usize> {
    match (lanes, db) {
        (Some(_), Some(db))
            if db.shares_buffer(dw)
                && db.offset() >= dw.offset() + numel
                && db.offset() <= dw.offset() + numel.next_multiple_of(64) =>
        {
            Some(db.offset() - dw.offset())
        }
        _ => None,
    }
}

/// The backward-weight pass's output tiles and its workgroup grid (x over the weight columns,
/// y over the output channels).
fn backward_weight_grid(lanes: Option<u32>, d: &ConvDims) -> (usize, [u32; 2]) {
    let taps = d.kh * d.kw;
    let (gx, gy) = match lanes {
        Some(l) => {
            let tile = subgroup_backward_weight_tile(l, d.co);
            let cols = taps * d.ci.div_ceil(4);
            (
                cols.div_ceil((l * tile.column_texels) as usize),
                d.co.div_ceil(4 * tile.broadcast_lanes as usize),
            )
        }
        None => {
            let t = PORTABLE_TILES;
            (
                (taps * d.ci).div_ceil(t.bn as usize),
                d.co.div_ceil(t.bm as usize),
            )
        }
    };
    (gx * gy, [gx as u32, gy as u32])
}

/// Split-K slices over the pixels: each is one more partial to write and sum. On a CPU adapter
/// (lavapipe: a few threads taking workgroups in turn) a layer has a handful of tiles, and 9
/// tiles on 2 threads take 5 rounds where 4.5 would do: slices are chosen to fill the rounds. A
/// GPU wants many workgroups.
fn split_k_slices(rec: &Recorder, lanes: Option<u32>, tiles: usize, pixels: usize) -> usize {
    let max_splits = pixels.div_ceil(256).max(1);
    match (lanes, rec.gpu.cpu_workers()) {
        (Some(_), Some(workers)) => balanced_splits(tiles.max(1), workers, max_splits),
        (Some(_), None) => {
            (SUBGROUP_BACKWARD_WEIGHT_WORKGROUPS / tiles.max(1)).clamp(1, max_splits)
        }
        (None, _) => (64 / tiles.max(1)).clamp(1, max_splits),
    }
}

/// dw (+)= ∂L/∂w and db (+)= Σ dy over pixels. x [N,H,W,Ci], dy [N,OH,OW,Co], dw [Co,Ci,KH,KW].
/// The reduction over pixels is split into fixed slices summed in a fixed order (deterministic).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_backward_weight(
    rec: &mut Recorder,
    x: &Tensor,
    dy: &Tensor,
    dw: &Tensor,
    db: Option<&Tensor>,
    g: &Conv2dGeometry,
    accumulate: bool,
) -> OpResult {
    const OP: &str = "conv2d_backward_weight";
    let d = conv_dims(OP, x.shape(), dw, g)?;
    expect_shape(OP, "dy", dy, &[d.n, d.oh, d.ow, d.co])?;
    expect_distinct(OP, x, dw)?;
    expect_distinct(OP, dy, dw)?;
    rec.add_flops(d.flops());
    let pixels = d.n * d.oh * d.ow;
    let taps = d.kh * d.kw;
    let numel = d.co * d.ci * taps;
    let mut p = conv_params(&d, g);
    p.m = d.co as u32;
    p.n = u32_of(OP, "n", taps * d.ci)?;
    p.k = u32_of(OP, "pixels", pixels)?;
    let packable = pack::nhwc_fits(&rec.gpu, dy) && pack::nhwc_fits(&rec.gpu, x);
    let lanes = subgroup_lanes(rec).filter(|_| packable);
    if let Some(db) = db {
        expect_numel(OP, "db", db, d.co)?;
        expect_distinct(OP, x, db)?;
        expect_distinct(OP, dy, db)?;
    }
    let bias_at = fused_bias_offset(lanes, db, dw, numel);
    let span = bias_at.map_or(numel, |at| at + d.co);
    if let Some(at) = bias_at {
        p.has_bias = 1;
        p.bias_at = u32_of(OP, "bias offset", at)?;
    }
    p.c_batch_outer = u32_of(OP, "weights", span)?;

    let (tiles, groups_xy) = backward_weight_grid(lanes, &d);
    let splits = split_k_slices(rec, lanes, tiles, pixels);
    let chunk = pixels.div_ceil(splits);
    let splits = pixels.div_ceil(chunk);
    p.k_chunk = chunk as u32;
    // One slice is written straight into dw (accumulating with beta = 1 when asked).
    let direct = splits == 1;
    if direct && accumulate {
        p.beta = 1.0;
    }
    // dw, or dw .. db when the bias gradient is fused.
    let out = if bias_at.is_some() {
        dw.view(0, &[span], dw.label())
    } else {
        dw.clone()
    };
    let target = if direct {
        out.clone()
    } else {
        rec.gpu
            .tensor(&[splits, span], "conv2d_backward_weight partials")
    };
    let groups = [groups_xy[0], groups_xy[1], splits as u32];
    check_groups(OP, groups)?;
    match lanes {
        Some(l) => {
            let a_tex = pack::pack_nhwc(rec, dy, "conv dY")?;
            let b_tex = pack::pack_nhwc(rec, x, "conv X")?;
            let mut tile = subgroup_backward_weight_tile(l, d.co);
            tile.half = b_tex.half;
            rec.dispatch(
                subgroup_tile_key("conv2d_backward_weight", l, tile),
                &p,
                &[
                    (1, (&a_tex).into()),
                    (2, (&b_tex).into()),
                    (4, Binding::Buffer(target.clone())),
                ],
                groups,
            );
        }
        None => {
            let dummy = rec.dummy();
            rec.dispatch(
                portable_key(
                    "conv2d_backward_weight",
                    PORTABLE_TILES,
                    rec.half_operands(),
                ),
                &p,
                &[
                    (1, dy.into()),
                    (2, x.into()),
                    (3, (&dummy).into()),
                    (4, Binding::Buffer(target.clone())),
                ],
                groups,
            );
        }
    }
    if !direct {
        reduce::sum_slices(rec, &target, splits, span, span, &out, accumulate)?;
    }
    if let (Some(db), None) = (db, bias_at) {
        reduce::sum_rows(rec, dy, pixels, d.co, db, accumulate)?;
    }
    Ok(())
}
