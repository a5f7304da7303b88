//! Batched GEMM (`shaders/gemm.wgsl`, portable; `shaders/gemm_subgroup.wgsl`, subgroup path):
//! C = alpha·op(A)·op(B) + beta·C (+ bias), and the linear layer built on it.

pub use super::tiles::MatRef;
use super::tiles::{
    GEMM_ROW_BLOCKS, GemmParams, PORTABLE_TILES, SUBGROUPS_PER_WORKGROUP, SubgroupTile,
    TRANSPOSED_A_ROW_BLOCKS, portable_key, store_width, subgroup_tile_key,
};
use super::{OpResult, expect_distinct, expect_numel, invalid, pack, u32_of};
use crate::gpu::{Binding, GemmPath, Recorder, Tensor};

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
    if matches!(rec.gpu.gemm_path, GemmPath::Subgroup { .. })
        && batch_outer * batch_inner > 1
        && !subgroup_fits(rec, (&a, &b), (m, n, k), batch_outer * batch_inner)
    {
        return gemm_in_batch_chunks(rec, shape, (a, b, c), bias);
    }
    rec.add_flops(shape.flops());
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
    if let GemmPath::Subgroup { lanes } = rec.gpu.gemm_path
        && subgroup_fits(rec, (&a, &b), (m, n, k), batches)
    {
        let a_source = AOperand::choose(&a, k);
        return gemm_subgroup(rec, lanes, &params, shape, a_source, &a, &b, &bias_t, &c);
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
        portable_key("gemm", t, rec.half_operands()),
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

/// Whether the subgroup path's packed textures hold `batches` batches of A and B.
fn subgroup_fits(
    rec: &Recorder,
    (a, b): (&MatRef, &MatRef),
    (m, n, k): (usize, usize, usize),
    batches: usize,
) -> bool {
    let a_fits =
        AOperand::choose(a, k) != AOperand::Texture || pack::fits_texture(&rec.gpu, m * batches, k);
    let b_fits = if b.trans {
        pack::fits_texture(&rec.gpu, n.next_multiple_of(4) * batches, k)
    } else {
        pack::fits_texture(&rec.gpu, k.next_multiple_of(4) * batches, n)
    };
    a_fits && b_fits
}

/// A batched GEMM whose packed operands exceed the texture limit as one dispatch (attention
/// over many samples and heads) as several, each over as many batches as fit: the subgroup
/// path throughout instead of the portable kernel, which lavapipe runs ~1000× slower. Outer
/// batches are split first; when one outer batch is already too large, its inner batches.
fn gemm_in_batch_chunks(
    rec: &mut Recorder,
    shape: GemmShape,
    (a, b, c): (MatRef, MatRef, MatRef),
    bias: Option<&Tensor>,
) -> OpResult {
    let (outer, inner) = (shape.batch_outer, shape.batch_inner);
    let fits = |rec: &Recorder, batches: usize| {
        subgroup_fits(rec, (&a, &b), (shape.m, shape.n, shape.k), batches)
    };
    fn shifted<'t>(r: &MatRef<'t>, o: usize, i: usize) -> MatRef<'t> {
        MatRef {
            offset: r.offset + o * r.batch_outer + i * r.batch_inner,
            ..*r
        }
    }
    if outer > 1 && fits(rec, inner) {
        let mut step = outer;
        while !fits(rec, step * inner) {
            step = step.div_ceil(2);
        }
        for o in (0..outer).step_by(step) {
            let part = shape.batches(step.min(outer - o), inner);
            let (a, b, c) = (shifted(&a, o, 0), shifted(&b, o, 0), shifted(&c, o, 0));
            gemm(rec, part, a, b, bias, c)?;
        }
        return Ok(());
    }
    let mut step = inner;
    while step > 1 && !fits(rec, step) {
        step = step.div_ceil(2);
    }
    for o in 0..outer {
        for i in (0..inner).step_by(step) {
            let part = shape.batches(1, step.min(inner - i));
            let (a, b, c) = (shifted(&a, o, i), shifted(&b, o, i), shifted(&c, o, i));
            gemm(rec, part, a, b, bias, c)?;
        }
    }
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
    let mut tile = SubgroupTile::wide(lanes, GEMM_ROW_BLOCKS);
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
    tile.half = b_tex.half;
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
