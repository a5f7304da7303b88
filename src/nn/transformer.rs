//! diffusers' `Transformer2DModel` (continuous input, `norm_type` "layer_norm"): the block through
//! which a Stable Diffusion U-Net attends to the text (Rombach et al. 2022, §3.3).
//!
//! y = x + proj_out(blocks(proj_in(GroupNorm(x)))), proj_in/proj_out 1×1 convolutions or, with
//! `use_linear_projection`, Linears (the same product over NHWC rows; only the weight's shape
//! differs). Each `BasicTransformerBlock` over the tokens h (one per pixel):
//! h += attn1(LN1(h)) (self-attention), h += attn2(LN2(h), context) (cross-attention: keys and
//! values from the text encoder's `last_hidden_state`, a key length unlike the query length),
//! h += ff(LN3(h)) with ff = Linear(GEGLU(Linear)) (Shazeer 2020). diffusers' `Attention`:
//! `to_q`/`to_k`/`to_v` without bias, `to_out.0` with, softmax(q kᵀ/√d_head) v per head.

use std::sync::Arc;

use super::attention::{AttentionCore, grads_of};
use super::layers::{GroupNorm, LayerNorm, Linear, ParamDecls};
use super::{Act, GradTracker, ParamStore};
use crate::gpu::{Gpu, Recorder, Tensor};
use crate::ops::OpResult;
use crate::ops::attention::AttentionShape;
use crate::ops::elementwise::axpby;
use crate::ops::gelu::{geglu_backward, geglu_forward};

/// The shape of a `Transformer2DModel` as UNet2DConditionModel builds it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TransformerSettings {
    pub heads: usize,
    pub head_dim: usize,
    /// Width of the context rows (`cross_attention_dim`).
    pub context_dim: usize,
    /// `transformer_layers_per_block`: BasicTransformerBlocks in a row.
    pub layers: usize,
    pub groups: usize,
    pub linear_projection: bool,
}

/// GroupNorm's eps in Transformer2DModel (diffusers fixes it at 1e-6) and the blocks' LayerNorm
/// eps (`norm_eps`, 1e-5 as UNet2DConditionModel leaves it).
const GROUP_NORM_EPS: f64 = 1e-6;
const LAYER_NORM_EPS: f64 = 1e-5;

/// diffusers' `Attention` without its norms: queries from `x` [samples · Tq, dim], keys and
/// values from `context` [samples · Tk, context_dim] (x itself for self-attention), the core
/// softmax(q kᵀ/√d_head) v per head in an [`AttentionCore`].
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    q: Act,
    k: Act,
    v: Act,
    core: AttentionCore,
    o: Act,
}

impl Attention {
    #[allow(clippy::too_many_arguments)]
    fn new(
        gpu: &Arc<Gpu>,
        decls: &mut ParamDecls,
        prefix: &str,
        (samples, query_tokens, key_tokens): (usize, usize, usize),
        dim: usize,
        context_dim: usize,
        (heads, head_dim): (usize, usize),
    ) -> Attention {
        let inner = heads * head_dim;
        let a = |shape: &[usize], what: &str| Act::new(gpu, shape, &format!("{prefix}.{what}"));
        let shape = AttentionShape {
            samples,
            query_tokens,
            key_tokens,
            heads,
            causal: false,
        };
        Attention {
            to_q: Linear::without_bias(decls, &format!("{prefix}.to_q"), dim, inner),
            to_k: Linear::without_bias(decls, &format!("{prefix}.to_k"), context_dim, inner),
            to_v: Linear::without_bias(decls, &format!("{prefix}.to_v"), context_dim, inner),
            to_out: Linear::new(decls, &format!("{prefix}.to_out.0"), inner, dim),
            q: a(&[samples * query_tokens, inner], "q"),
            k: a(&[samples * key_tokens, inner], "k"),
            v: a(&[samples * key_tokens, inner], "v"),
            core: AttentionCore::new(gpu, prefix, shape, head_dim),
            o: a(&[samples * query_tokens, inner], "o"),
        }
    }

    /// `out` = to_out(softmax(q kᵀ/√d) v).
    fn forward(
        &self,
        rec: &mut Recorder,
        p: &ParamStore,
        x: &Tensor,
        context: &Tensor,
        out: &Tensor,
    ) -> OpResult {
        self.to_q.forward(rec, p, x, &self.q.value)?;
        self.to_k.forward(rec, p, context, &self.k.value)?;
        self.to_v.forward(rec, p, context, &self.v.value)?;
        let (q, k, v) = (&self.q.value, &self.k.value, &self.v.value);
        self.core.forward(rec, q, k, v, &self.o.value)?;
        self.to_out.forward(rec, p, &self.o.value, out)
    }

    /// From `dout`: parameter gradients, x.grad and context.grad (+)= their parts (the same
    /// activation for self-attention, which the tracker accumulates).
    fn backward(
        &self,
        rec: &mut Recorder,
        p: &ParamStore,
        gt: &mut GradTracker,
        (x, context): (&Act, &Act),
        dout: &Tensor,
    ) -> OpResult {
        self.to_out.backward(rec, p, gt, &self.o, dout, true)?;
        let grads = grads_of(&self.q, &self.k, &self.v, &self.o);
        self.core.backward(rec, &grads)?;
        self.to_q.backward(rec, p, gt, x, &self.q.grad, true)?;
        self.to_k
            .backward(rec, p, gt, context, &self.k.grad, true)?;
        self.to_v.backward(rec, p, gt, context, &self.v.grad, true)
    }
}

/// diffusers' `BasicTransformerBlock` (layer_norm, self- then cross-attention, GEGLU ×4).
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
    normed1: Act,
    mid1: Act,
    normed2: Act,
    mid2: Act,
    normed3: Act,
    /// ff.net.0.proj's output [rows, 2 · inner] and GEGLU's [rows, inner].
    ff_hidden: Act,
    ff_gated: Act,
}

impl TransformerBlock {
    fn new(
        gpu: &Arc<Gpu>,
        decls: &mut ParamDecls,
        prefix: &str,
        (samples, tokens, context_tokens): (usize, usize, usize),
        s: &TransformerSettings,
    ) -> TransformerBlock {
        let dim = s.heads * s.head_dim;
        let rows = samples * tokens;
        let ff_inner = 4 * dim;
        let name = |n: &str| format!("{prefix}.{n}");
        let a = |shape: &[usize], what: &str| Act::new(gpu, shape, &name(what));
        let heads = (s.heads, s.head_dim);
        let self_tokens = (samples, tokens, tokens);
        let cross_tokens = (samples, tokens, context_tokens);
        let mut norm = |n: &str| LayerNorm::new(gpu, decls, &name(n), (rows, dim), LAYER_NORM_EPS);
        let (norm1, norm2, norm3) = (norm("norm1"), norm("norm2"), norm("norm3"));
        TransformerBlock {
            norm1,
            attn1: Attention::new(gpu, decls, &name("attn1"), self_tokens, dim, dim, heads),
            norm2,
            attn2: Attention::new(
                gpu,
                decls,
                &name("attn2"),
                cross_tokens,
                dim,
                s.context_dim,
                heads,
            ),
            norm3,
            ff_in: Linear::new(decls, &name("ff.net.0.proj"), dim, 2 * ff_inner),
            ff_out: Linear::new(decls, &name("ff.net.2"), ff_inner, dim),
            normed1: a(&[rows, dim], "normed1"),
            mid1: a(&[rows, dim], "mid1"),
            normed2: a(&[rows, dim], "normed2"),
            mid2: a(&[rows, dim], "mid2"),
            normed3: a(&[rows, dim], "normed3"),
            ff_hidden: a(&[rows, 2 * ff_inner], "ff hidden"),
            ff_gated: a(&[rows, ff_inner], "ff gated"),
        }
    }

    fn forward(
        &self,
        rec: &mut Recorder,
        p: &ParamStore,
        x: &Act,
        context: &Tensor,
        out: &Act,
    ) -> OpResult {
        self.norm1.forward(rec, p, x, &self.normed1)?;
        let n1 = &self.normed1.value;
        self.attn1.forward(rec, p, n1, n1, &self.mid1.value)?;
        axpby(rec, 1.0, &x.value, 1.0, &self.mid1.value)?;
        self.norm2.forward(rec, p, &self.mid1, &self.normed2)?;
        let n2 = &self.normed2.value;
        self.attn2.forward(rec, p, n2, context, &self.mid2.value)?;
        axpby(rec, 1.0, &self.mid1.value, 1.0, &self.mid2.value)?;
        self.norm3.forward(rec, p, &self.mid2, &self.normed3)?;
        let (hidden, gated) = (&self.ff_hidden.value, &self.ff_gated.value);
        self.ff_in.forward(rec, p, &self.normed3.value, hidden)?;
        geglu_forward(rec, hidden, gated)?;
        self.ff_out.forward(rec, p, gated, &out.value)?;
        axpby(rec, 1.0, &self.mid2.value, 1.0, &out.value)
    }

    /// `residual` (+)= `from`'s gradient: the identity path of `h += f(h)`.
    fn residual(rec: &mut Recorder, gt: &mut GradTracker, from: &Act, residual: &Act) -> OpResult {
        let beta = if gt.accumulate(&residual.grad) {
            1.0
        } else {
            0.0
        };
        axpby(rec, 1.0, &from.grad, beta, &residual.grad)
    }

    fn backward(
        &self,
        rec: &mut Recorder,
        p: &ParamStore,
        gt: &mut GradTracker,
        (x, context): (&Act, &Act),
        out: &Act,
    ) -> OpResult {
        Self::residual(rec, gt, out, &self.mid2)?;
        self.ff_out
            .backward(rec, p, gt, &self.ff_gated, &out.grad, true)?;
        let hidden = &self.ff_hidden;
        geglu_backward(rec, &hidden.value, &self.ff_gated.grad, &hidden.grad)?;
        self.ff_in
            .backward(rec, p, gt, &self.normed3, &hidden.grad, true)?;
        self.norm3.backward(rec, p, gt, &self.mid2, &self.normed3)?;
        Self::residual(rec, gt, &self.mid2, &self.mid1)?;
        let inputs = (&self.normed2, context);
        self.attn2.backward(rec, p, gt, inputs, &self.mid2.grad)?;
        self.norm2.backward(rec, p, gt, &self.mid1, &self.normed2)?;
        Self::residual(rec, gt, &self.mid1, x)?;
        let inputs = (&self.normed1, &self.normed1);
        self.attn1.backward(rec, p, gt, inputs, &self.mid1.grad)?;
        self.norm1.backward(rec, p, gt, x, &self.normed1)
    }
}

/// `Transformer2DModel` over NHWC activations [samples, h, w, C], attending to a context of
/// [samples, context_tokens, context_dim].
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<TransformerBlock>,
    proj_out: Linear,
    normed: Act,
    /// The token stream [samples · h·w, inner] entering each block and leaving the last.
    stream: Vec<Act>,
}

impl Transformer2D {
    pub fn new(
        gpu: &Arc<Gpu>,
        decls: &mut ParamDecls,
        prefix: &str,
        x_shape: &[usize],
        context_tokens: usize,
        s: &TransformerSettings,
    ) -> Transformer2D {
        let [n, h, w, c] = [x_shape[0], x_shape[1], x_shape[2], x_shape[3]];
        let inner = s.heads * s.head_dim;
        let rows = n * h * w;
        let name = |what: &str| format!("{prefix}.{what}");
        let projection = if s.linear_projection {
            Linear::new
        } else {
            Linear::conv1x1
        };
        let norm = GroupNorm::new(gpu, decls, &name("norm"), x_shape, s.groups, GROUP_NORM_EPS);
        let proj_in = projection(decls, &name("proj_in"), c, inner);
        let blocks = (0..s.layers)
            .map(|i| {
                let prefix = name(&format!("transformer_blocks.{i}"));
                TransformerBlock::new(gpu, decls, &prefix, (n, h * w, context_tokens), s)
            })
            .collect();
        Transformer2D {
            norm,
            proj_in,
            blocks,
            proj_out: projection(decls, &name("proj_out"), inner, c),
            normed: Act::new(gpu, x_shape, &name("normed")),
            stream: (0..=s.layers)
                .map(|i| Act::new(gpu, &[rows, inner], &name(&format!("stream {i}"))))
                .collect(),
        }
    }

    fn rows(a: &Act) -> Act {
        let s = a.shape();
        let rows = [s[0] * s[1] * s[2], s[3]];
        Act {
            value: a.value.reshape(&rows),
            grad: a.grad.reshape(&rows),
        }
    }

    /// `out` = x + proj_out(blocks(proj_in(GroupNorm(x)), context)); `context` [samples · Tk,
    /// context_dim].
    pub fn forward(
        &self,
        rec: &mut Recorder,
        p: &ParamStore,
        x: &Act,
        context: &Tensor,
        out: &Act,
    ) -> OpResult {
        self.norm.forward(rec, p, x, &self.normed)?;
        let normed = Self::rows(&self.normed);
        self.proj_in
            .forward(rec, p, &normed.value, &self.stream[0].value)?;
        for (i, block) in self.blocks.iter().enumerate() {
            block.forward(rec, p, &self.stream[i], context, &self.stream[i + 1])?;
        }
        let last = self.stream.last().expect("one stream more than blocks");
        let out_rows = Self::rows(out);
        self.proj_out
            .forward(rec, p, &last.value, &out_rows.value)?;
        axpby(rec, 1.0, &x.value, 1.0, &out.value)
    }

    /// From out.grad: parameter gradients (+=), x.grad and context.grad (+)= their parts.
    pub fn backward(
        &self,
        rec: &mut Recorder,
        p: &ParamStore,
        gt: &mut GradTracker,
        (x, context): (&Act, &Act),
        out: &Act,
    ) -> OpResult {
        TransformerBlock::residual(rec, gt, out, x)?;
        let last = self.stream.last().expect("one stream more than blocks");
        let out_rows = Self::rows(out);
        self.proj_out
            .backward(rec, p, gt, last, &out_rows.grad, true)?;
        for (i, block) in self.blocks.iter().enumerate().rev() {
            block.backward(rec, p, gt, (&self.stream[i], context), &self.stream[i + 1])?;
        }
        let normed = Self::rows(&self.normed);
        self.proj_in
            .backward(rec, p, gt, &normed, &self.stream[0].grad, true)?;
        self.norm.backward(rec, p, gt, x, &self.normed)
    }
}
