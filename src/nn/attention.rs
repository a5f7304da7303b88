//! The core of multi-head attention, O = softmax(scale · Q Kᵀ) V per (sample, head), between the
//! projections that every attention of the project has around it: the VAE's and UNet2DModel's
//! `AttentionBlock`, the `Transformer2DModel`'s self- and cross-attention and the CLIP text
//! encoder's causal self-attention. One place decides how it runs:
//!
//! - **fused** (`shaders/attention_subgroup.wgsl`, [`crate::ops::attention`]) where the kernels
//!   apply (subgroup GEMM path, head width a multiple of 4 up to 160): no Tq × Tk matrix in
//!   memory, only each query row's log-sum-exp and D_i for the backward;
//! - **unfused** elsewhere: GEMM, (causal mask,) softmax, GEMM, keeping the probabilities for the
//!   backward (dP = dO Vᵀ, dV = Pᵀ dO, dS = softmax'(P) dP, dQ = s dS K, dK = s dSᵀ Q).
//!
//! Either way the core computes in f32 in a half-precision run (`Recorder::full_precision`
//! around the unfused GEMMs; the fused kernels have no f16 variant): only the projections
//! around it take f16 operands.
//!
//! q, o and their gradients are `[samples · Tq, heads · head_dim]` rows, k, v and theirs
//! `[samples · Tk, heads · head_dim]`, head h in columns h · head_dim ..

use std::sync::Arc;

use super::Act;
use crate::gpu::{Gpu, Recorder, Tensor};
use crate::ops::OpResult;
use crate::ops::attention::{
    AttentionGrads, AttentionShape, attention_backward, attention_forward, fused_kernel, stats_len,
};
use crate::ops::elementwise::causal_mask;
use crate::ops::gemm::{GemmShape, MatRef, gemm};
use crate::ops::softmax::{softmax_backward, softmax_forward};

enum Storage {
    Fused {
        stats: Tensor,
    },
    /// The scores, the probabilities (whose gradient is dP) and dS, each [samples · heads · Tq, Tk].
    Unfused {
        scores: Tensor,
        probs: Act,
        dscores: Tensor,
    },
}

/// softmax(scale · Q Kᵀ) V with its own scratch, for one attention of a network.
pub struct AttentionCore {
    shape: AttentionShape,
    head_dim: usize,
    storage: Storage,
}

impl AttentionCore {
    /// The core of an attention labelled `prefix`, fused when the adapter's kernels allow.
    pub fn new(gpu: &Arc<Gpu>, prefix: &str, shape: AttentionShape, head_dim: usize) -> Self {
        let fused = fused_kernel(gpu, head_dim, shape.heads * head_dim).is_some();
        Self::build(gpu, prefix, shape, head_dim, fused)
    }

    /// The GEMM + softmax + GEMM core even where a fused kernel applies (for comparisons).
    pub fn unfused(gpu: &Arc<Gpu>, prefix: &str, shape: AttentionShape, head_dim: usize) -> Self {
        Self::build(gpu, prefix, shape, head_dim, false)
    }

    fn build(
        gpu: &Arc<Gpu>,
        prefix: &str,
        shape: AttentionShape,
        head_dim: usize,
        fused: bool,
    ) -> Self {
        let AttentionShape {
            samples,
            query_tokens: tq,
            key_tokens: tk,
            heads,
            ..
        } = shape;
        let storage = if fused {
            Storage::Fused {
                stats: gpu.tensor(
                    &[stats_len(samples, heads, tq)],
                    &format!("{prefix}.softmax stats"),
                ),
            }
        } else {
            let square = [samples * heads * tq, tk];
            Storage::Unfused {
                scores: gpu.tensor(&square, &format!("{prefix}.scores")),
                // The core computes in f32 in a half-precision run, as the fused kernels do.
                probs: Act::new_f32(gpu, &square, &format!("{prefix}.probs")),
                dscores: gpu.grad_tensor(&square, &format!("{prefix}.dscores")),
            }
        };
        AttentionCore {
            shape,
            head_dim,
            storage,
        }
    }

    /// Whether the fused kernels run this attention.
    pub fn fused(&self) -> bool {
        matches!(self.storage, Storage::Fused { .. })
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// One head's [tokens, head_dim] slice of a [samples · tokens, heads · head_dim] activation.
    fn heads_of<'a>(&self, t: &'a Tensor, tokens: usize) -> MatRef<'a> {
        let inner = self.shape.heads * self.head_dim;
        MatRef::dense(t, inner).batched(tokens * inner, self.head_dim)
    }

    /// One (sample, head)'s [Tq, Tk] matrix.
    fn square<'a>(&self, t: &'a Tensor) -> MatRef<'a> {
        let (tq, tk) = (self.shape.query_tokens, self.shape.key_tokens);
        MatRef::dense(t, tk).batched(self.shape.heads * tq * tk, tq * tk)
    }

    /// o = softmax(scale · q kᵀ) v, scale = 1/√head_dim.
    pub fn forward(
        &self,
        rec: &mut Recorder,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
    ) -> OpResult {
        let (scores, probs) = match &self.storage {
            Storage::Fused { stats } => {
                return attention_forward(rec, self.shape, q, k, v, o, stats, self.scale());
            }
            Storage::Unfused { scores, probs, .. } => (scores, &probs.value),
        };
        // The core keeps f32 operands in a half-precision run, as the fused kernels compute it:
        // the numerics do not depend on which of the two runs.
        rec.full_precision(|rec| self.forward_unfused(rec, (q, k, v, o), scores, probs))
    }

    fn forward_unfused(
        &self,
        rec: &mut Recorder,
        (q, k, v, o): (&Tensor, &Tensor, &Tensor, &Tensor),
        scores: &Tensor,
        probs: &Tensor,
    ) -> OpResult {
        let AttentionShape {
            samples: n,
            query_tokens: tq,
            key_tokens: tk,
            heads,
            causal,
        } = self.shape;
        let dh = self.head_dim;
        let sh = GemmShape::new(tq, tk, dh)
            .batches(n, heads)
            .scale(self.scale(), 0.0);
        let (qh, kh) = (self.heads_of(q, tq), self.heads_of(k, tk));
        gemm(rec, sh, qh, kh.t(), None, self.square(scores))?;
        if causal {
            causal_mask(rec, scores)?;
        }
        softmax_forward(rec, scores, probs)?;
        let sh = GemmShape::new(tq, dh, tk).batches(n, heads);
        let (p, vh) = (self.square(probs), self.heads_of(v, tk));
        gemm(rec, sh, p, vh, None, self.heads_of(o, tq))
    }

    /// dq, dk, dv (overwritten) for the upstream gradient `t.d_o`, after [`forward`](Self::forward)
    /// recorded o from the same q, k, v.
    pub fn backward(&self, rec: &mut Recorder, t: &AttentionGrads) -> OpResult {
        let (probs, dscores) = match &self.storage {
            Storage::Fused { stats } => {
                return attention_backward(rec, self.shape, t, stats, self.scale());
            }
            Storage::Unfused { probs, dscores, .. } => (probs, dscores),
        };
        rec.full_precision(|rec| self.backward_unfused(rec, t, probs, dscores))
    }

    fn backward_unfused(
        &self,
        rec: &mut Recorder,
        t: &AttentionGrads,
        probs: &Act,
        dscores: &Tensor,
    ) -> OpResult {
        let AttentionShape {
            samples: n,
            query_tokens: tq,
            key_tokens: tk,
            heads: h,
            ..
        } = self.shape;
        let dh = self.head_dim;
        let d_o = self.heads_of(t.d_o, tq);
        // dP = dO · Vᵀ ; dV = Pᵀ · dO
        let sh = GemmShape::new(tq, tk, dh).batches(n, h);
        let v = self.heads_of(t.v, tk);
        gemm(rec, sh, d_o, v.t(), None, self.square(&probs.grad))?;
        let sh = GemmShape::new(tk, dh, tq).batches(n, h);
        let pt = self.square(&probs.value).t();
        gemm(rec, sh, pt, d_o, None, self.heads_of(t.dv, tk))?;
        // Masked probabilities are exactly zero, so their dS is too.
        softmax_backward(rec, &probs.value, &probs.grad, dscores)?;
        // dQ = s · dS · K ; dK = s · dSᵀ · Q
        let ds = self.square(dscores);
        let sh = GemmShape::new(tq, dh, tk)
            .batches(n, h)
            .scale(self.scale(), 0.0);
        let k = self.heads_of(t.k, tk);
        gemm(rec, sh, ds, k, None, self.heads_of(t.dq, tq))?;
        let sh = GemmShape::new(tk, dh, tq)
            .batches(n, h)
            .scale(self.scale(), 0.0);
        let q = self.heads_of(t.q, tq);
        gemm(rec, sh, ds.t(), q, None, self.heads_of(t.dk, tk))
    }
}

/// The backward's tensors when q, k, v and o are activations kept with their gradients.
pub fn grads_of<'a>(q: &'a Act, k: &'a Act, v: &'a Act, o: &'a Act) -> AttentionGrads<'a> {
    AttentionGrads {
        q: &q.value,
        k: &k.value,
        v: &v.value,
        o: &o.value,
        d_o: &o.grad,
        dq: &q.grad,
        dk: &k.grad,
        dv: &v.grad,
    }
}
