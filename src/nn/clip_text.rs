//! transformers' `CLIPTextModel` (Radford et al. 2021), forward: the text encoder whose
//! `last_hidden_state` a Stable Diffusion U-Net attends to.
//!
//! h = token_embedding[ids] + position_embedding[0..T]; per encoder layer (pre-LN):
//! h += out_proj(softmax(causal(q·kᵀ/√d_head))·v) with q, k, v the projections of
//! layer_norm1(h), heads of width hidden/heads; h += fc2(act(fc1(layer_norm2(h)))), act
//! `quick_gelu` (CLIP ViT-L/14, SD 1.x) or exact `gelu` (OpenCLIP, SD 2.x); then
//! final_layer_norm. The causal mask is transformers' (float32's lowest on later keys), so a
//! token never sees the padding after it. Parameters carry transformers' names, with or without
//! the `text_model.` prefix older files have. The backward (a text encoder trained jointly with
//! the U-Net) keeps each layer's activations; the attention's core is `nn::attention`'s (fused
//! with the mask where the kernels apply).

use std::sync::Arc;

use serde_json::Value;

use super::ParamStore;
use super::attention::AttentionCore;
use super::layers::{Linear, ParamDecls};
use crate::gpu::{Gpu, GpuError, Recorder, Tensor};
use crate::ops::OpResult;
use crate::ops::attention::{AttentionGrads, AttentionShape};
use crate::ops::elementwise::axpby;
use crate::ops::embedding::{embedding_add_forward, embedding_backward};
use crate::ops::gelu::{gelu_backward, gelu_forward, quick_gelu_backward, quick_gelu_forward};
use crate::ops::layer_norm::{LayerNormGrads, layer_norm_backward, layer_norm_forward};

/// The activation of the encoder's MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HiddenAct {
    QuickGelu,
    Gelu,
}

/// `CLIPTextConfig`: what the text encoder's `config.json` says (its other keys — projection_dim,
/// dropout, initializer settings — do not change inference).
#[derive(Clone, Debug, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: HiddenAct,
    pub layer_norm_eps: f64,
}

/// Sizes above this are refused as absurd (SD's largest text encoder has 1280 wide layers).
const MAX_SIZE: usize = 1 << 20;

impl ClipTextConfig {
    /// Reads a `CLIPTextModel` config.json (transformers' defaults for absent keys), refusing
    /// values we do not run by name.
    pub fn from_json(text: &str) -> Result<ClipTextConfig, String> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| format!("config.json is not valid JSON: {e}"))?;
        if let Some(t) = v.get("model_type").and_then(Value::as_str)
            && t != "clip_text_model"
        {
            return Err(format!(
                "model_type `{t}` is not a CLIP text encoder (clip_text_model)"
            ));
        }
        let size = |k: &str, default: usize| -> Result<usize, String> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_u64()
                    .map(|n| n as usize)
                    .filter(|&n| (1..=MAX_SIZE).contains(&n))
                    .ok_or_else(|| format!("`{k}` must be an integer in 1..={MAX_SIZE}, is {x}")),
            }
        };
        let hidden_act = match v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("quick_gelu")
        {
            "quick_gelu" => HiddenAct::QuickGelu,
            "gelu" => HiddenAct::Gelu,
            other => {
                return Err(format!(
                    "hidden_act `{other}` is not supported (quick_gelu, gelu)"
                ));
            }
        };
        let c = ClipTextConfig {
            vocab_size: size("vocab_size", 49408)?,
            hidden_size: size("hidden_size", 512)?,
            intermediate_size: size("intermediate_size", 2048)?,
            num_hidden_layers: size("num_hidden_layers", 12)?,
            num_attention_heads: size("num_attention_heads", 8)?,
            max_position_embeddings: size("max_position_embeddings", 77)?,
            hidden_act,
            layer_norm_eps: v
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-5),
        };
        if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            ));
        }
        if !(c.layer_norm_eps.is_finite() && c.layer_norm_eps > 0.0) {
            return Err(format!(
                "layer_norm_eps must be > 0, is {}",
                c.layer_norm_eps
            ));
        }
        Ok(c)
    }
}

impl ClipTextConfig {
    /// The `config.json` transformers writes for a `CLIPTextModel` of this shape, with the
    /// tokenizer's special ids (what `CLIPTextModel.from_pretrained` reads back).
    pub fn to_json(&self, (bos, eos, pad): (u32, u32, u32)) -> String {
        let act = match self.hidden_act {
            HiddenAct::QuickGelu => "quick_gelu",
            HiddenAct::Gelu => "gelu",
        };
        let v = serde_json::json!({
            "architectures": ["CLIPTextModel"],
            "attention_dropout": 0.0,
            "bos_token_id": bos,
            "dtype": "float32",
            "eos_token_id": eos,
            "hidden_act": act,
            "hidden_size": self.hidden_size,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_norm_eps": self.layer_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "model_type": "clip_text_model",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "pad_token_id": pad,
            "projection_dim": self.hidden_size,
            "vocab_size": self.vocab_size,
        });
        serde_json::to_string_pretty(&v).expect("a JSON value serializes")
    }
}

/// A text encoder's weights in the layout of `store` (its own names, no prefix) from `lookup`:
/// each parameter under its name or, as transformers saves a CLIPTextModel, under
/// `text_model.` + name. Every missing or mis-shaped tensor is named in the error.
pub fn weights_in(
    store: &ParamStore,
    lookup: impl Fn(&str) -> Option<(Vec<usize>, Vec<f32>)>,
) -> Result<Vec<f32>, String> {
    let mut problems = Vec::new();
    let flat = store.flatten(|spec| {
        let found = [spec.name.clone(), format!("text_model.{}", spec.name)]
            .into_iter()
            .find_map(|name| lookup(&name).map(|t| (name, t)));
        Ok(match found {
            Some((_, (shape, v))) if shape == spec.shape => v,
            Some((name, (shape, _))) => {
                problems.push(format!(
                    "`{name}` has shape {shape:?}, the config expects {:?}",
                    spec.shape
                ));
                vec![0.0; spec.numel()]
            }
            None => {
                problems.push(format!("`{}` is missing", spec.name));
                vec![0.0; spec.numel()]
            }
        })
    })?;
    if !problems.is_empty() {
        return Err(format!(
            "the weights do not fit the text encoder:\n  {}",
            problems.join("\n  ")
        ));
    }
    Ok(flat)
}

/// One encoder layer's parameter names.
struct EncoderLayer {
    ln1: (String, String),
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: (String, String),
    fc1: Linear,
    fc2: Linear,
}

/// One encoder layer's activations (kept for the backward).
struct LayerActs {
    /// LayerNorm 1's output and (mean, rstd) per row.
    normed1: Tensor,
    stats1: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// softmax(q kᵀ/√dh) v under the causal mask (its statistics or probabilities kept).
    core: AttentionCore,
    o: Tensor,
    /// The residual stream after the attention.
    mid: Tensor,
    normed2: Tensor,
    stats2: Tensor,
    /// fc1's output (before the activation) and the activation's.
    mlp: Tensor,
    activated: Tensor,
}

/// The backward's gradients, shared by every layer.
struct Scratch {
    /// Of the residual stream (entering the layer being differentiated, then leaving it).
    dh: Tensor,
    /// Of the stream after the attention.
    dmid: Tensor,
    /// Of a [rows, hidden] intermediate (a LayerNorm's output, the attention's output).
    d_rows: Tensor,
    d_mlp: Tensor,
    d_act: Tensor,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
    final_stats: Tensor,
}

/// The text encoder for `batch` prompts of `max_position_embeddings` ids each.
pub struct ClipTextModel {
    pub config: ClipTextConfig,
    pub params: ParamStore,
    /// What every parameter name starts with (empty unless in a joint store).
    pub prefix: String,
    /// The token and position embedding tables' names.
    tables: (String, String),
    batch: usize,
    /// The prompts' ids (u32 [batch · T]) and each row's position (0..T per prompt).
    pub input_ids: Tensor,
    positions: Tensor,
    /// [batch · T, hidden] each: the residual stream entering each layer, and leaving the last.
    hidden: Vec<Tensor>,
    pub last_hidden_state: Tensor,
    layers: Vec<EncoderLayer>,
    acts: Vec<LayerActs>,
    final_ln: (String, String),
    scratch: Scratch,
}

fn layer_norm(decls: &mut ParamDecls, name: &str, width: usize) -> (String, String) {
    decls.0.push((format!("{name}.weight"), vec![width]));
    decls.0.push((format!("{name}.bias"), vec![width]));
    (format!("{name}.weight"), format!("{name}.bias"))
}

impl ClipTextModel {
    pub fn new(
        gpu: &Arc<Gpu>,
        config: &ClipTextConfig,
        batch: usize,
    ) -> Result<ClipTextModel, GpuError> {
        Self::with_prefix(gpu, config, batch, "")
    }

    /// [`new`](Self::new) with every parameter name behind `prefix` (`text_encoder.` when the
    /// encoder shares a joint parameter store with the U-Net it conditions).
    pub fn with_prefix(
        gpu: &Arc<Gpu>,
        config: &ClipTextConfig,
        batch: usize,
        prefix: &str,
    ) -> Result<ClipTextModel, GpuError> {
        let c = config;
        let (d, t) = (c.hidden_size, c.max_position_embeddings);
        let mut decls = ParamDecls::default();
        let token_table = format!("{prefix}embeddings.token_embedding.weight");
        let position_table = format!("{prefix}embeddings.position_embedding.weight");
        decls.0.push((token_table.clone(), vec![c.vocab_size, d]));
        decls.0.push((position_table.clone(), vec![t, d]));
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("{prefix}encoder.layers.{i}");
                let mut lin =
                    |n: &str, fin, fout| Linear::new(&mut decls, &format!("{p}.{n}"), fin, fout);
                let (q, k, v, out) = (
                    lin("self_attn.q_proj", d, d),
                    lin("self_attn.k_proj", d, d),
                    lin("self_attn.v_proj", d, d),
                    lin("self_attn.out_proj", d, d),
                );
                let (fc1, fc2) = (
                    lin("mlp.fc1", d, c.intermediate_size),
                    lin("mlp.fc2", c.intermediate_size, d),
                );
                EncoderLayer {
                    ln1: layer_norm(&mut decls, &format!("{p}.layer_norm1"), d),
                    q,
                    k,
                    v,
                    out,
                    ln2: layer_norm(&mut decls, &format!("{p}.layer_norm2"), d),
                    fc1,
                    fc2,
                }
            })
            .collect();
        let final_ln = layer_norm(&mut decls, &format!("{prefix}final_layer_norm"), d);
        let params = ParamStore::new(gpu, &decls.0)?;
        let rows = batch * t;
        let heads = c.num_attention_heads;
        let tensor = |shape: &[usize], what: &str| gpu.tensor(shape, &format!("clip text: {what}"));
        let grad =
            |shape: &[usize], what: &str| gpu.grad_tensor(shape, &format!("clip text: {what}"));
        let positions: Vec<u32> = (0..rows).map(|r| (r % t) as u32).collect();
        let pos = tensor(&[rows], "positions");
        gpu.write_u32(&pos, &positions)?;
        let shape = AttentionShape {
            causal: true,
            ..AttentionShape::self_attention(batch, t, heads)
        };
        let inner = [rows, c.intermediate_size];
        let acts = (0..c.num_hidden_layers)
            .map(|i| {
                let a = |shape: &[usize], what: &str| tensor(shape, &format!("layer {i} {what}"));
                LayerActs {
                    normed1: a(&[rows, d], "normed 1"),
                    stats1: a(&[rows, 2], "norm 1 stats"),
                    q: a(&[rows, d], "q"),
                    k: a(&[rows, d], "k"),
                    v: a(&[rows, d], "v"),
                    core: AttentionCore::new(
                        gpu,
                        &format!("clip text: layer {i} attention"),
                        shape,
                        d / heads,
                    ),
                    o: a(&[rows, d], "attention"),
                    mid: a(&[rows, d], "mid"),
                    normed2: a(&[rows, d], "normed 2"),
                    stats2: a(&[rows, 2], "norm 2 stats"),
                    mlp: a(&inner, "fc1"),
                    activated: a(&inner, "activation"),
                }
            })
            .collect();
        Ok(ClipTextModel {
            config: config.clone(),
            params,
            prefix: prefix.to_string(),
            tables: (token_table, position_table),
            batch,
            input_ids: tensor(&[rows], "input ids"),
            positions: pos,
            hidden: (0..=c.num_hidden_layers)
                .map(|i| tensor(&[rows, d], &format!("hidden {i}")))
                .collect(),
            last_hidden_state: tensor(&[batch, t, d], "last_hidden_state"),
            layers,
            acts,
            final_ln,
            scratch: Scratch {
                dh: grad(&[rows, d], "d hidden"),
                dmid: grad(&[rows, d], "d mid"),
                d_rows: grad(&[rows, d], "d rows"),
                d_mlp: grad(&inner, "d fc1"),
                d_act: grad(&inner, "d activation"),
                dq: grad(&[rows, d], "dq"),
                dk: grad(&[rows, d], "dk"),
                dv: grad(&[rows, d], "dv"),
                final_stats: tensor(&[rows, 2], "final norm stats"),
            },
        })
    }

    /// The weights in the store's layout from `lookup` (a tensor's shape and values by name, as
    /// transformers saved them): see [`weights_in`].
    pub fn weights(
        &self,
        lookup: impl Fn(&str) -> Option<(Vec<usize>, Vec<f32>)>,
    ) -> Result<Vec<f32>, String> {
        weights_in(&self.params.part(0..self.params.len, &self.prefix), lookup)
    }

    fn norm(
        &self,
        rec: &mut Recorder,
        (w, b): &(String, String),
        x: &Tensor,
        (y, stats): (&Tensor, &Tensor),
    ) -> OpResult {
        let eps = self.config.layer_norm_eps as f32;
        let (w, b) = (self.params.get(w).0, self.params.get(b).0);
        layer_norm_forward(rec, x, (&w, &b), eps, y, stats)
    }

    /// Backward of a LayerNorm: its input's gradient added into `dx`, γ and β accumulated.
    fn norm_backward(
        &self,
        rec: &mut Recorder,
        (w, b): &(String, String),
        (x, stats): (&Tensor, &Tensor),
        dy: &Tensor,
        dx: &Tensor,
    ) -> OpResult {
        let ((gamma, dgamma), (_, dbeta)) = (self.params.get(w), self.params.get(b));
        let grads = LayerNormGrads {
            dx,
            add_dx: true,
            dgamma: &dgamma,
            dbeta: &dbeta,
        };
        layer_norm_backward(rec, x, &gamma, stats, dy, &grads)
    }

    /// Causal multi-head self-attention of `a.normed1` into `a.o`.
    fn attention(&self, rec: &mut Recorder, layer: &EncoderLayer, a: &LayerActs) -> OpResult {
        let p = &self.params;
        layer.q.forward(rec, p, &a.normed1, &a.q)?;
        layer.k.forward(rec, p, &a.normed1, &a.k)?;
        layer.v.forward(rec, p, &a.normed1, &a.v)?;
        a.core.forward(rec, &a.q, &a.k, &a.v, &a.o)
    }

    /// Records the encoder over `input_ids` into `last_hidden_state`, keeping each layer's
    /// activations for [`backward`](Self::backward).
    pub fn forward(&self, rec: &mut Recorder) -> OpResult {
        let p = &self.params;
        let h0 = &self.hidden[0];
        rec.clear(h0);
        let token_table = p.get(&self.tables.0).0;
        let position_table = p.get(&self.tables.1).0;
        embedding_add_forward(rec, &self.input_ids, &token_table, h0)?;
        embedding_add_forward(rec, &self.positions, &position_table, h0)?;
        for (i, (layer, a)) in self.layers.iter().zip(&self.acts).enumerate() {
            let (h, next) = (&self.hidden[i], &self.hidden[i + 1]);
            self.norm(rec, &layer.ln1, h, (&a.normed1, &a.stats1))?;
            self.attention(rec, layer, a)?;
            layer.out.forward(rec, p, &a.o, &a.mid)?;
            axpby(rec, 1.0, h, 1.0, &a.mid)?;
            self.norm(rec, &layer.ln2, &a.mid, (&a.normed2, &a.stats2))?;
            layer.fc1.forward(rec, p, &a.normed2, &a.mlp)?;
            match self.config.hidden_act {
                HiddenAct::QuickGelu => quick_gelu_forward(rec, &a.mlp, &a.activated)?,
                HiddenAct::Gelu => gelu_forward(rec, &a.mlp, &a.activated)?,
            }
            layer.fc2.forward(rec, p, &a.activated, next)?;
            axpby(rec, 1.0, &a.mid, 1.0, next)?;
        }
        let last = self.hidden.last().expect("at least the embeddings");
        let out = self.last_hidden_state.reshape(last.shape());
        let stats = &self.scratch.final_stats;
        self.norm(rec, &self.final_ln, last, (&out, stats))
    }

    /// Records the backward of [`forward`](Self::forward) from `d_last` (the gradient of
    /// `last_hidden_state`): every parameter's gradient accumulated (`+=`) into the store's
    /// gradient buffer, as the U-Net's are.
    pub fn backward(&self, rec: &mut Recorder, d_last: &Tensor) -> OpResult {
        let (p, s) = (&self.params, &self.scratch);
        let last = self.hidden.last().expect("at least the embeddings");
        let d_last = d_last.reshape(last.shape());
        rec.clear(&s.dh);
        let final_in = (last, &s.final_stats);
        self.norm_backward(rec, &self.final_ln, final_in, &d_last, &s.dh)?;
        for (i, (layer, a)) in self.layers.iter().zip(&self.acts).enumerate().rev() {
            // next = mid + fc2(act(fc1(LN2(mid)))).
            self.mlp_backward(rec, layer, a)?;
            rec.copy(&s.dh, &s.dmid)?;
            let ln2_in = (&a.mid, &a.stats2);
            self.norm_backward(rec, &layer.ln2, ln2_in, &s.d_rows, &s.dmid)?;
            // mid = h + out_proj(attention(LN1(h))).
            let d_o = Some((&s.d_rows, false));
            layer.out.backward_rows(rec, p, &a.o, &s.dmid, d_o)?;
            self.attention_backward(rec, a)?;
            for (j, (lin, dy)) in [(&layer.q, &s.dq), (&layer.k, &s.dk), (&layer.v, &s.dv)]
                .into_iter()
                .enumerate()
            {
                let dx = Some((&s.d_rows, j > 0));
                lin.backward_rows(rec, p, &a.normed1, dy, dx)?;
            }
            rec.copy(&s.dmid, &s.dh)?;
            let ln1_in = (&self.hidden[i], &a.stats1);
            self.norm_backward(rec, &layer.ln1, ln1_in, &s.d_rows, &s.dh)?;
        }
        let d_tokens = p.get(&self.tables.0).1;
        let d_positions = p.get(&self.tables.1).1;
        embedding_backward(rec, &self.input_ids, &s.dh, &d_tokens)?;
        embedding_backward(rec, &self.positions, &s.dh, &d_positions)
    }

    /// The MLP's backward from the stream's gradient `scratch.dh`: fc2, the activation, fc1
    /// (parameters accumulated), leaving the gradient of LayerNorm 2's output in `d_rows`.
    fn mlp_backward(&self, rec: &mut Recorder, layer: &EncoderLayer, a: &LayerActs) -> OpResult {
        let (p, s) = (&self.params, &self.scratch);
        let d_act = Some((&s.d_act, false));
        layer
            .fc2
            .backward_rows(rec, p, &a.activated, &s.dh, d_act)?;
        match self.config.hidden_act {
            HiddenAct::QuickGelu => quick_gelu_backward(rec, &a.mlp, &s.d_act, &s.d_mlp)?,
            HiddenAct::Gelu => gelu_backward(rec, &a.mlp, &s.d_act, &s.d_mlp)?,
        }
        let d_rows = Some((&s.d_rows, false));
        layer
            .fc1
            .backward_rows(rec, p, &a.normed2, &s.d_mlp, d_rows)
    }

    /// dq, dk, dv from the attention output's gradient (in `scratch.d_rows`).
    fn attention_backward(&self, rec: &mut Recorder, a: &LayerActs) -> OpResult {
        let s = &self.scratch;
        let grads = AttentionGrads {
            q: &a.q,
            k: &a.k,
            v: &a.v,
            o: &a.o,
            d_o: &s.d_rows,
            dq: &s.dq,
            dk: &s.dk,
            dv: &s.dv,
        };
        a.core.backward(rec, &grads)
    }

    /// Uploads the prompts' ids ([batch, T], row-major), each below the vocabulary size.
    pub fn set_input_ids(&self, gpu: &Gpu, ids: &[u32]) -> anyhow::Result<()> {
        let t = self.config.max_position_embeddings;
        if ids.len() != self.batch * t {
            anyhow::bail!(
                "{} ids given for {} prompts of {t} tokens",
                ids.len(),
                self.batch
            );
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.config.vocab_size) {
            anyhow::bail!(
                "token id {bad} is outside the text encoder's vocabulary ({} ids): the tokenizer does not fit it",
                self.config.vocab_size
            );
        }
        gpu.write_u32(&self.input_ids, ids)?;
        Ok(())
    }
}
