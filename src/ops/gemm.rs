//! Batched GEMM (`shaders/gemm.wgsl`, portable; `shaders/gemm_subgroup.wgsl`, subgroup path):
//! C = alpha·op(A)·op(B) + beta·C (+ bias), and the linear layer built on it.

use super::{OpResult, expect_distinct, expect_numel, invalid, pack, u32_of};
use crate::gpu::{Binding, GemmPath, KernelKey, Recorder, Tensor};

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
    pub _pad: u32,
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

pub fn portable_key(entry: &'static str, t: PortableTiles) -> KernelKey {
    KernelKey::new("gemm", entry)
        .constant("BM", t.bm as f64)
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
    fn max_index(&self, rows: usize, cols: usize, outer: usize, inner: usize) -> usize {
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

/// Shape and scaling of a batched GEMM: batches = outer × inner, each C[m×n] = alpha·A[m×k]·B[k×n] + beta·C.
#[derive(Clone, Copy, Debug)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch_outer: usize,
    pub batch_inner: usize,
    pub alpha: f32,
    pub beta: f32,
}

impl GemmShape {
    pub fn new(m: usize, n: usize, k: usize) -> GemmShape {
        GemmShape {
            m,
            n,
            k,
            batch_outer: 1,
            batch_inner: 1,
            alpha: 1.0,
            beta: 0.0,
        }
    }
    pub fn batches(self, outer: usize, inner: usize) -> GemmShape {
        GemmShape {
            batch_outer: outer,
            batch_inner: inner,
            ..self
        }
    }
    pub fn scale(self, alpha: f32, beta: f32) -> GemmShape {
        GemmShape {
            alpha,
            beta,
            ..self
        }
    }
    pub fn flops(&self) -> f64 {
        2.0 * (self.m * self.n * self.k * self.batch_outer * self.batch_inner) as f64
    }
}

/// C = alpha·op(A)·op(B) + beta·C + bias (bias: [n], broadcast over rows).
pub fn gemm(
    rec: &mut Recorder,
    shape: GemmShape,
    a: MatRef,
    b: MatRef,
    bias: Option<&Tensor>,
    c: MatRef,
) -> OpResult {
    const OP: &str = "gemm";
    let GemmShape {
        m,
        n,
        k,
        batch_outer,
        batch_inner,
        alpha,
        beta,
    } = shape;
    if m == 0 || n == 0 || k == 0 || batch_outer == 0 || batch_inner == 0 {
        return Err(invalid(format!(
            "{OP}: empty product m={m} n={n} k={k} batches={batch_outer}x{batch_inner}"
        )));
    }
    rec.add_flops(shape.flops());
    if c.trans {
        return Err(invalid(format!(
            "{OP}: the output `{}` cannot be transposed",
            c.tensor.label()
        )));
    }
    for (what, op, rows, cols) in [("A", &a, m, k), ("B", &b, k, n), ("C", &c, m, n)] {
        let need = op.max_index(rows, cols, batch_outer, batch_inner) + 1;
        if need > op.tensor.numel() {
            return Err(invalid(format!(
                "{OP}: operand {what} (`{}`, {} elements, shape {:?}) is too small for a {}{rows}x{cols} matrix with ld {} over {batch_outer}x{batch_inner} batches (needs {need})",
                op.tensor.label(),
                op.tensor.numel(),
                op.tensor.shape(),
                if op.trans { "transposed " } else { "" },
                op.ld
            )));
        }
    }
    if let Some(bias) = bias {
        expect_numel(OP, "bias", bias, n)?;
        expect_distinct(OP, bias, c.tensor)?;
    }
    expect_distinct(OP, a.tensor, c.tensor)?;
    expect_distinct(OP, b.tensor, c.tensor)?;
    let batches = batch_outer * batch_inner;
    let params = GemmParams {
        m: u32_of(OP, "m", m)?,
        n: u32_of(OP, "n", n)?,
        k: u32_of(OP, "k", k)?,
        batch_inner: batch_inner as u32,
        a_offset: u32_of(OP, "A offset", a.offset)?,
        a_ld: a.ld as u32,
        a_batch_outer: a.batch_outer as u32,
        a_batch_inner: a.batch_inner as u32,
        b_offset: u32_of(OP, "B offset", b.offset)?,
        b_ld: b.ld as u32,
        b_batch_outer: b.batch_outer as u32,
        b_batch_inner: b.batch_inner as u32,
        c_offset: u32_of(OP, "C offset", c.offset)?,
        c_ld: c.ld as u32,
        c_batch_outer: c.batch_outer as u32,
        c_batch_inner: c.batch_inner as u32,
        trans_a: a.trans as u32,
        trans_b: b.trans as u32,
        has_bias: bias.is_some() as u32,
        alpha,
        beta,
        ..Default::default()
    };
    if batches > 65535 {
        return Err(invalid(format!(
            "{OP}: {batches} batches exceed the 65535 dispatch limit"
        )));
    }
    let bias_t = bias.cloned().unwrap_or_else(|| rec.dummy());
    if let GemmPath::Subgroup { lanes } = rec.gpu.gemm_path {
        let a_source = AOperand::choose(&a, k);
        let a_fits = a_source != AOperand::Texture || pack::fits_texture(&rec.gpu, m * batches, k);
        let b_fits = if b.trans {
            pack::fits_texture(&rec.gpu, n.next_multiple_of(4) * batches, k)
        } else {
            pack::fits_texture(&rec.gpu, k.next_multiple_of(4) * batches, n)
        };
        if a_fits && b_fits {
            return gemm_subgroup(rec, lanes, &params, shape, a_source, &a, &b, &bias_t, &c);
        }
    }
    let t = PORTABLE_TILES;
    let groups = [
        n.div_ceil(t.bn as usize) as u32,
        m.div_ceil(t.bm as usize) as u32,
        batches as u32,
    ];
    if groups[0] > 65535 || groups[1] > 65535 {
        return Err(invalid(format!(
            "{OP}: {m}x{n} output needs more than 65535 tiles in a dimension"
        )));
    }
    rec.dispatch(
        portable_key("gemm", t),
        &params,
        &[
            (1, a.tensor.into()),
            (2, b.tensor.into()),
            (3, Binding::Buffer(bias_t)),
            (4, c.tensor.into()),
        ],
        groups,
    );
    Ok(())
}

/// How the subgroup GEMM reads A (template ABUF).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AOperand {
    /// Packed into a texture (0).
    Texture,
    /// Read in place as vec4s: row-major, K, ld, offsets and batch strides multiples of 4 (1).
    Buffer,
    /// Transposed, read in place with scalar loads down the stored matrix's columns (2).
    TransposedBuffer,
}

impl AOperand {
    fn choose(a: &MatRef, k: usize) -> AOperand {
        if a.trans {
            AOperand::TransposedBuffer
        } else if [k, a.ld, a.offset, a.batch_outer, a.batch_inner]
            .iter()
            .all(|v| v.is_multiple_of(4))
            && a.tensor.byte_offset().is_multiple_of(16)
        {
            AOperand::Buffer
        } else {
            AOperand::Texture
        }
    }
}

/// Subgroup path: A read in place from its buffer (or packed into an `rgba32float` texture, 4
/// consecutive k per texel, when its rows are not whole aligned texels); B packed into a texture
/// as it is stored: op(B) rows (4 consecutive n per texel, K padded to a multiple of 4 per batch),
/// or for a transposed B the stored rows (4 consecutive k per texel, N padded to a multiple of 4),
/// transposed in registers by the kernel. No operand is ever packed transposed (a gather).
#[allow(clippy::too_many_arguments)]
fn gemm_subgroup(
    rec: &mut Recorder,
    lanes: u32,
    params: &GemmParams,
    shape: GemmShape,
    a_source: AOperand,
    a: &MatRef,
    b: &MatRef,
    bias: &Tensor,
    c: &MatRef,
) -> OpResult {
    let GemmShape {
        m,
        n,
        k,
        batch_outer,
        batch_inner,
        ..
    } = shape;
    let batches = batch_outer * batch_inner;
    let mut tile = SubgroupTile::wide(lanes, SUBGROUP_ROW_BLOCKS);
    tile.c_width = store_width(
        4,
        n,
        &[c.offset, c.ld, c.batch_outer, c.batch_inner],
        c.tensor.byte_offset(),
    );
    let b_tex = if b.trans {
        tile.b_transposed = true;
        let stored = MatRef { trans: false, ..*b };
        let n_pad = n.next_multiple_of(4);
        pack::pack_matrix(
            rec,
            &stored,
            n,
            k,
            n_pad,
            batch_outer,
            batch_inner,
            "gemm B",
        )?
    } else {
        let k_pad = k.next_multiple_of(4);
        pack::pack_matrix(rec, b, k, n, k_pad, batch_outer, batch_inner, "gemm B")?
    };
    let a_binding = match a_source {
        AOperand::Buffer => {
            tile.a_source = 1;
            (5, a.tensor.into())
        }
        AOperand::TransposedBuffer => {
            tile.a_source = 2;
            tile.row_blocks = TRANSPOSED_A_ROW_BLOCKS;
            (6, a.tensor.into())
        }
        AOperand::Texture => {
            let a_tex = pack::pack_matrix(rec, a, m, k, m, batch_outer, batch_inner, "gemm A")?;
            (1, (&a_tex).into())
        }
    };
    let rows_per_group = (lanes * tile.row_blocks * SUBGROUPS_PER_WORKGROUP) as usize;
    let groups = [
        n.div_ceil(4 * lanes as usize) as u32,
        m.div_ceil(rows_per_group) as u32,
        batches as u32,
    ];
    rec.dispatch(
        subgroup_tile_key("gemm", lanes, tile),
        params,
        &[
            a_binding,
            (2, (&b_tex).into()),
            (3, bias.into()),
            (4, c.tensor.into()),
        ],
        groups,
    );
    Ok(())
}

/// Register-tile rows per lane block of the subgroup GEMM (RB in DESIGN.md's recipe).
pub const SUBGROUP_ROW_BLOCKS: u32 = 2;
/// Row blocks when A is read transposed from its buffer (ABUF = 2: the weight gradients of linear
/// layers, dW = dYᵀ X, small M and N over a long K): one, which halves the kernel that llvmpipe
/// JIT-compiles at the first step (2.7 -> 1.2 s) for GEMMs of a few milliseconds.
pub const TRANSPOSED_A_ROW_BLOCKS: u32 = 1;
/// Subgroups per workgroup, stacked along M.
pub const SUBGROUPS_PER_WORKGROUP: u32 = 1;

pub fn subgroup_key(entry: &'static str, lanes: u32) -> KernelKey {
    let rb = if entry == "gemm" {
        SUBGROUP_ROW_BLOCKS
    } else {
        super::conv2d::SUBGROUP_ROW_BLOCKS
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

/// y[R, out] = x[R, in] · Wᵀ + b, with torch's Linear weight layout W [out, in].
pub fn linear_forward(
    rec: &mut Recorder,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    y: &Tensor,
) -> OpResult {
    let (out_f, in_f) = weight_dims("linear_forward", weight)?;
    let rows = rows_of("linear_forward", x, in_f)?;
    expect_numel("linear_forward", "y", y, rows * out_f)?;
    gemm(
        rec,
        GemmShape::new(rows, out_f, in_f),
        MatRef::dense(x, in_f),
        MatRef::dense(weight, in_f).t(),
        bias,
        MatRef::dense(y, out_f),
    )
}

/// Backward of `linear_forward`: dx (+)= dy·W (skipped when None; the flag accumulates),
/// dW (+)= dyᵀ·x, db (+)= Σ_rows dy (`accumulate` adds into dW and db instead of overwriting).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    rec: &mut Recorder,
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    dx: Option<(&Tensor, bool)>,
    dweight: &Tensor,
    dbias: Option<&Tensor>,
    accumulate: bool,
) -> OpResult {
    const OP: &str = "linear_backward";
    let (out_f, in_f) = weight_dims(OP, weight)?;
    let rows = rows_of(OP, x, in_f)?;
    expect_numel(OP, "dy", dy, rows * out_f)?;
    expect_numel(OP, "dweight", dweight, out_f * in_f)?;
    let beta = if accumulate { 1.0 } else { 0.0 };
    if let Some((dx, dx_accumulate)) = dx {
        expect_numel(OP, "dx", dx, rows * in_f)?;
        gemm(
            rec,
            GemmShape::new(rows, in_f, out_f).scale(1.0, if dx_accumulate { 1.0 } else { 0.0 }),
            MatRef::dense(dy, out_f),
            MatRef::dense(weight, in_f),
            None,
            MatRef::dense(dx, in_f),
        )?;
    }
    gemm(
        rec,
        GemmShape::new(out_f, in_f, rows).scale(1.0, beta),
        MatRef::dense(dy, out_f).t(),
        MatRef::dense(x, in_f),
        None,
        MatRef::dense(dweight, in_f),
    )?;
    if let Some(db) = dbias {
        super::reduce::sum_rows(rec, dy, rows, out_f, db, accumulate)?;
    }
    Ok(())
}

fn weight_dims(op: &str, w: &Tensor) -> OpResult<(usize, usize)> {
    match *w.shape() {
        [o, i] => Ok((o, i)),
        [o, i, 1, 1] => Ok((o, i)),
        _ => Err(invalid(format!(
            "{op}: weight `{}` must be [out, in], has shape {:?}",
            w.label(),
            w.shape()
        ))),
    }
}

fn rows_of(op: &str, x: &Tensor, in_f: usize) -> OpResult<usize> {
    let last = *x.shape().last().unwrap_or(&0);
    if last != in_f || x.numel() == 0 {
        return Err(invalid(format!(
            "{op}: input `{}` has shape {:?}; its last dimension must be the {in_f} input features",
            x.label(),
            x.shape()
        )));
    }
    Ok(x.numel() / in_f)
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
    .map(|e| portable_key(e, PORTABLE_TILES))
    .collect();
    for lanes in [8, 16] {
        for entry in ["gemm", "conv2d_implicit", "conv2d_backward_weight"] {
            keys.push(subgroup_key(entry, lanes));
        }
        for a_source in 0..3 {
            for b_transposed in [false, true] {
                let mut tile = SubgroupTile::wide(lanes, SUBGROUP_ROW_BLOCKS);
                tile.a_source = a_source;
                if a_source == 2 {
                    tile.row_blocks = TRANSPOSED_A_ROW_BLOCKS;
                }
                tile.b_transposed = b_transposed;
                for c_width in [0, 2, 4] {
                    tile.c_width = c_width;
                    keys.push(subgroup_tile_key("gemm", lanes, tile));
                }
            }
        }
        // Narrow and wide conv tiles with each store width (n = output channels).
        let wide = 4 * lanes as usize;
        for n in [1, 2, wide - 1, wide - 2, wide] {
            let mut tile = super::conv2d::subgroup_conv_tile(lanes, n);
            tile.c_width = store_width(tile.lane_columns, n, &[n], 0);
            keys.push(subgroup_tile_key("conv2d_implicit", lanes, tile));
        }
        let mut co = 4;
        while co < 4 * lanes as usize {
            let tile = super::conv2d::subgroup_backward_weight_tile(lanes, co);
            keys.push(subgroup_tile_key("conv2d_backward_weight", lanes, tile));
            co *= 2;
        }
    }
    keys
}
