//! Tile parameters and choosers of the GEMM-shaped kernels (`shaders/gemm.wgsl`,
//! `shaders/gemm_subgroup.wgsl`): the uniform block they share, the operand descriptor, the
//! portable and subgroup tile shapes and every specialization the runtime can build. A leaf of
//! `ops`: `gemm`, `conv2d` and `pack` import it, and it imports none of them
//! (docs/ARCHITECTURE.md, "Layers and what each may import").

use crate::gpu::{KernelKey, Tensor};

/// Parameters shared by gemm.wgsl's four entry points (GEMM and the three conv2d passes).
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GemmParams {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub batch_inner: u32,
    pub a_offset: u32,
    pub a_ld: u32,
    pub a_batch_outer: u32,
    pub a_batch_inner: u32,
    pub b_offset: u32,
    pub b_ld: u32,
    pub b_batch_outer: u32,
    pub b_batch_inner: u32,
    pub c_offset: u32,
    pub c_ld: u32,
    pub c_batch_outer: u32,
    pub c_batch_inner: u32,
    pub trans_a: u32,
    pub trans_b: u32,
    pub has_bias: u32,
    pub k_chunk: u32,
    pub alpha: f32,
    pub beta: f32,
    /// conv2d_backward_weight on the subgroup path with `has_bias`: where Σ dy (the bias
    /// gradient) goes in each output slice, in elements from the slice's start.
    pub bias_at: u32,
    /// Implicit conv on the subgroup path: taps per column block of the packed weights (a
    /// weight texture taller than the adapter allows is folded into column blocks of whole
    /// taps: `ops::pack::pack_conv_weight`).
    pub b_fold_taps: u32,
    pub batch: u32,
    pub in_h: u32,
    pub in_w: u32,
    pub in_c: u32,
    pub out_h: u32,
    pub out_w: u32,
    pub out_c: u32,
    pub kernel_h: u32,
    pub kernel_w: u32,
    pub stride: u32,
    pub pad_top: u32,
    pub pad_left: u32,
    /// Implicit conv on the subgroup path: A's NHWC texture folds each image row into
    /// `a_fold_parts` texture rows of `2^a_fold_shift` pixels (≤ 1: not folded;
    /// `ops::pack::pack_nhwc_layout`).
    pub a_fold_parts: u32,
    pub a_fold_shift: u32,
    pub _pad: [u32; 2],
}

/// Tile configuration of the portable path (the `override` constants of gemm.wgsl).
#[derive(Clone, Copy, Debug)]
pub struct PortableTiles {
    pub bm: u32,
    pub bn: u32,
    pub bk: u32,
    pub tm: u32,
    pub tn: u32,
}

pub const PORTABLE_TILES: PortableTiles = PortableTiles {
    bm: 64,
    bn: 64,
    bk: 16,
    tm: 4,
    tn: 4,
};

/// The portable kernel `entry` with tile `t`; `half`: operands rounded to f16 on load.
pub fn portable_key(entry: &'static str, t: PortableTiles, half: bool) -> KernelKey {
    let key = KernelKey::new("gemm", entry);
    let key = if half { key.constant("HALF", 1.0) } else { key };
    key.constant("BM", t.bm as f64)
        .constant("BN", t.bn as f64)
        .constant("BK", t.bk as f64)
        .constant("TM", t.tm as f64)
        .constant("TN", t.tn as f64)
        .constant("WG", ((t.bm / t.tm) * (t.bn / t.tn)) as f64)
}

/// One operand of a batched GEMM: element (row, col) of batch (outer, inner) is at
/// `offset + outer·batch_outer + inner·batch_inner + row·ld + col` of `tensor` (before `trans`).
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub tensor: &'a Tensor,
    pub offset: usize,
    pub ld: usize,
    pub batch_outer: usize,
    pub batch_inner: usize,
    /// Use the transpose of the stored matrix.
    pub trans: bool,
}

impl<'a> MatRef<'a> {
    /// A dense row-major matrix with `cols` columns (one batch).
    pub fn dense(tensor: &'a Tensor, cols: usize) -> MatRef<'a> {
        MatRef {
            tensor,
            offset: 0,
            ld: cols,
            batch_outer: 0,
            batch_inner: 0,
            trans: false,
        }
    }
    pub fn t(self) -> MatRef<'a> {
        MatRef {
            trans: !self.trans,
            ..self
        }
    }
    pub fn batched(self, outer: usize, inner: usize) -> MatRef<'a> {
        MatRef {
            batch_outer: outer,
            batch_inner: inner,
            ..self
        }
    }
    pub fn at(self, offset: usize) -> MatRef<'a> {
        MatRef { offset, ..self }
    }

    /// Largest element index touched for a `rows × cols` (after transpose) matrix over the batches.
    pub(crate) fn max_index(&self, rows: usize, cols: usize, outer: usize, inner: usize) -> usize {
        let (r, c) = if self.trans {
            (cols, rows)
        } else {
            (rows, cols)
        };
        self.offset
            + (outer - 1) * self.batch_outer
            + (inner - 1) * self.batch_inner
            + (r - 1) * self.ld
            + (c - 1)
    }
}

/// Register-tile rows per lane block of the subgroup GEMM (RB of docs/ARCHITECTURE.md, "Fast GEMM on lavapipe").
pub const GEMM_ROW_BLOCKS: u32 = 2;
/// Row blocks when A is read transposed from its buffer (ABUF = 2: the weight gradients of linear
/// layers, dW = dYᵀ X, small M and N over a long K): one, which halves the kernel that llvmpipe
/// JIT-compiles at the first step (2.7 -> 1.2 s) for GEMMs of a few milliseconds.
pub const TRANSPOSED_A_ROW_BLOCKS: u32 = 1;
/// Subgroups per workgroup, stacked along M.
pub const SUBGROUPS_PER_WORKGROUP: u32 = 1;

pub fn subgroup_key(entry: &'static str, lanes: u32) -> KernelKey {
    let rb = if entry == "gemm" {
        GEMM_ROW_BLOCKS
    } else {
        CONV_ROW_BLOCKS
    };
    subgroup_tile_key(entry, lanes, SubgroupTile::wide(lanes, rb))
}

/// The register-tile shape of one subgroup kernel specialization (template values of
/// `shaders/gemm_subgroup.wgsl`). Every entry point of the file is expanded with all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubgroupTile {
    /// Lane blocks of rows (the tile has L · RB rows).
    pub row_blocks: u32,
    /// Output columns per lane in the conv tiles: 4, or 2 for narrow layers.
    pub lane_columns: u32,
    /// conv backward-weight: lanes whose dY texel is broadcast (the tile has 4 · BL rows).
    pub broadcast_lanes: u32,
    /// conv backward-weight: column texels per lane.
    pub column_texels: u32,
    /// GEMM: where A is read (template ABUF): 0 a packed texture, 1 its buffer as vec4s,
    /// 2 its buffer transposed.
    pub a_source: u32,
    /// GEMM: B is transposed; its stored rows are packed and transposed in registers (TB).
    pub b_transposed: bool,
    /// How the GEMM and conv tiles store C (CV): whole vec4s or vec2s, or 0 element by element
    /// ([`store_width`]).
    pub c_width: u32,
    /// Half-precision operands (HALF): `rgba16float` textures, an A read from its buffer
    /// rounded to f16.
    pub half: bool,
}

impl SubgroupTile {
    pub fn wide(lanes: u32, row_blocks: u32) -> SubgroupTile {
        SubgroupTile {
            row_blocks,
            lane_columns: 4,
            broadcast_lanes: lanes,
            column_texels: 1,
            a_source: 0,
            b_transposed: false,
            c_width: 0,
            half: false,
        }
    }
}

pub fn subgroup_tile_key(entry: &'static str, lanes: u32, tile: SubgroupTile) -> KernelKey {
    KernelKey::new("gemm_subgroup", entry)
        .template("L", lanes as i64)
        .template("RB", tile.row_blocks as i64)
        .template("SG", SUBGROUPS_PER_WORKGROUP as i64)
        .template("W", tile.lane_columns as i64)
        .template("BL", tile.broadcast_lanes as i64)
        .template("CT", tile.column_texels as i64)
        .template("ABUF", tile.a_source as i64)
        .template("TB", tile.b_transposed as i64)
        .template("CV", tile.c_width as i64)
        .template("HALF", tile.half as i64)
}

/// The widest vector (4 or 2 elements, at most the `lane_columns` a lane owns) in which a
/// subgroup tile can store C (template CV of `shaders/gemm_subgroup.wgsl`): every row start
/// (`starts`: the offset, batch strides and row stride, in elements), the row length `n` and
/// the binding's byte offset must be multiples of it. 0: element stores (any layout).
pub fn store_width(lane_columns: u32, n: usize, starts: &[usize], byte_offset: u64) -> u32 {
    [4u32, 2]
        .into_iter()
        .find(|&w| {
            w <= lane_columns
                && n.is_multiple_of(w as usize)
                && starts.iter().all(|s| s.is_multiple_of(w as usize))
                && byte_offset.is_multiple_of(4 * w as u64)
        })
        .unwrap_or(0)
}

/// Register-tile row blocks of the subgroup conv kernels (RB of docs/ARCHITECTURE.md, "Fast GEMM on lavapipe").
pub const CONV_ROW_BLOCKS: u32 = 4;
/// Row blocks of the narrow conv tile (2 columns per lane): half the wide tile's accumulators.
/// RB = 8 (the same count) ran within this VM's noise of RB = 4 but is twice the unrolled code,
/// and llvmpipe JIT-compiles it at the first dispatch: tiny16's cold first step took 159 s with
/// it, 92 s with RB = 4.
pub const SUBGROUP_NARROW_ROW_BLOCKS: u32 = 4;

/// The subgroup tile for a forward / backward-input conv with `n` output columns: 4 columns per
/// lane, or 2 when the last 4 L-wide tile would be at most half full (it would spend half its
/// FMAs on clamped copies of the last columns): 32 or 96 channels with 16 lanes.
pub fn subgroup_conv_tile(lanes: u32, n: usize) -> SubgroupTile {
    let mut tile = SubgroupTile::wide(lanes, CONV_ROW_BLOCKS);
    let wide = 4 * lanes as usize;
    if (1..=wide / 2).contains(&(n % wide)) {
        tile.lane_columns = 2;
        tile.row_blocks = SUBGROUP_NARROW_ROW_BLOCKS;
    }
    tile
}

/// The subgroup tile for a backward-weight pass with `co` output channels (tile rows): as many
/// broadcasting lanes as there are 4-channel texels (a power of two, at most L), and two column
/// texels per lane when fewer than L broadcast, to keep the FMAs per broadcast.
pub fn subgroup_backward_weight_tile(lanes: u32, co: usize) -> SubgroupTile {
    let mut tile = SubgroupTile::wide(lanes, CONV_ROW_BLOCKS);
    let texels = (co.div_ceil(4).next_power_of_two() as u32).min(lanes);
    if texels < lanes {
        tile.broadcast_lanes = texels;
        tile.column_texels = 2;
    }
    tile
}

/// Workgroups the subgroup path's backward-weight pass aims for on a GPU (tiles × split-K
/// slices).
pub const SUBGROUP_BACKWARD_WEIGHT_WORKGROUPS: usize = 8;

/// Split-K slices (1 ..= `max_splits`) for `tiles` equal workgroups on `workers` threads that
/// take workgroups in turn: the time is ⌈tiles·s / workers⌉ rounds of 1/s of the work each, and
/// every slice past the first costs about 3 % (its partial written and summed).
pub fn balanced_splits(tiles: usize, workers: usize, max_splits: usize) -> usize {
    let cost =
        |s: usize| (tiles * s).div_ceil(workers) as f64 / s as f64 * (1.0 + 0.03 * (s - 1) as f64);
    (1..=max_splits.clamp(1, 4 * workers))
        .min_by(|&a, &b| cost(a).total_cmp(&cost(b)))
        .unwrap_or(1)
}

/// Every specialization of the GEMM kernels the runtime can build.
pub fn kernel_keys() -> Vec<KernelKey> {
    let mut keys: Vec<KernelKey> = [
        "gemm",
        "conv2d_forward",
        "conv2d_backward_input",
        "conv2d_backward_weight",
    ]
    .iter()
    .flat_map(|e| [false, true].map(|half| portable_key(e, PORTABLE_TILES, half)))
    .collect();
    for (lanes, half) in [(8, false), (16, false), (8, true), (16, true)] {
        let mut push = |entry: &'static str, mut tile: SubgroupTile| {
            tile.half = half;
            keys.push(subgroup_tile_key(entry, lanes, tile));
        };
        for entry in ["gemm", "conv2d_implicit", "conv2d_backward_weight"] {
            let rb = if entry == "gemm" {
                GEMM_ROW_BLOCKS
            } else {
                CONV_ROW_BLOCKS
            };
            push(entry, SubgroupTile::wide(lanes, rb));
        }
        for a_source in 0..3 {
            for b_transposed in [false, true] {
                let mut tile = SubgroupTile::wide(lanes, GEMM_ROW_BLOCKS);
                tile.a_source = a_source;
                if a_source == 2 {
                    tile.row_blocks = TRANSPOSED_A_ROW_BLOCKS;
                }
                tile.b_transposed = b_transposed;
                for c_width in [0, 2, 4] {
                    tile.c_width = c_width;
                    push("gemm", tile);
                }
            }
        }
        // Narrow and wide conv tiles with each store width (n = output channels).
        let wide = 4 * lanes as usize;
        for n in [1, 2, wide - 1, wide - 2, wide] {
            let mut tile = subgroup_conv_tile(lanes, n);
            tile.c_width = store_width(tile.lane_columns, n, &[n], 0);
            push("conv2d_implicit", tile);
        }
        let mut co = 4;
        while co < 4 * lanes as usize {
            push(
                "conv2d_backward_weight",
                subgroup_backward_weight_tile(lanes, co),
            );
            co *= 2;
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::balanced_splits;

    #[test]
    fn backward_weight_slices_fill_the_rounds_of_the_threads() {
        // (tiles, threads, most slices the pixels allow) -> slices
        for (tiles, workers, max, want) in [
            (9, 2, 100, 2),  // 9 tiles: 5 rounds on 2 threads; 18: 9 full rounds
            (18, 2, 100, 1), // already even
            (5, 2, 100, 2),
            (7, 2, 100, 2),
            (1, 2, 100, 2),
            (9, 2, 1, 1), // too few pixels to split
            (8, 4, 100, 1),
            (3, 4, 100, 4), // 12 workgroups: 3 full rounds
        ] {
            assert_eq!(
                balanced_splits(tiles, workers, max),
                want,
                "{tiles} tiles on {workers} threads, at most {max} slices"
            );
        }
    }
}
