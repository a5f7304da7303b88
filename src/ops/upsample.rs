//! `shaders/upsample.wgsl`: nearest-neighbour x2 upsampling of NHWC images and its backward;
//! bicubic upsampling and average pooling by an integer factor (super-resolution inputs).

use super::{OpResult, bands, expect_distinct, expect_rank, expect_shape, invalid, u32_of};
use crate::gpu::{KernelKey, Recorder, Tensor, grid_1d};

#[repr(C)]
#[derive(Clone, Copy, Default, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct UpsampleParams {
    pub numel: u32,
    pub height: u32,
    pub width: u32,
    pub channels: u32,
    pub factor: u32,
    pub _pad: [u32; 3],
}

const WG: usize = 256;

fn key(entry: &'static str) -> KernelKey {
    KernelKey::new("upsample", entry)
}

/// Checks `small` [N, H, W, C] and `big` [N, 2H, 2W, C]; returns the parameters for a dispatch
/// writing `big` (forward) or `small` (backward), as `writes_big` says.
fn params(
    op: &str,
    small_name: &str,
    small: &Tensor,
    big_name: &str,
    big: &Tensor,
    writes_big: bool,
) -> OpResult<UpsampleParams> {
    expect_rank(op, small_name, small, 4)?;
    let s = small.shape();
    if s.contains(&0) {
        return Err(invalid(format!(
            "{op}: `{small_name}` (`{}`) has an empty shape {s:?}",
            small.label()
        )));
    }
    expect_shape(op, big_name, big, &[s[0], 2 * s[1], 2 * s[2], s[3]])?;
    u32_of(op, &format!("numel of `{big_name}`"), big.numel())?;
    Ok(UpsampleParams {
        numel: if writes_big {
            big.numel()
        } else {
            small.numel()
        } as u32,
        height: s[1] as u32,
        width: s[2] as u32,
        channels: s[3] as u32,
        factor: 2,
        _pad: [0; 3],
    })
}

/// The vec4 kernels' grid when C is a multiple of 4 and both tensors start on a 16-byte
/// boundary: x over the W·C/4 texels of an input row (64 per workgroup), y and z over the N·H
/// input rows. None: the scalar kernels serve.
fn texel_grid(small: &Tensor, big: &Tensor) -> Option<[u32; 3]> {
    let s = small.shape();
    let (rows, row_texels) = (s[0] * s[1], s[2] * s[3] / 4);
    let gx = row_texels.div_ceil(64);
    if !super::whole_texels(&[s[3]], &[small, big]) || gx > 65535 {
        return None;
    }
    let gy = rows.min(65535);
    Some([gx as u32, gy as u32, rows.div_ceil(gy) as u32])
}

/// y [N, 2H, 2W, C] = nearest x2 upsampling of x [N, H, W, C].
pub fn upsample_nearest2x_forward(rec: &mut Recorder, x: &Tensor, y: &Tensor) -> OpResult {
    const OP: &str = "upsample_nearest2x_forward";
    let mut p = params(OP, "x", x, "y", y, true)?;
    expect_distinct(OP, x, y)?;
    if bands::exceeds_binding(rec, y) {
        return forward_banded(rec, x, y);
    }
    if let Some(grid) = texel_grid(x, y) {
        p.numel = (x.shape()[0] * x.shape()[1]) as u32;
        rec.dispatch(
            key("upsample_nearest2x_forward4"),
            &p,
            &[(3, x.into()), (4, y.into())],
            grid,
        );
        return Ok(());
    }
    rec.dispatch(
        key(OP),
        &p,
        &[(1, x.into()), (2, y.into())],
        grid_1d(y.numel().div_ceil(WG)),
    );
    Ok(())
}

/// [`upsample_nearest2x_forward`] into a `y` larger than one storage binding, one band of
/// rows of one sample at a time (see `ops/bands.rs`): input rows `[r0, r1)` fill output rows
/// `[2·r0, 2·r1)`, nothing else.
fn forward_banded(rec: &mut Recorder, x: &Tensor, y: &Tensor) -> OpResult {
    const OP: &str = "upsample_nearest2x_forward";
    let [n, h, w, c] = [x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]];
    // An input row becomes two output rows of twice its width.
    let max = bands::max_binding(rec) as usize;
    let rows = bands::rows_per_band(rec, OP, &[y, x], h, |r| r * 2 * (2 * w) * c * 4 <= max)?;
    for i in 0..n {
        for r0 in (0..h).step_by(rows) {
            let r1 = (r0 + rows).min(h);
            upsample_nearest2x_forward(
                rec,
                &bands::rows(x, i, r0, r1),
                &bands::rows(y, i, 2 * r0, 2 * r1),
            )?;
        }
    }
    Ok(())
}

/// dx [N, H, W, C] = sum of the four children in dy [N, 2H, 2W, C] (overwrites dx).
pub fn upsample_nearest2x_backward(rec: &mut Recorder, dy: &Tensor, dx: &Tensor) -> OpResult {
    const OP: &str = "upsample_nearest2x_backward";
    let mut p = params(OP, "dx", dx, "dy", dy, false)?;
    expect_distinct(OP, dy, dx)?;
    if let Some(grid) = texel_grid(dx, dy) {
        p.numel = (dx.shape()[0] * dx.shape()[1]) as u32;
        rec.dispatch(
            key("upsample_nearest2x_backward4"),
            &p,
            &[(3, dy.into()), (4, dx.into())],
            grid,
        );
        return Ok(());
    }
    rec.dispatch(
        key(OP),
        &p,
        &[(1, dy.into()), (2, dx.into())],
        grid_1d(dx.numel().div_ceil(WG)),
    );
    Ok(())
}

/// Checks `small` [N, H, W, C] against `big` [N, kH, kW, C] for factor k.
fn resample_params(
    op: &str,
    small: &Tensor,
    big: &Tensor,
    factor: usize,
    writes_big: bool,
) -> OpResult<UpsampleParams> {
    expect_rank(op, "small", small, 4)?;
    let s = small.shape();
    if s.contains(&0) || factor == 0 {
        return Err(invalid(format!(
            "{op}: empty shape {s:?} or factor {factor}"
        )));
    }
    expect_shape(op, "big", big, &[s[0], factor * s[1], factor * s[2], s[3]])?;
    u32_of(op, "numel", big.numel())?;
    Ok(UpsampleParams {
        numel: if writes_big {
            big.numel()
        } else {
            small.numel()
        } as u32,
        height: s[1] as u32,
        width: s[2] as u32,
        channels: s[3] as u32,
        factor: factor as u32,
        _pad: [0; 3],
    })
}

/// big [N, kH, kW, C] = bicubic upsampling of small [N, H, W, C] by k (torch `interpolate`,
/// mode "bicubic", align_corners False, A = −0.75).
pub fn upsample_bicubic_forward(
    rec: &mut Recorder,
    small: &Tensor,
    factor: usize,
    big: &Tensor,
) -> OpResult {
    const OP: &str = "upsample_bicubic_forward";
    let p = resample_params(OP, small, big, factor, true)?;
    expect_distinct(OP, small, big)?;
    rec.dispatch(
        key(OP),
        &p,
        &[(1, small.into()), (2, big.into())],
        grid_1d(big.numel().div_ceil(WG)),
    );
    Ok(())
}

/// small [N, H, W, C] = k × k average pooling of big [N, kH, kW, C].
pub fn avg_pool_forward(
    rec: &mut Recorder,
    big: &Tensor,
    factor: usize,
    small: &Tensor,
) -> OpResult {
    const OP: &str = "avg_pool_forward";
    let p = resample_params(OP, small, big, factor, false)?;
    expect_distinct(OP, big, small)?;
    rec.dispatch(
        key(OP),
        &p,
        &[(1, big.into()), (2, small.into())],
        grid_1d(small.numel().div_ceil(WG)),
    );
    Ok(())
}
