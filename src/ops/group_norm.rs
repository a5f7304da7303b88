//! `shaders/group_norm.wgsl`: GroupNorm (torch.nn.GroupNorm semantics) on NHWC activations.
//!
//! Forward is two dispatches (per-group statistics, then a per-element normalize) and saves
//! `mean`/`rstd` ([N*G] each) for backward. Backward is four dispatches through scratch buffers
//! allocated at record time; every reduction runs in a fixed order, so results are bitwise
//! reproducible (no float atomics).

use super::{
    OpResult, bands, expect_distinct, expect_numel, expect_rank, expect_shape, invalid, u32_of,
};
use crate::gpu::{KernelKey, Recorder, Tensor, grid_1d};

#[repr(C)]
#[derive(Clone, Copy, Default, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GroupNormParams {
    pub batch: u32,
    pub pixels: u32,
    pub channels: u32,
    pub groups: u32,
    pub cpg: u32,
    pub splits: u32,
    pub split_len: u32,
    pub numel: u32,
    pub accumulate: u32,
    pub eps: f32,
    pub inv_count: f32,
    /// 1: SiLU fused after the affine (see the shader).
    pub silu: u32,
    /// Backward: 1 adds into dx instead of overwriting it.
    pub add_dx: u32,
    pub _pad: [u32; 3],
}

const WG: usize = 256;
/// Channels per workgroup of the per-(split, channel) kernels (stats_partial, forward, dx).
const COLUMN_CHANNELS: usize = 32;

/// Pixel splits for the per-(n, split, channel) kernels: enough workgroups to keep every core
/// busy, at least 64 pixels each. Depends only on the shape, so results stay reproducible.
fn pixel_splits(
    op: &str,
    n: usize,
    pixels: usize,
    c: usize,
    per_block: usize,
) -> OpResult<(usize, usize, usize)> {
    let cblocks = c.div_ceil(per_block);
    let splits = PARTIAL_TARGET_WORKGROUPS
        .div_ceil(n * cblocks)
        .clamp(1, (pixels / 64).max(1));
    let split_len = pixels.div_ceil(splits);
    let splits = pixels.div_ceil(split_len);
    if n * splits > 65535 || cblocks > 65535 {
        return Err(invalid(format!(
            "{op}: grid of {cblocks} x {} workgroups exceeds 65535 per dimension",
            n * splits
        )));
    }
    Ok((cblocks, splits, split_len))
}
/// Invocations the vectorised kernels aim for (one per (n, pixel split, 4-channel texel)).
const TEXEL_TARGET_INVOCATIONS: usize = 512;
/// Workgroup size of the vectorised kernels.
const WG4: usize = 64;

/// The vectorised kernels serve C % 4 == 0 (every U-Net layer); the scalar ones the rest.
fn vectorised(c: usize) -> bool {
    c.is_multiple_of(4)
}

/// (splits, split_len, grid) of the vectorised kernels: pixel splits until there are enough
/// invocations, at least 64 pixels each. Depends only on the shape (reproducible results).
fn texel_splits(n: usize, pixels: usize, c: usize) -> (usize, usize, [u32; 3]) {
    let c4 = c / 4;
    let splits = TEXEL_TARGET_INVOCATIONS
        .div_ceil(n * c4)
        .clamp(1, (pixels / 64).max(1));
    let split_len = pixels.div_ceil(splits);
    let splits = pixels.div_ceil(split_len);
    (splits, split_len, grid_1d((n * splits * c4).div_ceil(WG4)))
}

/// Channels per workgroup of `group_norm_backward_partials` (its workgroup is 32 x 8 lanes).
const PARTIAL_CHANNELS: usize = 32;
/// Aim for at least this many workgroups in `group_norm_backward_partials` by splitting the
/// pixels of each sample (the split count depends only on the shape, so results stay
/// reproducible).
const PARTIAL_TARGET_WORKGROUPS: usize = 64;

fn key(entry: &'static str) -> KernelKey {
    KernelKey::new("group_norm", entry)
}

/// (N, H*W, C) of an NHWC tensor, or an error naming `op` and `what`.
fn nhwc(op: &str, what: &str, t: &Tensor) -> OpResult<(usize, usize, usize)> {
    expect_rank(op, what, t, 4)?;
    let s = t.shape();
    if s.contains(&0) {
        return Err(invalid(format!(
            "{op}: `{what}` (`{}`) has an empty shape {:?}",
            t.label(),
            s
        )));
    }
    Ok((s[0], s[1] * s[2], s[3]))
}

/// Errors if two outputs written by one dispatch overlap (views of one buffer may be bound
/// read-write together, but must not write the same elements).
fn expect_disjoint(op: &str, a: &Tensor, b: &Tensor) -> OpResult {
    let overlap = a.offset() < b.offset() + b.numel() && b.offset() < a.offset() + a.numel();
    if a.shares_buffer(b) && overlap {
        return Err(invalid(format!(
            "{op}: outputs `{}` and `{}` overlap",
            a.label(),
            b.label()
        )));
    }
    Ok(())
}

fn check_groups(op: &str, channels: usize, groups: usize) -> OpResult {
    if groups == 0 || !channels.is_multiple_of(groups) {
        return Err(invalid(format!(
            "{op}: {channels} channels cannot be split into {groups} groups (C % G must be 0)"
        )));
    }
    Ok(())
}

fn base_params(op: &str, x: &Tensor, groups: usize) -> OpResult<GroupNormParams> {
    let (n, pixels, c) = nhwc(op, "x", x)?;
    check_groups(op, c, groups)?;
    let cpg = c / groups;
    Ok(GroupNormParams {
        batch: u32_of(op, "N", n)?,
        pixels: u32_of(op, "H*W", pixels)?,
        channels: u32_of(op, "C", c)?,
        groups: u32_of(op, "groups", groups)?,
        cpg: cpg as u32,
        numel: u32_of(op, "numel of x", x.numel())?,
        inv_count: (1.0 / (pixels * cpg) as f64) as f32,
        ..Default::default()
    })
}

/// y = GroupNorm(x) * gamma + beta over NHWC `x` [N, H, W, C] with `groups` groups; writes the
/// per-(n, g) `mean` and `rstd` = 1/sqrt(var + eps) ([N*G] each, any shape) for backward.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_forward(
    rec: &mut Recorder,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f32,
    y: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
) -> OpResult {
    forward(
        rec,
        "group_norm_forward",
        x,
        gamma,
        beta,
        groups,
        eps,
        y,
        mean,
        rstd,
        false,
    )
}

/// y = SiLU(GroupNorm(x) * gamma + beta) in one pass (diffusers' norm → SiLU pairs); the
/// normalised value itself is not stored: [`group_norm_silu_backward`] recomputes it.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_silu_forward(
    rec: &mut Recorder,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f32,
    y: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
) -> OpResult {
    forward(
        rec,
        "group_norm_silu_forward",
        x,
        gamma,
        beta,
        groups,
        eps,
        y,
        mean,
        rstd,
        true,
    )
}

#[allow(clippy::too_many_arguments)]
fn forward(
    rec: &mut Recorder,
    op: &'static str,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f32,
    y: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    silu: bool,
) -> OpResult {
    let mut p = base_params(op, x, groups)?;
    p.silu = silu as u32;
    let (n, c) = (p.batch as usize, p.channels as usize);
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(invalid(format!(
            "{op}: eps = {eps} must be finite and >= 0"
        )));
    }
    p.eps = eps;
    expect_shape(op, "y", y, x.shape())?;
    expect_numel(op, "gamma", gamma, c)?;
    expect_numel(op, "beta", beta, c)?;
    expect_numel(op, "mean", mean, n * groups)?;
    expect_numel(op, "rstd", rstd, n * groups)?;
    for input in [x, gamma, beta, mean, rstd] {
        expect_distinct(op, input, y)?;
    }
    expect_distinct(op, x, mean)?;
    expect_distinct(op, x, rstd)?;
    expect_disjoint(op, mean, rstd)?;
    if bands::exceeds_binding(rec, x) {
        return forward_banded(rec, op, &p, x, (gamma, beta), y, (mean, rstd));
    }
    let grid = set_splits(op, &mut p)?;
    let partials = rec.gpu.tensor(
        &[2, n * p.splits as usize, c],
        "group_norm_forward.partials",
    );
    stats_partial(rec, &p, x, &partials, grid);
    rec.dispatch(
        key("group_norm_stats"),
        &p,
        &[(5, mean.into()), (6, rstd.into()), (11, (&partials).into())],
        [(n * groups).div_ceil(64) as u32, 1, 1],
    );
    normalize(rec, &p, x, (gamma, beta), y, (mean, rstd), grid);
    Ok(())
}

/// Sets `p.splits`/`p.split_len` for the per-(n, pixel split, channel) kernels of its shape;
/// returns their grid.
fn set_splits(op: &str, p: &mut GroupNormParams) -> OpResult<[u32; 3]> {
    let (n, pixels, c) = (p.batch as usize, p.pixels as usize, p.channels as usize);
    let (splits, split_len, grid) = if vectorised(c) {
        texel_splits(n, pixels, c)
    } else {
        let (cblocks, splits, split_len) = pixel_splits(op, n, pixels, c, COLUMN_CHANNELS)?;
        (splits, split_len, [cblocks as u32, (n * splits) as u32, 1])
    };
    p.splits = splits as u32;
    p.split_len = split_len as u32;
    Ok(grid)
}

/// The grid of the per-(n, split, channel) kernels for the splits already in `p`.
fn split_grid(p: &GroupNormParams) -> [u32; 3] {
    let (rows, c) = ((p.batch * p.splits) as usize, p.channels as usize);
    if vectorised(c) {
        grid_1d((rows * c / 4).div_ceil(WG4))
    } else {
        [c.div_ceil(COLUMN_CHANNELS) as u32, rows as u32, 1]
    }
}

/// Per-(n, split, channel) column mean and M2 of `x` into `partials` [2, N*S, C].
fn stats_partial(
    rec: &mut Recorder,
    p: &GroupNormParams,
    x: &Tensor,
    partials: &Tensor,
    grid: [u32; 3],
) {
    let (entry, x_slot, out_slot) = if vectorised(p.channels as usize) {
        ("group_norm_stats_partial4", 17, 21)
    } else {
        ("group_norm_stats_partial", 1, 10)
    };
    rec.dispatch(
        key(entry),
        p,
        &[(x_slot, x.into()), (out_slot, partials.into())],
        grid,
    );
}

/// y = (x − mean)·rstd·gamma + beta (SiLU after it when `p.silu`).
fn normalize(
    rec: &mut Recorder,
    p: &GroupNormParams,
    x: &Tensor,
    (gamma, beta): (&Tensor, &Tensor),
    y: &Tensor,
    (mean, rstd): (&Tensor, &Tensor),
    grid: [u32; 3],
) {
    let (entry, x_slot, y_slot) = if vectorised(p.channels as usize) {
        ("group_norm_forward4", 17, 18)
    } else {
        ("group_norm_forward", 1, 4)
    };
    rec.dispatch(
        key(entry),
        p,
        &[
            (x_slot, x.into()),
            (2, gamma.into()),
            (3, beta.into()),
            (y_slot, y.into()),
            (7, mean.into()),
            (8, rstd.into()),
        ],
        grid,
    );
}

/// The forward of an `x` larger than one storage binding (see `ops/bands.rs`), per sample:
/// each band's column statistics with one pixel split per image row (so every split of the
/// merge is full and its count right), gathered into one partials tensor of the whole sample,
/// merged per group with Chan's formula as the unbanded path does, then each band normalised.
fn forward_banded(
    rec: &mut Recorder,
    op: &str,
    p: &GroupNormParams,
    x: &Tensor,
    affine: (&Tensor, &Tensor),
    y: &Tensor,
    (mean, rstd): (&Tensor, &Tensor),
) -> OpResult {
    let [n, h, w, c] = [x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]];
    let groups = p.groups as usize;
    let max = bands::max_binding(rec) as usize;
    let rows = bands::rows_per_band(rec, op, &[x, y], h, |r| r * w * c * 4 <= max)?;
    // The whole sample, one split per row.
    let sample = GroupNormParams {
        batch: 1,
        splits: h as u32,
        split_len: w as u32,
        numel: u32_of(op, "numel of one sample", h * w * c)?,
        ..*p
    };
    let partials = rec.gpu.tensor(&[2, h, c], "group_norm_forward.partials");
    let (mean_i, rstd_i) = (
        rec.gpu.tensor(&[groups], "group_norm_forward.sample mean"),
        rec.gpu.tensor(&[groups], "group_norm_forward.sample rstd"),
    );
    for i in 0..n {
        for r0 in (0..h).step_by(rows) {
            let r1 = (r0 + rows).min(h);
            let band = GroupNormParams {
                pixels: ((r1 - r0) * w) as u32,
                splits: (r1 - r0) as u32,
                numel: ((r1 - r0) * w * c) as u32,
                ..sample
            };
            let part = rec
                .gpu
                .tensor(&[2, r1 - r0, c], "group_norm_forward.band partials");
            stats_partial(
                rec,
                &band,
                &bands::rows(x, i, r0, r1),
                &part,
                split_grid(&band),
            );
            let len = (r1 - r0) * c;
            for (from, to) in [(0, r0 * c), (len, (h + r0) * c)] {
                rec.copy(
                    &part.view(from, &[len], part.label()),
                    &partials.view(to, &[len], partials.label()),
                )?;
            }
        }
        rec.dispatch(
            key("group_norm_stats"),
            &sample,
            &[
                (5, (&mean_i).into()),
                (6, (&rstd_i).into()),
                (11, (&partials).into()),
            ],
            [groups.div_ceil(64) as u32, 1, 1],
        );
        for (from, to) in [(&mean_i, mean), (&rstd_i, rstd)] {
            rec.copy(from, &to.view(i * groups, &[groups], to.label()))?;
        }
        for r0 in (0..h).step_by(rows) {
            let r1 = (r0 + rows).min(h);
            let mut band = GroupNormParams {
                pixels: ((r1 - r0) * w) as u32,
                numel: ((r1 - r0) * w * c) as u32,
                ..sample
            };
            let grid = set_splits(op, &mut band)?;
            let (xb, yb) = (bands::rows(x, i, r0, r1), bands::rows(y, i, r0, r1));
            normalize(rec, &band, &xb, affine, &yb, (&mean_i, &rstd_i), grid);
        }
    }
    Ok(())
}

/// Backward of [`group_norm_forward`] given the saved `mean`/`rstd` (the group count is
/// `mean.numel() / N`). `dx` is overwritten; `dgamma`/`dbeta` ([C]) are overwritten, or added to
/// when `accumulate_param_grads`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_backward(
    rec: &mut Recorder,
    x: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    dx: &Tensor,
    dgamma: &Tensor,
    dbeta: &Tensor,
    accumulate_param_grads: bool,
    accumulate_dx: bool,
) -> OpResult {
    backward(
        rec,
        "group_norm_backward",
        x,
        dy,
        gamma,
        None,
        mean,
        rstd,
        dx,
        dgamma,
        dbeta,
        accumulate_param_grads,
        accumulate_dx,
    )
}

/// Backward of [`group_norm_silu_forward`]: `dy` is the gradient of the SiLU's output; `beta`
/// (with gamma, mean and rstd) recomputes the pre-activation. Otherwise as
/// [`group_norm_backward`].
#[allow(clippy::too_many_arguments)]
pub fn group_norm_silu_backward(
    rec: &mut Recorder,
    x: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    dx: &Tensor,
    dgamma: &Tensor,
    dbeta: &Tensor,
    accumulate_param_grads: bool,
    accumulate_dx: bool,
) -> OpResult {
    backward(
        rec,
        "group_norm_silu_backward",
        x,
        dy,
        gamma,
        Some(beta),
        mean,
        rstd,
        dx,
        dgamma,
        dbeta,
        accumulate_param_grads,
        accumulate_dx,
    )
}

/// The backward pass's operands: shapes that fit x [N, H, W, C] and its statistics, and outputs
/// distinct from every input. Returns (N, pixels, C, groups).
#[allow(clippy::too_many_arguments)]
fn check_backward_operands(
    op: &'static str,
    x: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    dx: &Tensor,
    dgamma: &Tensor,
    dbeta: &Tensor,
) -> OpResult<(usize, usize, usize, usize)> {
    let (n, pixels, c) = nhwc(op, "x", x)?;
    if !mean.numel().is_multiple_of(n) {
        return Err(invalid(format!(
            "{op}: `mean` (`{}`) has {} elements, not a multiple of N = {n}",
            mean.label(),
            mean.numel()
        )));
    }
    let groups = mean.numel() / n;
    check_groups(op, c, groups)?;
    expect_numel(op, "rstd", rstd, n * groups)?;
    expect_shape(op, "dy", dy, x.shape())?;
    expect_shape(op, "dx", dx, x.shape())?;
    expect_numel(op, "gamma", gamma, c)?;
    expect_numel(op, "dgamma", dgamma, c)?;
    expect_numel(op, "dbeta", dbeta, c)?;
    for input in [x, dy, gamma, mean, rstd] {
        expect_distinct(op, input, dx)?;
    }
    expect_disjoint(op, dgamma, dbeta)?;
    Ok((n, pixels, c, groups))
}

#[allow(clippy::too_many_arguments)]
fn backward(
    rec: &mut Recorder,
    op: &'static str,
    x: &Tensor,
    dy: &Tensor,
    gamma: &Tensor,
    silu_beta: Option<&Tensor>,
    mean: &Tensor,
    rstd: &Tensor,
    dx: &Tensor,
    dgamma: &Tensor,
    dbeta: &Tensor,
    accumulate_param_grads: bool,
    accumulate_dx: bool,
) -> OpResult {
    let (n, pixels, c, groups) =
        check_backward_operands(op, x, dy, gamma, mean, rstd, dx, dgamma, dbeta)?;
    let mut p = base_params(op, x, groups)?;

    // Pixel splits so the partial-sum pass has enough workgroups even for small N*C; at least
    // 64 pixels per split so the partial rows stay few.
    let (splits, split_len, grid) = if vectorised(c) {
        texel_splits(n, pixels, c)
    } else {
        let (cblocks, splits, split_len) = pixel_splits(op, n, pixels, c, PARTIAL_CHANNELS)?;
        let rows = n * splits;
        // The partial sums and dx share the (channel block, n * split) grid.
        (splits, split_len, [cblocks as u32, rows as u32, 1])
    };
    let rows = n * splits;
    p.splits = splits as u32;
    p.split_len = split_len as u32;
    p.accumulate = accumulate_param_grads as u32;
    p.add_dx = accumulate_dx as u32;
    p.silu = silu_beta.is_some() as u32;
    if let Some(b) = silu_beta {
        expect_numel(op, "beta", b, c)?;
    }
    // Read only when the SiLU is fused.
    let beta = silu_beta.cloned().unwrap_or_else(|| rec.dummy());

    let partials = rec
        .gpu
        .tensor(&[2, rows, c], "group_norm_backward.partials");
    let gsums = rec
        .gpu
        .tensor(&[2, n * groups], "group_norm_backward.group_sums");
    // Slots of x, dy, the partial sums and dx in the scalar and the vectorised kernels.
    let ((partials_entry, dx_entry), [x_slot, dy_slot, partials_slot, dx_slot]) = if vectorised(c) {
        (
            ("group_norm_backward_partials4", "group_norm_backward_dx4"),
            [17, 19, 21, 20],
        )
    } else {
        (
            ("group_norm_backward_partials", "group_norm_backward_dx"),
            [1, 9, 10, 16],
        )
    };
    rec.dispatch(
        key(partials_entry),
        &p,
        &[
            (x_slot, x.into()),
            (2, gamma.into()),
            (3, (&beta).into()),
            (7, mean.into()),
            (8, rstd.into()),
            (dy_slot, dy.into()),
            (partials_slot, (&partials).into()),
        ],
        grid,
    );
    rec.dispatch(
        key("group_norm_backward_group_sums"),
        &p,
        &[
            (2, gamma.into()),
            (11, (&partials).into()),
            (12, (&gsums).into()),
        ],
        grid_1d((n * groups).div_ceil(WG)),
    );
    rec.dispatch(
        key("group_norm_backward_params"),
        &p,
        &[
            (11, (&partials).into()),
            (13, dgamma.into()),
            (14, dbeta.into()),
        ],
        grid_1d(c.div_ceil(WG)),
    );
    rec.dispatch(
        key(dx_entry),
        &p,
        &[
            (x_slot, x.into()),
            (2, gamma.into()),
            (3, (&beta).into()),
            (7, mean.into()),
            (8, rstd.into()),
            (dy_slot, dy.into()),
            (15, (&gsums).into()),
            (dx_slot, dx.into()),
        ],
        grid,
    );
    Ok(())
}
