//! transformers' `CLIPTextModel` (Radford et al. 2021), forward: the text encoder whose
//! `last_hidden_state` a Stable Diffusion U-Net attends to.
//!
//! h = token_embedding[ids] + position_embedding[0..T]; per encoder layer (pre-LN):
//! h += out_proj(softmax(causal(q·kᵀ/√d_head))·v) with q, k, v the projections of
//! layer_norm1(h), heads of width hidden/heads; h += fc2(act(fc1(layer_norm2(h)))), act
//! `quick_gelu` (CLIP ViT-L/14, SD 1.x) or exact `gelu` (OpenCLIP, SD 2.x); then
//! final_layer_norm. The causal mask is transformers' (float32's lowest on later keys), so a
//! token never sees the padding after it. Parameters carry transformers' names, with or without
//! the `text_model.` prefix older files have. Inference only (the text encoder is frozen in
//! Stable Diffusion's training); its backward is future work.

use std::sync::Arc;

use serde_json::Value;

use super::ParamStore;
use super::layers::{Linear, ParamDecls};
use crate::gpu::{Gpu, GpuError, Recorder, Tensor};
use crate::ops::OpResult;
use crate::ops::elementwise::{axpby, causal_mask};
use crate::ops::embedding::embedding_add_forward;
use crate::ops::gelu::{gelu_forward, quick_gelu_forward};
use crate::ops::gemm::{GemmShape, MatRef, gemm};
use crate::ops::layer_norm::layer_norm_forward;
use crate::ops::softmax::softmax_forward;

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

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
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

/// The per-pass buffers, reused by every layer (inference keeps nothing for a backward).
struct Buffers {
    normed: Tensor,
    stats: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    projected: Tensor,
    scores: Tensor,
    probs: Tensor,
    mlp: Tensor,
    activated: Tensor,
}

/// The text encoder for `batch` prompts of `max_position_embeddings` ids each.
pub struct ClipTextModel {
    pub config: ClipTextConfig,
    pub params: ParamStore,
    batch: usize,
    /// The prompts' ids (u32 [batch · T]) and each row's position (0..T per prompt).
    pub input_ids: Tensor,
    positions: Tensor,
    /// [batch · T, hidden]: the residual stream, then (after the final norm) the output.
    hidden: Tensor,
    pub last_hidden_state: Tensor,
    layers: Vec<EncoderLayer>,
    final_ln: (String, String),
    buffers: Buffers,
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
        let c = config;
        let (d, t) = (c.hidden_size, c.max_position_embeddings);
        let mut decls = ParamDecls::default();
        decls.0.push((
            "embeddings.token_embedding.weight".into(),
            vec![c.vocab_size, d],
        ));
        decls
            .0
            .push(("embeddings.position_embedding.weight".into(), vec![t, d]));
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layers.{i}");
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
        let final_ln = layer_norm(&mut decls, "final_layer_norm", d);
        let params = ParamStore::new(gpu, &decls.0)?;
        let rows = batch * t;
        let heads = c.num_attention_heads;
        let tensor = |shape: &[usize], what: &str| gpu.tensor(shape, &format!("clip text: {what}"));
        let positions: Vec<u32> = (0..rows).map(|r| (r % t) as u32).collect();
        let pos = tensor(&[rows], "positions");
        gpu.write_u32(&pos, &positions)?;
        Ok(ClipTextModel {
            config: config.clone(),
            params,
            batch,
            input_ids: tensor(&[rows], "input ids"),
            positions: pos,
            hidden: tensor(&[rows, d], "hidden"),
            last_hidden_state: tensor(&[batch, t, d], "last_hidden_state"),
            layers,
            final_ln,
            buffers: Buffers {
                normed: tensor(&[rows, d], "normed"),
                stats: tensor(&[rows, 2], "norm stats"),
                q: tensor(&[rows, d], "q"),
                k: tensor(&[rows, d], "k"),
                v: tensor(&[rows, d], "v"),
                o: tensor(&[rows, d], "attention"),
                projected: tensor(&[rows, d], "projected"),
                scores: tensor(&[batch * heads * t, t], "scores"),
                probs: tensor(&[batch * heads * t, t], "probabilities"),
                mlp: tensor(&[rows, c.intermediate_size], "fc1"),
                activated: tensor(&[rows, c.intermediate_size], "activation"),
            },
        })
    }

    /// The weights in the store's layout from `lookup` (a tensor's shape and values by name, as
    /// transformers saved them): each parameter under its name or, in older files, under
    /// `text_model.` + name. Every missing or mis-shaped tensor is named in the error.
    pub fn weights(
        &self,
        lookup: impl Fn(&str) -> Option<(Vec<usize>, Vec<f32>)>,
    ) -> Result<Vec<f32>, String> {
        let mut problems = Vec::new();
        let flat = self.params.flatten(|spec| {
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

    fn norm(
        &self,
        rec: &mut Recorder,
        (w, b): &(String, String),
        x: &Tensor,
        y: &Tensor,
    ) -> OpResult {
        let eps = self.config.layer_norm_eps as f32;
        let (w, b) = (self.params.get(w).0, self.params.get(b).0);
        layer_norm_forward(rec, x, (&w, &b), eps, y, &self.buffers.stats)
    }

    /// Causal multi-head self-attention of the normed stream into `buffers.o`.
    fn attention(&self, rec: &mut Recorder, layer: &EncoderLayer) -> OpResult {
        let (p, b) = (&self.params, &self.buffers);
        layer.q.forward(rec, p, &b.normed, &b.q)?;
        layer.k.forward(rec, p, &b.normed, &b.k)?;
        layer.v.forward(rec, p, &b.normed, &b.v)?;
        let (d, t) = (self.config.hidden_size, self.config.max_position_embeddings);
        let (heads, dh) = (self.config.num_attention_heads, self.config.head_dim());
        fn heads_of(x: &Tensor, (d, t, dh): (usize, usize, usize)) -> MatRef<'_> {
            MatRef::dense(x, d).batched(t * d, dh)
        }
        fn square(x: &Tensor, t: usize, heads: usize) -> MatRef<'_> {
            MatRef::dense(x, t).batched(heads * t * t, t * t)
        }
        let dims = (d, t, dh);
        let scale = 1.0 / (dh as f32).sqrt();
        let sh = GemmShape::new(t, t, dh)
            .batches(self.batch, heads)
            .scale(scale, 0.0);
        let (q, k) = (heads_of(&b.q, dims), heads_of(&b.k, dims).t());
        gemm(rec, sh, q, k, None, square(&b.scores, t, heads))?;
        causal_mask(rec, &b.scores)?;
        softmax_forward(rec, &b.scores, &b.probs)?;
        let sh = GemmShape::new(t, dh, t).batches(self.batch, heads);
        let (pv, v) = (square(&b.probs, t, heads), heads_of(&b.v, dims));
        gemm(rec, sh, pv, v, None, heads_of(&b.o, dims))
    }

    /// Records the encoder over `input_ids` into `last_hidden_state`.
    pub fn forward(&self, rec: &mut Recorder) -> OpResult {
        let (p, b) = (&self.params, &self.buffers);
        rec.clear(&self.hidden);
        let token_table = p.get("embeddings.token_embedding.weight").0;
        let position_table = p.get("embeddings.position_embedding.weight").0;
        embedding_add_forward(rec, &self.input_ids, &token_table, &self.hidden)?;
        embedding_add_forward(rec, &self.positions, &position_table, &self.hidden)?;
        for layer in &self.layers {
            self.norm(rec, &layer.ln1, &self.hidden, &b.normed)?;
            self.attention(rec, layer)?;
            layer.out.forward(rec, p, &b.o, &b.projected)?;
            axpby(rec, 1.0, &b.projected, 1.0, &self.hidden)?;
            self.norm(rec, &layer.ln2, &self.hidden, &b.normed)?;
            layer.fc1.forward(rec, p, &b.normed, &b.mlp)?;
            match self.config.hidden_act {
                HiddenAct::QuickGelu => quick_gelu_forward(rec, &b.mlp, &b.activated)?,
                HiddenAct::Gelu => gelu_forward(rec, &b.mlp, &b.activated)?,
            }
            layer.fc2.forward(rec, p, &b.activated, &b.projected)?;
            axpby(rec, 1.0, &b.projected, 1.0, &self.hidden)?;
        }
        let out = self
            .last_hidden_state
            .reshape(&[self.hidden.shape()[0], self.config.hidden_size]);
        self.norm(rec, &self.final_ln, &self.hidden, &out)
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
