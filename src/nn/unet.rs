//! diffusers' `UNet2DModel`, built for a fixed batch size: conv_in, down blocks (DownBlock2D /
//! AttnDownBlock2D), UNetMidBlock2D, up blocks (UpBlock2D / AttnUpBlock2D) with skip
//! concatenation, GroupNorm + SiLU + conv_out, and the sinusoidal time embedding → linear → SiLU
//! → linear. Parameters carry diffusers' state-dict names; activations are NHWC.

use std::sync::Arc;

use super::config::{CROSS_DOWN, CROSS_UP};
use super::graph::{
    Node, attention_node, backward_nodes, forward_nodes, last_output, node_activations,
    transformer_node,
};
use super::layers::{
    AttentionBlock, BlockSettings, Conv2d, Downsample, GroupNorm, Linear, ParamDecls, ResnetBlock,
    Upsample,
};
use super::transformer::TransformerSettings;
use super::{Act, GradTracker, ParamStore, UNetConfig};
use crate::gpu::{Gpu, GpuError, Recorder, Tensor};
use crate::ops::OpResult;
use crate::ops::conv2d::Conv2dGeometry;
use crate::ops::elementwise::{divide_per_sample, silu_backward, silu_forward};
use crate::ops::embedding::{embedding_add_forward, embedding_backward};
use crate::ops::timestep_embedding::{fourier_embedding, timestep_embedding};

/// The frozen random weights of a fourier U-Net's GaussianFourierProjection.
pub const FOURIER_WEIGHT: &str = "time_proj.weight";

pub struct UNet {
    pub config: UNetConfig,
    pub batch: usize,
    pub params: ParamStore,
    /// The noisy input x_t, NHWC [B, S, S, in_channels].
    pub sample: Act,
    /// Timesteps as f32 [B] (fractional values allowed, for samplers that need them).
    pub timesteps: Tensor,
    /// A UNet2DConditionModel's `encoder_hidden_states` [B · context_tokens,
    /// cross_attention_dim] (the text encoder's last_hidden_state), with its gradient.
    pub encoder_hidden_states: Option<Act>,
    /// Class labels as u32 [B], for a model with `num_class_embeds`.
    pub class_labels: Option<Tensor>,
    /// The name of the class embedding table (`class_embedding.weight`, [K, time_embed_dim]).
    class_embedding: Option<String>,
    t_proj: Act,
    linear_1: Linear,
    t1: Act,
    t1_act: Act,
    linear_2: Linear,
    emb: Act,
    emb_act: Act,
    conv_in: Conv2d,
    h_in: Act,
    nodes: Vec<Node>,
    /// conv_norm_out and conv_act run fused: only silu(norm(x)) is stored.
    conv_norm_out: GroupNorm,
    act_out: Act,
    conv_out: Conv2d,
    /// The model output (ε, v or x0 prediction; a fourier model's score, conv_out / σ), NHWC
    /// [B, S, S, out_channels].
    pub output: Act,
    /// A fourier model's conv_out before the division by σ.
    raw_output: Option<Act>,
    /// RNG state [seed lo, seed hi, step, 0] for dropout (the trainer's state tensor).
    pub rng_state: Tensor,
    /// Training mode: dropout active (when the config has it).
    pub training: bool,
    /// Stream offset of the micro-batch being recorded (dropout masks differ per micro-batch).
    micro_batch: std::cell::Cell<u32>,
}

/// Each micro-batch's dropout masks start this many stream elements further (so one dropout
/// layer's activation may hold up to 2^24 elements, and 256 micro-batches fit in 2^32).
const DROPOUT_MICRO_STRIDE: u32 = 1 << 24;

/// The context length a cross-attention U-Net is built for unless told otherwise: CLIP's 77.
pub const DEFAULT_CONTEXT_TOKENS: usize = 77;

impl UNet {
    /// A U-Net in training mode (dropout active when the config sets it).
    pub fn new(gpu: &Arc<Gpu>, config: &UNetConfig, batch: usize) -> Result<UNet, GpuError> {
        Self::build(gpu, config, batch, true, DEFAULT_CONTEXT_TOKENS, None)
    }

    /// A U-Net for sampling (`model.eval()`: no dropout).
    pub fn for_inference(
        gpu: &Arc<Gpu>,
        config: &UNetConfig,
        batch: usize,
    ) -> Result<UNet, GpuError> {
        Self::build(gpu, config, batch, false, DEFAULT_CONTEXT_TOKENS, None)
    }

    /// A UNet2DConditionModel attending to `context_tokens` rows of context per sample.
    pub fn conditional(
        gpu: &Arc<Gpu>,
        config: &UNetConfig,
        batch: usize,
        context_tokens: usize,
        training: bool,
    ) -> Result<UNet, GpuError> {
        Self::build(gpu, config, batch, training, context_tokens, None)
    }

    /// A U-Net in eval mode for inputs of `(height, width)` rather than the config's square
    /// `sample_size` (diffusers' pipelines take any size the down/up path keeps: each side a
    /// multiple of 2^(levels − 1)); `context_tokens` for a UNet2DConditionModel.
    pub fn for_inference_at(
        gpu: &Arc<Gpu>,
        config: &UNetConfig,
        batch: usize,
        context_tokens: Option<usize>,
        size: (usize, usize),
    ) -> Result<UNet, GpuError> {
        let tokens = context_tokens.unwrap_or(DEFAULT_CONTEXT_TOKENS);
        Self::build(gpu, config, batch, false, tokens, Some(size))
    }

    /// Selects the micro-batch whose dispatches are recorded next (gradient accumulation).
    pub fn set_micro_batch(&self, i: u32) {
        self.micro_batch.set(i);
    }

    fn rng(&self) -> Option<(&Tensor, u32)> {
        (self.training && self.config.dropout > 0.0).then(|| {
            (
                &self.rng_state,
                self.micro_batch.get() * DROPOUT_MICRO_STRIDE,
            )
        })
    }

    fn build(
        gpu: &Arc<Gpu>,
        config: &UNetConfig,
        batch: usize,
        training: bool,
        context_tokens: usize,
        size: Option<(usize, usize)>,
    ) -> Result<UNet, GpuError> {
        config.validate().map_err(GpuError::Invalid)?;
        let (sh, sw) = size.unwrap_or((config.sample_size, config.sample_size));
        config
            .check_input_size((sh, sw))
            .map_err(GpuError::Invalid)?;
        let mut dropout_layers = 0u32;
        let mut next_dropout = |shape: &[usize]| -> Result<Option<(f32, u32)>, GpuError> {
            if !training || config.dropout == 0.0 {
                return Ok(None);
            }
            if shape.iter().product::<usize>() > DROPOUT_MICRO_STRIDE as usize {
                return Err(GpuError::Invalid(format!(
                    "dropout on an activation of {:?} (over 2^24 elements) is not supported; use a smaller batch",
                    shape
                )));
            }
            dropout_layers += 1;
            Ok(Some((
                config.dropout as f32,
                crate::ops::noise::purpose::DROPOUT_BASE + dropout_layers,
            )))
        };
        if batch == 0 {
            return Err(GpuError::Invalid("batch size must be at least 1".into()));
        }
        let c = config;
        let nb = c.block_out_channels.len();
        let c0 = c.block_out_channels[0];
        let settings = BlockSettings {
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            temb_dim: c.time_embed_dim(),
        };
        let mut d = ParamDecls::default();
        let act = |shape: &[usize], label: &str| Act::new(gpu, shape, label);
        // UNet2DConditionModel: level i's transformers have heads[i] heads over its channels.
        let cross = c.cross_attention.as_ref();
        let transformer = |level: usize, channels: usize| {
            let x = cross.expect("cross-attention blocks only in a conditional config");
            TransformerSettings {
                heads: x.heads[level],
                head_dim: channels / x.heads[level],
                context_dim: x.cross_attention_dim,
                layers: x.transformer_layers[level],
                groups: c.norm_num_groups,
                linear_projection: x.use_linear_projection,
            }
        };
        if cross.is_some() && context_tokens == 0 {
            return Err(GpuError::Invalid("a context of 0 tokens".into()));
        }
        // torch.autocast keeps the model's inputs (the sample; the text encoder's last hidden
        // state, the output of a LayerNorm), the timestep embedding and its MLP in f32.
        let act_f32 = |shape: &[usize], label: &str| Act::new_f32(gpu, shape, label);
        let encoder_hidden_states = cross.map(|x| {
            act_f32(
                &[batch * context_tokens, x.cross_attention_dim],
                "encoder_hidden_states",
            )
        });

        let sample = act_f32(&[batch, sh, sw, c.in_channels], "sample");
        let timesteps = gpu.tensor(&[batch], "timesteps");
        let t_proj = act_f32(&[batch, c.time_proj_dim()], "time_proj");
        let linear_1 = Linear::new(
            &mut d,
            "time_embedding.linear_1",
            c.time_proj_dim(),
            c.time_embed_dim(),
        );
        let t1 = act_f32(&[batch, c.time_embed_dim()], "time_embedding.linear_1");
        let t1_act = act_f32(&[batch, c.time_embed_dim()], "time_embedding.act");
        let linear_2 = Linear::new(
            &mut d,
            "time_embedding.linear_2",
            c.time_embed_dim(),
            c.time_embed_dim(),
        );
        let emb = act_f32(&[batch, c.time_embed_dim()], "time_embedding");
        // diffusers: emb = time_embedding(t_emb) + class_embedding(class_labels).
        let class_embedding = c.num_class_embeds.map(|k| {
            d.0.push((
                "class_embedding.weight".to_string(),
                vec![k, c.time_embed_dim()],
            ));
            "class_embedding.weight".to_string()
        });
        let class_labels = c
            .num_class_embeds
            .map(|_| gpu.tensor(&[batch], "class labels u32"));
        let emb_act = act_f32(&[batch, c.time_embed_dim()], "silu(time_embedding)");
        let conv_in = Conv2d::new(
            &mut d,
            "conv_in",
            c.in_channels,
            c0,
            3,
            Conv2dGeometry::same(1, 1),
        );
        let h_in = act(&[batch, sh, sw, c0], "conv_in");

        let mut nodes = Vec::new();
        let mut cur = h_in.clone();
        let mut skips = vec![h_in.clone()];
        let hw = |a: &Act| (a.shape()[1], a.shape()[2]);

        for (i, kind) in c.down_block_types.iter().enumerate() {
            let out_c = c.block_out_channels[i];
            let head_dim = c.attention_head_dim.unwrap_or(out_c);
            for j in 0..c.layers_per_block {
                let (h, w) = hw(&cur);
                let prefix = format!("down_blocks.{i}.resnets.{j}");
                let out = act(&[batch, h, w, out_c], &prefix);
                let block = ResnetBlock::new(
                    gpu,
                    &mut d,
                    &prefix,
                    cur.shape(),
                    out_c,
                    settings,
                    1.0,
                    &out,
                    next_dropout(&[batch, cur.shape()[1], cur.shape()[2], out_c])?,
                );
                nodes.push(Node::Resnet {
                    block: Box::new(block),
                    x: cur.clone(),
                    out: out.clone(),
                });
                cur = out;
                let prefix = format!("down_blocks.{i}.attentions.{j}");
                if kind == "AttnDownBlock2D" {
                    cur = attention_node(
                        gpu, &mut d, &prefix, &cur, head_dim, settings, 1.0, &mut nodes,
                    );
                } else if kind == CROSS_DOWN {
                    let s = transformer(i, out_c);
                    cur = transformer_node(
                        gpu,
                        &mut d,
                        &prefix,
                        &cur,
                        context_tokens,
                        &s,
                        &mut nodes,
                    );
                }
                skips.push(cur.clone());
            }
            if i + 1 < nb {
                let prefix = format!("down_blocks.{i}.downsamplers.0");
                let block = Downsample::new(&mut d, &prefix, out_c, c.downsample_padding);
                let (h, w) = hw(&cur);
                let (oh, ow) = block.output_hw(h, w);
                let out = act(&[batch, oh, ow, out_c], &prefix);
                nodes.push(Node::Down {
                    block,
                    x: cur.clone(),
                    out: out.clone(),
                });
                cur = out;
                skips.push(cur.clone());
            }
        }

        // UNetMidBlock2D (or UNetMidBlock2DCrossAttn): resnet, attention, resnet; none at all in
        // a UNet2DConditionModel whose mid_block_type is null.
        let mid_c = c.block_out_channels[nb - 1];
        let scale = c.mid_block_scale_factor;
        let mid_blocks = if cross.is_some_and(|x| !x.mid_block) {
            &[][..]
        } else {
            &[
                "mid_block.resnets.0",
                "mid_block.attentions.0",
                "mid_block.resnets.1",
            ][..]
        };
        for (j, prefix) in mid_blocks.iter().enumerate() {
            if j == 1 && cross.is_some() {
                let s = transformer(nb - 1, mid_c);
                cur = transformer_node(gpu, &mut d, prefix, &cur, context_tokens, &s, &mut nodes);
                continue;
            }
            let out = act(cur.shape(), prefix);
            if j == 1 {
                let block = AttentionBlock::new(
                    gpu,
                    &mut d,
                    prefix,
                    cur.shape(),
                    c.attention_head_dim.unwrap_or(mid_c),
                    settings,
                    scale,
                );
                nodes.push(Node::Attention {
                    block: Box::new(block),
                    x: cur.clone(),
                    out: out.clone(),
                });
            } else {
                let block = ResnetBlock::new(
                    gpu,
                    &mut d,
                    prefix,
                    cur.shape(),
                    mid_c,
                    settings,
                    scale,
                    &out,
                    next_dropout(&[batch, cur.shape()[1], cur.shape()[2], mid_c])?,
                );
                nodes.push(Node::Resnet {
                    block: Box::new(block),
                    x: cur.clone(),
                    out: out.clone(),
                });
            }
            cur = out;
        }

        let reversed: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        for (i, kind) in c.up_block_types.iter().enumerate() {
            let out_c = reversed[i];
            let head_dim = c.attention_head_dim.unwrap_or(out_c);
            for j in 0..c.layers_per_block + 1 {
                let skip = skips.pop().expect("one skip per up-block resnet");
                let (h, w) = hw(&cur);
                if hw(&skip) != (h, w) {
                    return Err(GpuError::Invalid(format!(
                        "size {sh}×{sw}: skip connection {:?} does not match the upsampled {:?} at up block {i}",
                        skip.shape(),
                        cur.shape()
                    )));
                }
                let cat_c = cur.shape()[3] + skip.shape()[3];
                let cat = act(&[batch, h, w, cat_c], &format!("up_blocks.{i}.cat.{j}"));
                nodes.push(Node::Concat {
                    a: cur.clone(),
                    b: skip,
                    out: cat.clone(),
                });
                let prefix = format!("up_blocks.{i}.resnets.{j}");
                let out = act(&[batch, h, w, out_c], &prefix);
                let block = ResnetBlock::new(
                    gpu,
                    &mut d,
                    &prefix,
                    cat.shape(),
                    out_c,
                    settings,
                    1.0,
                    &out,
                    next_dropout(&[batch, cur.shape()[1], cur.shape()[2], out_c])?,
                );
                nodes.push(Node::Resnet {
                    block: Box::new(block),
                    x: cat,
                    out: out.clone(),
                });
                cur = out;
                let prefix = format!("up_blocks.{i}.attentions.{j}");
                if kind == "AttnUpBlock2D" {
                    cur = attention_node(
                        gpu, &mut d, &prefix, &cur, head_dim, settings, 1.0, &mut nodes,
                    );
                } else if kind == CROSS_UP {
                    let s = transformer(nb - 1 - i, out_c);
                    cur = transformer_node(
                        gpu,
                        &mut d,
                        &prefix,
                        &cur,
                        context_tokens,
                        &s,
                        &mut nodes,
                    );
                }
            }
            if i + 1 < nb {
                let prefix = format!("up_blocks.{i}.upsamplers.0");
                let block = Upsample::new(gpu, &mut d, &prefix, cur.shape());
                let (h, w) = hw(&cur);
                let out = act(&[batch, 2 * h, 2 * w, out_c], &prefix);
                nodes.push(Node::Up {
                    block,
                    x: cur.clone(),
                    out: out.clone(),
                });
                cur = out;
            }
        }
        if hw(&cur) != (sh, sw) {
            return Err(GpuError::Invalid(format!(
                "size {sh}×{sw} does not survive the down/up path (ends at {:?})",
                cur.shape()
            )));
        }

        let conv_norm_out = GroupNorm::new(
            gpu,
            &mut d,
            "conv_norm_out",
            cur.shape(),
            c.norm_num_groups,
            c.norm_eps,
        );
        let act_out = act(cur.shape(), "conv_act");
        let conv_out = Conv2d::new(
            &mut d,
            "conv_out",
            c0,
            c.out_channels,
            3,
            Conv2dGeometry::same(1, 1),
        );
        // The model output stays f32 (the loss and the samplers compute in f32 from it).
        let output = act_f32(&[batch, sh, sw, c.out_channels], "conv_out");
        let (raw_output, frozen) = if c.is_fourier() {
            let raw = act_f32(&[batch, sh, sw, c.out_channels], "conv_out before / σ");
            (Some(raw), vec![(FOURIER_WEIGHT.to_string(), vec![c0])])
        } else {
            (None, Vec::new())
        };
        let params = ParamStore::with_frozen(gpu, &d.0, &frozen)?;
        let rng_state = gpu.tensor(&[4], "rng state");
        Ok(UNet {
            config: c.clone(),
            batch,
            params,
            sample,
            timesteps,
            encoder_hidden_states,
            class_labels,
            class_embedding,
            t_proj,
            linear_1,
            t1,
            t1_act,
            linear_2,
            emb,
            emb_act,
            conv_in,
            h_in,
            nodes,
            conv_norm_out,
            act_out,
            conv_out,
            output,
            raw_output,
            rng_state,
            training,
            micro_batch: std::cell::Cell::new(0),
        })
    }

    fn last_hidden(&self) -> &Act {
        last_output(&self.nodes).expect("a U-Net has blocks")
    }

    /// Records the forward pass: `sample` and `timesteps` → `output`.
    pub fn forward(&self, rec: &mut Recorder) -> OpResult {
        let p = &self.params;
        let c = &self.config;
        if c.is_fourier() {
            // GaussianFourierProjection(block_out_channels[0], scale 16): flip_sin_to_cos False.
            let (w, _) = p.get(FOURIER_WEIGHT);
            fourier_embedding(rec, &self.timesteps, &w, &self.t_proj.value, false)?;
        } else {
            timestep_embedding(
                rec,
                &self.timesteps,
                &self.t_proj.value,
                c.flip_sin_to_cos,
                c.freq_shift as f32,
            )?;
        }
        // The time-embedding MLP keeps f32 operands in a half-precision run (issue 21).
        rec.full_precision(|rec| {
            self.linear_1
                .forward(rec, p, &self.t_proj.value, &self.t1.value)?;
            silu_forward(rec, &self.t1.value, &self.t1_act.value)?;
            self.linear_2
                .forward(rec, p, &self.t1_act.value, &self.emb.value)
        })?;
        if let (Some(table), Some(labels)) = (&self.class_embedding, &self.class_labels) {
            let (w, _) = p.get(table);
            embedding_add_forward(rec, labels, &w, &self.emb.value)?;
        }
        silu_forward(rec, &self.emb.value, &self.emb_act.value)?;
        self.conv_in.forward(rec, p, &self.sample, &self.h_in)?;
        let context = self.encoder_hidden_states.as_ref();
        forward_nodes(
            rec,
            p,
            &self.nodes,
            Some(&self.emb_act),
            self.rng(),
            context,
        )?;
        let last = self.last_hidden();
        self.conv_norm_out
            .forward_silu(rec, p, last, &self.act_out)?;
        match &self.raw_output {
            // UNet2DModel with fourier features: sample / timesteps (the score s = F/σ).
            Some(raw) => {
                self.conv_out.forward(rec, p, &self.act_out, raw)?;
                divide_per_sample(rec, &raw.value, &self.timesteps, &self.output.value)
            }
            None => self.conv_out.forward(rec, p, &self.act_out, &self.output),
        }
    }

    /// Records the backward pass from `output.grad`; parameter gradients accumulate (+=) into
    /// `params.grads`.
    pub fn backward(&self, rec: &mut Recorder) -> OpResult {
        let p = &self.params;
        let mut gt = GradTracker::default();
        let gt = &mut gt;
        match &self.raw_output {
            Some(raw) => {
                divide_per_sample(rec, &self.output.grad, &self.timesteps, &raw.grad)?;
                self.conv_out
                    .backward(rec, p, gt, &self.act_out, raw, true)?;
            }
            None => {
                self.conv_out
                    .backward(rec, p, gt, &self.act_out, &self.output, true)?;
            }
        }
        let last = self.last_hidden();
        self.conv_norm_out
            .backward_silu(rec, p, gt, last, &self.act_out)?;
        let conditioning = (Some(&self.emb_act), self.encoder_hidden_states.as_ref());
        backward_nodes(rec, p, gt, &self.nodes, conditioning, self.rng())?;
        self.conv_in
            .backward(rec, p, gt, &self.sample, &self.h_in, false)?;
        // Time embedding: every resnet added its share to d silu(emb).
        silu_backward(
            rec,
            &self.emb.value,
            &self.emb_act.grad,
            &self.emb.grad,
            false,
        )?;
        if let (Some(table), Some(labels)) = (&self.class_embedding, &self.class_labels) {
            let (_, dw) = p.get(table);
            embedding_backward(rec, labels, &self.emb.grad, &dw)?;
        }
        rec.full_precision(|rec| {
            self.linear_2
                .backward(rec, p, gt, &self.t1_act, &self.emb.grad, true)?;
            silu_backward(rec, &self.t1.value, &self.t1_act.grad, &self.t1.grad, false)?;
            self.linear_1
                .backward(rec, p, gt, &self.t_proj, &self.t1.grad, false)
        })
    }

    /// Named intermediate activations (diffusers module names, NHWC) for debugging against the
    /// `act.*` tensors of a PyTorch fixture.
    pub fn activations(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![
            ("time_proj".to_string(), self.t_proj.value.clone()),
            ("time_embedding".to_string(), self.emb.value.clone()),
            ("conv_in".to_string(), self.h_in.value.clone()),
        ];
        v.extend(node_activations(&self.nodes));
        v.push(("conv_act".into(), self.act_out.value.clone()));
        v.push(("conv_out".into(), self.output.value.clone()));
        v
    }
}
