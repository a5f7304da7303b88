//! Layers: conv, linear, group norm, layer norm, the diffusers ResnetBlock2D, Attention, Downsample2D and
//! Upsample2D. A layer holds its parameter *names* (resolved in the flat [`ParamStore`] when it
//! records) and the activations it keeps for backward; everything is allocated at build time.

use std::sync::Arc;

use super::attention::{AttentionCore, grads_of};
use super::{Act, GradTracker, ParamStore};
use crate::gpu::{Gpu, Recorder, Tensor};
use crate::ops::attention::AttentionShape;
use crate::ops::conv2d::{
    Conv2dGeometry, conv2d_backward_input, conv2d_backward_weight, conv2d_forward,
};
use crate::ops::elementwise::{add_channel_bias, axpby};
use crate::ops::gemm::{linear_backward, linear_forward};
use crate::ops::group_norm::{
    group_norm_backward, group_norm_forward, group_norm_silu_backward, group_norm_silu_forward,
};
use crate::ops::layer_norm::{LayerNormGrads, layer_norm_backward, layer_norm_forward};
use crate::ops::noise::dropout;
use crate::ops::reduce::sum_pixels_per_sample;
use crate::ops::upsample::{upsample_nearest2x_backward, upsample_nearest2x_forward};
use crate::ops::{OpResult, invalid};

/// Collects (name, shape) of every parameter while the model is built.
#[derive(Default)]
pub struct ParamDecls(pub Vec<(String, Vec<usize>)>);

impl ParamDecls {
    fn add(&mut self, name: String, shape: &[usize]) -> String {
        self.0.push((name.clone(), shape.to_vec()));
        name
    }
}

pub struct Conv2d {
    pub weight: String,
    pub bias: String,
    pub geometry: Conv2dGeometry,
}

impl Conv2d {
    pub fn new(
        decls: &mut ParamDecls,
        prefix: &str,
        cin: usize,
        cout: usize,
        k: usize,
        geometry: Conv2dGeometry,
    ) -> Conv2d {
        Conv2d {
            weight: decls.add(format!("{prefix}.weight"), &[cout, cin, k, k]),
            bias: decls.add(format!("{prefix}.bias"), &[cout]),
            geometry,
        }
    }
    pub fn forward(&self, rec: &mut Recorder, p: &ParamStore, x: &Act, y: &Act) -> OpResult {
        let (w, _) = p.get(&self.weight);
        let (b, _) = p.get(&self.bias);
        conv2d_forward(rec, &x.value, &w, Some(&b), &y.value, &self.geometry)
    }
    /// Parameter gradients (+=) and, when `need_dx`, x.grad (+)= ∂/∂x.
    pub fn backward(
        &self,
        rec: &mut Recorder,
        p: &ParamStore,
        gt: &mut GradTracker,
        x: &Act,
        y: &Act,
        need_dx: bool,
    ) -> OpResult {
        let (w, dw) = p.get(&self.weight);
        let (_, db) = p.get(&self.bias);
        conv2d_backward_weight(rec, &x.value, &y.grad, &dw, Some(&db), &self.geometry, true)?;
        if need_dx {
            let acc = gt.accumulate(&x.grad);
            conv2d_backward_input(rec, &y.grad, &w, &x.grad, &self.geometry, acc)?;
        }
        Ok(())
    }
}

pub struct Linear {
    pub weight: String,
    /// None for diffusers' attention projections `to_q`/`to_k`/`to_v` (bias=False).
    pub bias: Option<String>,
}

impl Linear {
    pub fn new(decls: &mut ParamDecls, prefix: &str, fin: usize, fout: usize) -> Linear {
        Linear::declare(decls, prefix, &[fout, fin], true)
    }
    /// A Linear without a bias.
    pub fn without_bias(decls: &mut ParamDecls, prefix: &str, fin: usize, fout: usize) -> Linear {
        Linear::declare(decls, prefix, &[fout, fin], false)
    }
    /// A 1×1 convolution (weight [fout, fin, 1, 1]), which over NHWC rows is a Linear.
    pub fn conv1x1(decls: &mut ParamDecls, prefix: &str, fin: usize, fout: usize) -> Linear {
        Linear::declare(decls, prefix, &[fout, fin, 1, 1], true)
    }
    fn declare(decls: &mut ParamDecls, prefix: &str, shape: &[usize], bias: bool) -> Linear {
        Linear {
            weight: decls.add(format!("{prefix}.weight"), shape),
            bias: bias.then(|| decls.add(format!("{prefix}.bias"), &shape[..1])),
        }
    }
    /// The weight as [out, in] and its gradient.
    fn weight_of(&self, p: &ParamStore) -> (Tensor, Tensor) {
        let (w, dw) = p.get(&self.weight);
        let rows = w.shape()[0];
        let shape = [rows, w.numel() / rows];
        (w.reshape(&shape), dw.reshape(&shape))
    }
    pub fn forward(&self, rec: &mut Recorder, p: &ParamStore, x: &Tensor, y: &Tensor) -> OpResult {
        let (w, _) = self.weight_of(p);
        let b = self.bias.as_ref().map(|b| p.get(b).0);
        linear_forward(rec, x, &w, b.as_ref(), y)
    }
    pub fn backward(
        &self,
        rec: &mut Recorder,
        p: &ParamStore,
        gt: &mut GradTracker,
        x: &Act,
        dy: &Tensor,
        need_dx: bool,
    ) -> OpResult {
        let dx = if need_dx {
            Some((&x.grad, gt.accumulate(&x.grad)))
        } else {
            None
        };
        self.backward_rows(rec, p, &x.value, dy, dx)
    }
    /// Parameter gradients (+=) from `dy` and, when given, `dx` (`true`: added into it).
    pub fn backward_rows(
        &self,
        rec: &mut Recorder,
        p: &ParamStore,
        x: &Tensor,
        dy: &Tensor,
        dx: Option<(&Tensor, bool)>,
    ) -> OpResult {
        let (w, dw) = self.weight_of(p);
        let db = self.bias.as_ref().map(|b| p.get(b).1);
        linear_backward(rec, x, &w, dy, dx, &dw, db.as_ref(), true)
    }
}

/// LayerNorm over the last dimension with an affine (torch.nn.LayerNorm), keeping each row's
/// (mean, rstd) for the backward.
pub struct LayerNorm {
    pub weight: String,
    pub bias: String,
    pub eps: f32,
    stats: Tensor,
}

impl LayerNorm {
    pub fn new(
        gpu: &Arc<Gpu>,
        decls: &mut ParamDecls,
        prefix: &str,
        (rows, width): (usize, usize),
        eps: f64,
    ) -> LayerNorm {
        LayerNorm {
            weight: decls.add(format!("{prefix}.weight"), &[width]),
            bias: decls.add(format!("{prefix}.bias"), &[width]),
            eps: eps as f32,
            stats: gpu.tensor(&[rows, 2], &format!("{prefix} stats")),
        }
    }
    pub fn forward(&self, rec: &mut Recorder, p: &ParamStore, x: &Act, y: &Act) -> OpResult {
        let (g, b) = (p.get(&self.weight).0, p.get(&self.bias).0);
        layer_norm_forward(rec, &x.value, (&g, &b), self.eps, &y.value, &self.stats)
    }
    /// γ, β gradients (+=) and x.grad (+)= ∂/∂x from y.grad.
    pub fn backward(
        &self,
        rec: &mut Recorder,
        p: &ParamStore,
        gt: &mut GradTracker,
        x: &Act,
        y: &Act,
    ) -> OpResult {
        let ((g, dg), db) = (p.get(&self.weight), p.get(&self.bias).1);
        let grads = LayerNormGrads {
            dx: &x.grad,
            add_dx: gt.accumulate(&x.grad),
            dgamma: &dg,
            dbeta: &db,
        };
        layer_norm_backward(rec, &x.value, &g, &self.stats, &y.grad, &grads)
    }
}

pub struct GroupNorm {
    pub weight: String,
    pub bias: String,
    pub groups: usize,
    pub eps: f32,
    mean: Tensor,
    rstd: Tensor,
}

impl GroupNorm {
    pub fn new(
        gpu: &Arc<Gpu>,
        decls: &mut ParamDecls,
        prefix: &str,
        x_shape: &[usize],
        groups: usize,
        eps: f64,
    ) -> GroupNorm {
        let (n, c) = (x_shape[0], x_shape[3]);
        GroupNorm {
            weight: decls.add(format!("{prefix}.weight"), &[c]),
            bias: decls.add(format!("{prefix}.bias"), &[c]),
            groups,
            eps: eps as f32,
            mean: gpu.tensor(&[n * groups], &format!("{prefix} mean")),
            rstd: gpu.tensor(&[n * groups], &format!("{prefix} rstd")),
        }
    }
    pub fn forward(&self, rec: &mut Recorder, p: &ParamStore, x: &Act, y: &Act) -> OpResult {
        self.forward_with(rec, p, x, y, false)
    }
    /// y = SiLU(GroupNorm(x)) in one pass (the normalised value is not stored).
    pub fn forward_silu(&self, rec: &mut Recorder, p: &ParamStore, x: &Act, y: &Act) -> OpResult {
        self.forward_with(rec, p, x, y, true)
    }
    fn forward_with(
        &self,
        rec: &mut Recorder,
        p: &ParamStore,
        x: &Act,
        y: &Act,
        silu: bool,
    ) -> OpResult {
        let (g, _) = p.get(&self.weight);
        let (b, _) = p.get(&self.bias);
        let op = if silu {
            group_norm_silu_forward
        } else {
            group_norm_forward
        };
        op(
            rec,
            &x.value,
            &g,
            &b,
            self.groups,
            self.eps,
            &y.value,
            &self.mean,
            &self.rstd,
        )
    }

    pub fn backward(
        &self,
        rec: &mut Recorder,
        p: &ParamStore,
        gt: &mut GradTracker,
        x: &Act,
        y: &Act,
    ) -> OpResult {
        self.backward_with(rec, p, gt, x, y, false)
    }

    /// Backward of [`GroupNorm::forward_silu`]: `y` is the SiLU's output.
    pub fn backward_silu(
        &self,
        rec: &mut Recorder,
        p: &ParamStore,
        gt: &mut GradTracker,
        x: &Act,
        y: &Act,
    ) -> OpResult {
        self.backward_with(rec, p, gt, x, y, true)
    }

    fn backward_with(
        &self,
        rec: &mut Recorder,
        p: &ParamStore,
        gt: &mut GradTracker,
        x: &Act,
        y: &Act,
        silu: bool,
    ) -> OpResult {
        let (g, dg) = p.get(&self.weight);
        let (b, db) = p.get(&self.bias);
        // dx is added into x's gradient in the kernel when another path already wrote it.
        let add = gt.accumulate(&x.grad);
        let dx = &x.grad;
        if silu {
            group_norm_silu_backward(
                rec, &x.value, &y.grad, &g, &b, &self.mean, &self.rstd, dx, &dg, &db, true, add,
            )
        } else {
            group_norm_backward(
                rec, &x.value, &y.grad, &g, &self.mean, &self.rstd, dx, &dg, &db, true, add,
            )
        }
    }
}

/// diffusers ResnetBlock2D (time_embedding_norm "default", pre-norm, SiLU):
/// out = (shortcut(x) + conv2(dropout(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb))))))) / scale,
/// without the `proj(silu(temb))` term in a model without a time embedding (the VAE's blocks,
/// `temb_channels=None`).
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale: f32,
    /// Dropout after the second SiLU (training only): (p, RNG purpose, mask output).
    dropout: Option<(f32, u32, Act)>,
    /// silu(norm1(x)) and silu(norm2(h)): each pair runs fused, the normalised value unstored.
    s1: Act,
    c1: Act,
    tproj: Option<Act>,
    s2: Act,
    c2: Act,
    shortcut: Option<Act>,
}

/// Shapes and hyperparameters shared by the blocks of one model.
#[derive(Clone, Copy)]
pub struct BlockSettings {
    pub groups: usize,
    pub eps: f64,
    /// The time embedding's width; 0: the model has none (the resnets have no `time_emb_proj`).
    pub temb_dim: usize,
}

impl ResnetBlock {
    #[allow(clippy::too_many_arguments)]
    /// `x` is the block's input, `out` its output (allocated by the caller, [N,H,W,cout]).
    pub fn new(
        gpu: &Arc<Gpu>,
        decls: &mut ParamDecls,
        prefix: &str,
        x_shape: &[usize],
        cout: usize,
        s: BlockSettings,
        output_scale: f64,
        out: &Act,
        dropout: Option<(f32, u32)>,
    ) -> ResnetBlock {
        let [n, h, w, cin] = [x_shape[0], x_shape[1], x_shape[2], x_shape[3]];
        let hs = [n, h, w, cout];
        let a = |shape: &[usize], what: &str| Act::new(gpu, shape, &format!("{prefix}.{what}"));
        // The run's activation type (f16 in a half-precision run), as every Act's.
        let dtype = gpu.activation_dtype();
        // With output_scale 1, conv2's output gradient *is* the block's output gradient.
        let c2 = if output_scale == 1.0 {
            Act {
                value: gpu.activation_tensor_of(&hs, dtype, &format!("{prefix}.conv2")),
                grad: out.grad.clone(),
            }
        } else {
            a(&hs, "conv2")
        };
        ResnetBlock {
            norm1: GroupNorm::new(
                gpu,
                decls,
                &format!("{prefix}.norm1"),
                x_shape,
                s.groups,
                s.eps,
            ),
            conv1: Conv2d::new(
                decls,
                &format!("{prefix}.conv1"),
                cin,
                cout,
                3,
                Conv2dGeometry::same(1, 1),
            ),
            time_emb_proj: (s.temb_dim > 0)
                .then(|| Linear::new(decls, &format!("{prefix}.time_emb_proj"), s.temb_dim, cout)),
            norm2: GroupNorm::new(gpu, decls, &format!("{prefix}.norm2"), &hs, s.groups, s.eps),
            conv2: Conv2d::new(
                decls,
                &format!("{prefix}.conv2"),
                cout,
                cout,
                3,
                Conv2dGeometry::same(1, 1),
            ),
            conv_shortcut: (cin != cout).then(|| {
                Conv2d::new(
                    decls,
                    &format!("{prefix}.conv_shortcut"),
                    cin,
                    cout,
                    1,
                    Conv2dGeometry::same(1, 0),
                )
            }),
            output_scale: output_scale as f32,
            dropout: dropout.map(|(p, purpose)| (p, purpose, a(&hs, "dropout"))),
            s1: a(x_shape, "silu1"),
            c1: a(&hs, "conv1"),
            tproj: (s.temb_dim > 0).then(|| a(&[n, cout], "time_emb_proj")),
            s2: a(&hs, "silu2"),
            c2,
            shortcut: (cin != cout).then(|| {
                if output_scale == 1.0 {
                    Act {
                        value: gpu.activation_tensor_of(
                            &hs,
                            dtype,
                            &format!("{prefix}.conv_shortcut"),
                        ),
                        grad: out.grad.clone(),
                    }
                } else {
                    a(&hs, "conv_shortcut")
                }
            }),
        }
    }

    /// The time-embedding projection and its output, with silu(temb), or None for a block
    /// without one; an error when the block has one and `temb_act` is missing.
    fn temb<'a>(
        &'a self,
        temb_act: Option<&'a Act>,
    ) -> OpResult<Option<(&'a Linear, &'a Act, &'a Act)>> {
        match (&self.time_emb_proj, &self.tproj, temb_act) {
            (Some(l), Some(t), Some(e)) => Ok(Some((l, t, e))),
            (None, _, _) => Ok(None),
            _ => Err(invalid(
                "this resnet block projects a time embedding and none was given",
            )),
        }
    }

    /// `temb_act` = silu(time embedding), shared by every block (None in a model without one).
    /// `rng` = (state, first stream index) for dropout, when the block has dropout.
    pub fn forward(
        &self,
        rec: &mut Recorder,
        p: &ParamStore,
        x: &Act,
        temb_act: Option<&Act>,
        out: &Act,
        rng: Option<(&Tensor, u32)>,
    ) -> OpResult {
        self.norm1.forward_silu(rec, p, x, &self.s1)?;
        self.conv1.forward(rec, p, &self.s1, &self.c1)?;
        if let Some((proj, tproj, temb_act)) = self.temb(temb_act)? {
            proj.forward(rec, p, &temb_act.value, &tproj.value)?;
            add_channel_bias(rec, &tproj.value, 1.0, &self.c1.value)?;
        }
        self.norm2.forward_silu(rec, p, &self.c1, &self.s2)?;
        match (&self.dropout, rng) {
            (Some((prob, purpose, d)), Some((state, first))) => {
                dropout(rec, state, *purpose, first, *prob, &self.s2.value, &d.value)?;
                self.conv2.forward(rec, p, d, &self.c2)?;
            }
            (Some(_), None) => {
                return Err(invalid(
                    "resnet dropout needs the RNG state (training mode)",
                ));
            }
            (None, _) => self.conv2.forward(rec, p, &self.s2, &self.c2)?,
        }
        let residual = match (&self.conv_shortcut, &self.shortcut) {
            (Some(conv), Some(sc)) => {
                conv.forward(rec, p, x, sc)?;
                &sc.value
            }
            _ => &x.value,
        };
        crate::ops::elementwise::add(rec, residual, &self.c2.value, &out.value)?;
        if self.output_scale != 1.0 {
            crate::ops::elementwise::scale(rec, 1.0 / self.output_scale, &out.value)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        rec: &mut Recorder,
        p: &ParamStore,
        gt: &mut GradTracker,
        x: &Act,
        temb_act: Option<&Act>,
        out: &Act,
        rng: Option<(&Tensor, u32)>,
    ) -> OpResult {
        if self.output_scale != 1.0 {
            axpby(rec, 1.0 / self.output_scale, &out.grad, 0.0, &self.c2.grad)?;
            if let Some(sc) = &self.shortcut {
                axpby(rec, 1.0 / self.output_scale, &out.grad, 0.0, &sc.grad)?;
            }
        }
        // Residual path.
        match (&self.conv_shortcut, &self.shortcut) {
            (Some(conv), Some(sc)) => conv.backward(rec, p, gt, x, sc, true)?,
            _ => {
                let acc = gt.accumulate(&x.grad);
                axpby(
                    rec,
                    1.0 / self.output_scale,
                    &out.grad,
                    if acc { 1.0 } else { 0.0 },
                    &x.grad,
                )?;
            }
        }
        match (&self.dropout, rng) {
            (Some((prob, purpose, d)), Some((state, first))) => {
                self.conv2.backward(rec, p, gt, d, &self.c2, true)?;
                // The same mask, regenerated from the counter: ds2 = dd · keep / (1 − p).
                dropout(rec, state, *purpose, first, *prob, &d.grad, &self.s2.grad)?;
                gt.accumulate(&self.s2.grad);
            }
            (Some(_), None) => {
                return Err(invalid(
                    "resnet dropout needs the RNG state (training mode)",
                ));
            }
            (None, _) => self.conv2.backward(rec, p, gt, &self.s2, &self.c2, true)?,
        }
        self.norm2.backward_silu(rec, p, gt, &self.c1, &self.s2)?;
        if let Some((proj, tproj, temb_act)) = self.temb(temb_act)? {
            // c1 = conv1(s1) + tproj[n, c] broadcast over pixels.
            sum_pixels_per_sample(rec, &self.c1.grad, &tproj.grad, false)?;
            proj.backward(rec, p, gt, temb_act, &tproj.grad, true)?;
        }
        self.conv1.backward(rec, p, gt, &self.s1, &self.c1, true)?;
        self.norm1.backward_silu(rec, p, gt, x, &self.s1)
    }
}

/// diffusers Attention as UNet2DModel uses it (residual connection, bias, upcast softmax,
/// group norm first): y = to_out(softmax(q kᵀ / √d) v) + x, with heads = C / head_dim.
pub struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    rescale: f32,
    gn: Act,
    q: Act,
    k: Act,
    v: Act,
    core: AttentionCore,
    o: Act,
}

impl AttentionBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gpu: &Arc<Gpu>,
        decls: &mut ParamDecls,
        prefix: &str,
        x_shape: &[usize],
        head_dim: usize,
        s: BlockSettings,
        rescale: f64,
    ) -> AttentionBlock {
        let [n, h, w, c] = [x_shape[0], x_shape[1], x_shape[2], x_shape[3]];
        let t = h * w;
        let heads = c / head_dim;
        let a = |shape: &[usize], what: &str| Act::new(gpu, shape, &format!("{prefix}.{what}"));
        AttentionBlock {
            group_norm: GroupNorm::new(
                gpu,
                decls,
                &format!("{prefix}.group_norm"),
                x_shape,
                s.groups,
                s.eps,
            ),
            to_q: Linear::new(decls, &format!("{prefix}.to_q"), c, c),
            to_k: Linear::new(decls, &format!("{prefix}.to_k"), c, c),
            to_v: Linear::new(decls, &format!("{prefix}.to_v"), c, c),
            to_out: Linear::new(decls, &format!("{prefix}.to_out.0"), c, c),
            rescale: rescale as f32,
            gn: a(x_shape, "group_norm"),
            q: a(&[n * t, c], "q"),
            k: a(&[n * t, c], "k"),
            v: a(&[n * t, c], "v"),
            core: AttentionCore::new(
                gpu,
                prefix,
                AttentionShape::self_attention(n, t, heads),
                head_dim,
            ),
            o: a(&[n * t, c], "o"),
        }
    }

    fn dims(&self, x: &Act) -> (usize, usize, usize) {
        let s = x.shape();
        (s[0], s[1] * s[2], s[3])
    }

    pub fn forward(&self, rec: &mut Recorder, p: &ParamStore, x: &Act, out: &Act) -> OpResult {
        let (n, t, c) = self.dims(x);
        let rows = [n * t, c];
        self.group_norm.forward(rec, p, x, &self.gn)?;
        let gn = self.gn.value.reshape(&rows);
        self.to_q.forward(rec, p, &gn, &self.q.value)?;
        self.to_k.forward(rec, p, &gn, &self.k.value)?;
        self.to_v.forward(rec, p, &gn, &self.v.value)?;
        let (q, k, v) = (&self.q.value, &self.k.value, &self.v.value);
        self.core.forward(rec, q, k, v, &self.o.value)?;
        let out_rows = out.value.reshape(&rows);
        self.to_out.forward(rec, p, &self.o.value, &out_rows)?;
        axpby(rec, 1.0, &x.value, 1.0, &out.value)?;
        if self.rescale != 1.0 {
            crate::ops::elementwise::scale(rec, 1.0 / self.rescale, &out.value)?;
        }
        Ok(())
    }

    pub fn backward(
        &self,
        rec: &mut Recorder,
        p: &ParamStore,
        gt: &mut GradTracker,
        x: &Act,
        out: &Act,
    ) -> OpResult {
        let (n, t, c) = self.dims(x);
        if self.rescale != 1.0 {
            return Err(invalid(
                "attention backward with rescale_output_factor != 1 is not supported",
            ));
        }
        let rows = [n * t, c];
        // Residual.
        let acc = gt.accumulate(&x.grad);
        axpby(rec, 1.0, &out.grad, if acc { 1.0 } else { 0.0 }, &x.grad)?;
        let dout = out.grad.reshape(&rows);
        self.to_out.backward(rec, p, gt, &self.o, &dout, true)?;
        let grads = grads_of(&self.q, &self.k, &self.v, &self.o);
        self.core.backward(rec, &grads)?;
        let gn_rows = Act {
            value: self.gn.value.reshape(&rows),
            grad: self.gn.grad.reshape(&rows),
        };
        self.to_q
            .backward(rec, p, gt, &gn_rows, &self.q.grad, true)?;
        self.to_k
            .backward(rec, p, gt, &gn_rows, &self.k.grad, true)?;
        self.to_v
            .backward(rec, p, gt, &gn_rows, &self.v.grad, true)?;
        self.group_norm.backward(rec, p, gt, x, &self.gn)
    }
}

/// Downsample2D with a conv: stride 2; padding 0 pads right/bottom by one (google/ddpm).
pub struct Downsample {
    conv: Conv2d,
}

impl Downsample {
    pub fn new(decls: &mut ParamDecls, prefix: &str, c: usize, padding: usize) -> Downsample {
        let geo = if padding == 0 {
            Conv2dGeometry::asymmetric_down()
        } else {
            Conv2dGeometry::same(2, padding)
        };
        Downsample {
            conv: Conv2d::new(decls, &format!("{prefix}.conv"), c, c, 3, geo),
        }
    }
    pub fn output_hw(&self, h: usize, w: usize) -> (usize, usize) {
        self.conv
            .geometry
            .output_size(h, w, 3, 3)
            .expect("downsample of a non-empty image")
    }
    pub fn forward(&self, rec: &mut Recorder, p: &ParamStore, x: &Act, y: &Act) -> OpResult {
        self.conv.forward(rec, p, x, y)
    }
    pub fn backward(
        &self,
        rec: &mut Recorder,
        p: &ParamStore,
        gt: &mut GradTracker,
        x: &Act,
        y: &Act,
    ) -> OpResult {
        self.conv.backward(rec, p, gt, x, y, true)
    }
}

/// Upsample2D with a conv: nearest ×2, then 3×3 conv, padding 1.
pub struct Upsample {
    conv: Conv2d,
    up: Act,
}

impl Upsample {
    pub fn new(
        gpu: &Arc<Gpu>,
        decls: &mut ParamDecls,
        prefix: &str,
        x_shape: &[usize],
    ) -> Upsample {
        let [n, h, w, c] = [x_shape[0], x_shape[1], x_shape[2], x_shape[3]];
        Upsample {
            conv: Conv2d::new(
                decls,
                &format!("{prefix}.conv"),
                c,
                c,
                3,
                Conv2dGeometry::same(1, 1),
            ),
            up: Act::new(gpu, &[n, 2 * h, 2 * w, c], &format!("{prefix}.nearest")),
        }
    }
    pub fn forward(&self, rec: &mut Recorder, p: &ParamStore, x: &Act, y: &Act) -> OpResult {
        upsample_nearest2x_forward(rec, &x.value, &self.up.value)?;
        self.conv.forward(rec, p, &self.up, y)
    }
    pub fn backward(
        &self,
        rec: &mut Recorder,
        p: &ParamStore,
        gt: &mut GradTracker,
        x: &Act,
        y: &Act,
    ) -> OpResult {
        self.conv.backward(rec, p, gt, &self.up, y, true)?;
        if gt.accumulate(&x.grad) {
            return Err(invalid(
                "upsample input gradient is expected to be written first by the upsampler",
            ));
        }
        upsample_nearest2x_backward(rec, &self.up.grad, &x.grad)
    }
}
