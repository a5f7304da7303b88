//! diffusers' `AutoencoderKL` (`models/autoencoders/autoencoder_kl.py`, `vae.py`), built for a
//! fixed batch size from the same nodes as the U-Net (`nn/graph.rs`), with diffusers' state-dict
//! names: `encoder.*` (conv_in, DownEncoderBlock2D blocks of resnets and a pad-right/bottom
//! stride-2 downsampler but after the last, the mid block resnet – attention – resnet,
//! GroupNorm + SiLU, conv_out to 2·latent channels), `quant_conv`, the diagonal Gaussian posterior
//! (`ops/posterior.rs`), `post_quant_conv`, `decoder.*` (conv_in, mid block, UpDecoderBlock2D
//! blocks of layers_per_block + 1 resnets and a nearest ×2 + conv upsampler but after the last,
//! GroupNorm + SiLU, conv_out). Every GroupNorm has eps 1e-6; no time embedding; attention is one
//! head as wide as the channels. Activations are NHWC.

use std::sync::Arc;

use super::graph::{Node, backward_nodes, forward_nodes, last_output, node_activations};
use super::layers::{
    AttentionBlock, BlockSettings, Conv2d, Downsample, GroupNorm, ParamDecls, ResnetBlock, Upsample,
};
use super::{Act, GradTracker, ParamStore, VaeConfig};
use crate::gpu::{Gpu, GpuError, Recorder, Tensor};
use crate::ops::OpResult;
use crate::ops::conv2d::Conv2dGeometry;
use crate::ops::posterior::{posterior_kl_backward, posterior_sample, posterior_sample_backward};

/// diffusers builds every VAE GroupNorm with eps 1e-6 (`resnet_eps` of the encoder and decoder).
const VAE_NORM_EPS: f64 = 1e-6;

/// One side of the autoencoder: conv_in, the blocks as nodes, GroupNorm + SiLU (fused), conv_out.
struct Coder {
    conv_in: Conv2d,
    h_in: Act,
    nodes: Vec<Node>,
    norm_out: GroupNorm,
    act_out: Act,
    conv_out: Conv2d,
}

impl Coder {
    fn forward(&self, rec: &mut Recorder, p: &ParamStore, x: &Act, out: &Act) -> OpResult {
        self.conv_in.forward(rec, p, x, &self.h_in)?;
        forward_nodes(rec, p, &self.nodes, None, None, None)?;
        let last = last_output(&self.nodes).unwrap_or(&self.h_in);
        self.norm_out.forward_silu(rec, p, last, &self.act_out)?;
        self.conv_out.forward(rec, p, &self.act_out, out)
    }

    /// From `out.grad`; `input_grad`: whether `x.grad` is wanted (the decoder's input is the
    /// latent, whose gradient reaches the encoder; the encoder's is the image, whose is not).
    fn backward(
        &self,
        rec: &mut Recorder,
        p: &ParamStore,
        gt: &mut GradTracker,
        x: &Act,
        out: &Act,
        input_grad: bool,
    ) -> OpResult {
        self.conv_out
            .backward(rec, p, gt, &self.act_out, out, true)?;
        let last = last_output(&self.nodes).unwrap_or(&self.h_in);
        self.norm_out
            .backward_silu(rec, p, gt, last, &self.act_out)?;
        backward_nodes(rec, p, gt, &self.nodes, (None, None), None)?;
        self.conv_in.backward(rec, p, gt, x, &self.h_in, input_grad)
    }
}

/// Builds the nodes of a resnet from `cur` to `cout` channels and returns its output.
fn resnet(
    gpu: &Arc<Gpu>,
    d: &mut ParamDecls,
    prefix: &str,
    cur: &Act,
    cout: usize,
    settings: BlockSettings,
    nodes: &mut Vec<Node>,
) -> Act {
    let s = cur.shape();
    let out = Act::new(gpu, &[s[0], s[1], s[2], cout], prefix);
    let block = ResnetBlock::new(gpu, d, prefix, s, cout, settings, 1.0, &out, None);
    nodes.push(Node::Resnet {
        block: Box::new(block),
        x: cur.clone(),
        out: out.clone(),
    });
    out
}

/// UNetMidBlock2D without a time embedding: resnet, attention (one head, when enabled), resnet.
fn mid_block(
    gpu: &Arc<Gpu>,
    d: &mut ParamDecls,
    prefix: &str,
    cur: Act,
    attention: bool,
    settings: BlockSettings,
    nodes: &mut Vec<Node>,
) -> Act {
    let c = cur.shape()[3];
    let mut cur = resnet(
        gpu,
        d,
        &format!("{prefix}.resnets.0"),
        &cur,
        c,
        settings,
        nodes,
    );
    if attention {
        let name = format!("{prefix}.attentions.0");
        let out = Act::new(gpu, cur.shape(), &name);
        let block = AttentionBlock::new(gpu, d, &name, cur.shape(), c, settings, 1.0);
        nodes.push(Node::Attention {
            block: Box::new(block),
            x: cur.clone(),
            out: out.clone(),
        });
        cur = out;
    }
    resnet(
        gpu,
        d,
        &format!("{prefix}.resnets.1"),
        &cur,
        c,
        settings,
        nodes,
    )
}

/// GroupNorm + SiLU and conv_out after the last node.
fn coder_tail(
    gpu: &Arc<Gpu>,
    d: &mut ParamDecls,
    prefix: &str,
    last: &Act,
    cout: usize,
    groups: usize,
) -> (GroupNorm, Act, Conv2d) {
    let c = last.shape()[3];
    let norm = GroupNorm::new(
        gpu,
        d,
        &format!("{prefix}.conv_norm_out"),
        last.shape(),
        groups,
        VAE_NORM_EPS,
    );
    let act = Act::new(gpu, last.shape(), &format!("{prefix}.conv_act"));
    let conv = Conv2d::new(
        d,
        &format!("{prefix}.conv_out"),
        c,
        cout,
        3,
        Conv2dGeometry::same(1, 1),
    );
    (norm, act, conv)
}

fn encoder(gpu: &Arc<Gpu>, d: &mut ParamDecls, c: &VaeConfig, x: &Act) -> Coder {
    let settings = BlockSettings {
        groups: c.norm_num_groups,
        eps: VAE_NORM_EPS,
        temb_dim: 0,
    };
    let [b, sh, sw] = [x.shape()[0], x.shape()[1], x.shape()[2]];
    let c0 = c.block_out_channels[0];
    let conv_in = Conv2d::new(
        d,
        "encoder.conv_in",
        c.in_channels,
        c0,
        3,
        Conv2dGeometry::same(1, 1),
    );
    let h_in = Act::new(gpu, &[b, sh, sw, c0], "encoder.conv_in");
    let mut nodes = Vec::new();
    let mut cur = h_in.clone();
    let levels = c.block_out_channels.len();
    for (i, &out_c) in c.block_out_channels.iter().enumerate() {
        for j in 0..c.layers_per_block {
            let prefix = format!("encoder.down_blocks.{i}.resnets.{j}");
            cur = resnet(gpu, d, &prefix, &cur, out_c, settings, &mut nodes);
        }
        if i + 1 < levels {
            // Downsample2D with padding 0: F.pad(x, (0, 1, 0, 1)), then a stride-2 3×3 conv.
            let prefix = format!("encoder.down_blocks.{i}.downsamplers.0");
            let block = Downsample::new(d, &prefix, out_c, 0);
            let (h, w) = block.output_hw(cur.shape()[1], cur.shape()[2]);
            let out = Act::new(gpu, &[b, h, w, out_c], &prefix);
            nodes.push(Node::Down {
                block,
                x: cur.clone(),
                out: out.clone(),
            });
            cur = out;
        }
    }
    let attention = c.mid_block_add_attention;
    let cur = mid_block(
        gpu,
        d,
        "encoder.mid_block",
        cur,
        attention,
        settings,
        &mut nodes,
    );
    let (norm_out, act_out, conv_out) = coder_tail(
        gpu,
        d,
        "encoder",
        &cur,
        2 * c.latent_channels,
        c.norm_num_groups,
    );
    Coder {
        conv_in,
        h_in,
        nodes,
        norm_out,
        act_out,
        conv_out,
    }
}

fn decoder(gpu: &Arc<Gpu>, d: &mut ParamDecls, c: &VaeConfig, z: &Act) -> Coder {
    let settings = BlockSettings {
        groups: c.norm_num_groups,
        eps: VAE_NORM_EPS,
        temb_dim: 0,
    };
    let [b, sh, sw] = [z.shape()[0], z.shape()[1], z.shape()[2]];
    let top = *c
        .block_out_channels
        .last()
        .expect("validated: at least one level");
    let conv_in = Conv2d::new(
        d,
        "decoder.conv_in",
        c.latent_channels,
        top,
        3,
        Conv2dGeometry::same(1, 1),
    );
    let h_in = Act::new(gpu, &[b, sh, sw, top], "decoder.conv_in");
    let mut nodes = Vec::new();
    let attention = c.mid_block_add_attention;
    let mut cur = mid_block(
        gpu,
        d,
        "decoder.mid_block",
        h_in.clone(),
        attention,
        settings,
        &mut nodes,
    );
    let levels = c.block_out_channels.len();
    for (i, &out_c) in c.block_out_channels.iter().rev().enumerate() {
        for j in 0..c.layers_per_block + 1 {
            let prefix = format!("decoder.up_blocks.{i}.resnets.{j}");
            cur = resnet(gpu, d, &prefix, &cur, out_c, settings, &mut nodes);
        }
        if i + 1 < levels {
            let prefix = format!("decoder.up_blocks.{i}.upsamplers.0");
            let block = Upsample::new(gpu, d, &prefix, cur.shape());
            let [h, w] = [cur.shape()[1], cur.shape()[2]];
            let out = Act::new(gpu, &[b, 2 * h, 2 * w, out_c], &prefix);
            nodes.push(Node::Up {
                block,
                x: cur.clone(),
                out: out.clone(),
            });
            cur = out;
        }
    }
    let (norm_out, act_out, conv_out) =
        coder_tail(gpu, d, "decoder", &cur, c.out_channels, c.norm_num_groups);
    Coder {
        conv_in,
        h_in,
        nodes,
        norm_out,
        act_out,
        conv_out,
    }
}

pub struct Vae {
    pub config: VaeConfig,
    pub batch: usize,
    pub params: ParamStore,
    /// The image, NHWC [B, S, S, in_channels].
    pub sample: Act,
    encoder: Coder,
    /// The encoder's output (before `quant_conv`), [B, s, s, 2L].
    enc_out: Act,
    quant_conv: Option<Conv2d>,
    /// The posterior's parameters (after `quant_conv`): μ in the first L channels, the
    /// log-variance in the last L, [B, s, s, 2L].
    pub moments: Act,
    /// ε of z = μ + σ·ε, [B, s, s, L]: zeros give the posterior's mode.
    pub eps: Tensor,
    /// The latent z, [B, s, s, L].
    pub latent: Act,
    post_quant_conv: Option<Conv2d>,
    /// The decoder's input (after `post_quant_conv`).
    dec_in: Act,
    decoder: Coder,
    /// The reconstruction, NHWC [B, S, S, out_channels].
    pub output: Act,
}

impl Vae {
    pub fn new(gpu: &Arc<Gpu>, config: &VaeConfig, batch: usize) -> Result<Vae, GpuError> {
        let s = config.sample_size;
        Self::at(gpu, config, batch, (s, s))
    }

    /// The VAE for images of `(height, width)` instead of its square `sample_size` (each side a
    /// multiple of [`VaeConfig::downscale`]); latents are 1/downscale of that.
    pub fn at(
        gpu: &Arc<Gpu>,
        config: &VaeConfig,
        batch: usize,
        size: (usize, usize),
    ) -> Result<Vae, GpuError> {
        Self::build(gpu, config, batch, size, true)
    }

    /// [`Vae::at`] for decoding only (a sampler): the encoder's parameters are there, so the
    /// weights load as a whole, but its activations have no storage (at SD's 512 × 512, over
    /// 1.5 GB), and recording [`Vae::encode`] is refused.
    pub fn decoder_at(
        gpu: &Arc<Gpu>,
        config: &VaeConfig,
        batch: usize,
        size: (usize, usize),
    ) -> Result<Vae, GpuError> {
        Self::build(gpu, config, batch, size, false)
    }

    fn build(
        gpu: &Arc<Gpu>,
        config: &VaeConfig,
        batch: usize,
        (h, w): (usize, usize),
        with_encoder: bool,
    ) -> Result<Vae, GpuError> {
        config.validate().map_err(GpuError::Invalid)?;
        config.check_image_size((h, w)).map_err(GpuError::Invalid)?;
        if batch == 0 {
            return Err(GpuError::Invalid("batch size must be at least 1".into()));
        }
        let c = config;
        let l = c.latent_channels;
        let (lh, lw) = (h / c.downscale(), w / c.downscale());
        let mut d = ParamDecls::default();
        let unused = (!with_encoder).then(crate::gpu::unused_activations);
        let sample = Act::new_f32(gpu, &[batch, h, w, c.in_channels], "sample");
        let encoder = encoder(gpu, &mut d, c, &sample);
        let enc_out = Act::new(gpu, &[batch, lh, lw, 2 * l], "encoder.conv_out");
        drop(unused);
        let quant_conv = c.use_quant_conv.then(|| {
            Conv2d::new(
                &mut d,
                "quant_conv",
                2 * l,
                2 * l,
                1,
                Conv2dGeometry::same(1, 0),
            )
        });
        let moments = if quant_conv.is_some() {
            Act::new(gpu, &[batch, lh, lw, 2 * l], "quant_conv")
        } else {
            enc_out.clone()
        };
        let eps = gpu.tensor(&[batch, lh, lw, l], "posterior eps");
        // The latent is what a latent U-Net reads (f32, as its inputs are) and what a sampler
        // writes for the decoder: f32 whatever the precision.
        let latent = Act::new_f32(gpu, &[batch, lh, lw, l], "latent z");
        let post_quant_conv = c.use_post_quant_conv.then(|| {
            Conv2d::new(
                &mut d,
                "post_quant_conv",
                l,
                l,
                1,
                Conv2dGeometry::same(1, 0),
            )
        });
        let dec_in = if post_quant_conv.is_some() {
            Act::new(gpu, &[batch, lh, lw, l], "post_quant_conv")
        } else {
            latent.clone()
        };
        let decoder = decoder(gpu, &mut d, c, &dec_in);
        // The output stays f32 (the loss computes from it in f32), as a U-Net's does.
        let output = Act::new_f32(gpu, &[batch, h, w, c.out_channels], "decoder.conv_out");
        let params = ParamStore::new(gpu, &d.0)?;
        Ok(Vae {
            config: c.clone(),
            batch,
            params,
            sample,
            encoder,
            enc_out,
            quant_conv,
            moments,
            eps,
            latent,
            post_quant_conv,
            dec_in,
            decoder,
            output,
        })
    }

    /// Records `encode`: `sample` → `moments` (the posterior's μ and log-variance).
    pub fn encode(&self, rec: &mut Recorder) -> OpResult {
        let p = &self.params;
        self.encoder.forward(rec, p, &self.sample, &self.enc_out)?;
        if let Some(q) = &self.quant_conv {
            q.forward(rec, p, &self.enc_out, &self.moments)?;
        }
        Ok(())
    }

    /// Records z = μ + σ·ε from `moments` and `eps` into `latent`.
    pub fn sample_latent(&self, rec: &mut Recorder) -> OpResult {
        posterior_sample(rec, &self.moments.value, &self.eps, &self.latent.value)
    }

    /// Records `decode`: `latent` → `output`.
    pub fn decode(&self, rec: &mut Recorder) -> OpResult {
        let p = &self.params;
        if let Some(q) = &self.post_quant_conv {
            q.forward(rec, p, &self.latent, &self.dec_in)?;
        }
        self.decoder.forward(rec, p, &self.dec_in, &self.output)
    }

    /// Records the whole forward pass: encode, z = μ + σ·ε, decode.
    pub fn forward(&self, rec: &mut Recorder) -> OpResult {
        self.encode(rec)?;
        self.sample_latent(rec)?;
        self.decode(rec)
    }

    /// Records the backward pass of `rec_loss(output) + kl_weight · kl_mean(moments)` from
    /// `output.grad` (the reconstruction loss's gradient, written by the caller); the KL term's
    /// gradient is added at the posterior. Parameter gradients accumulate into `params.grads`.
    pub fn backward(&self, rec: &mut Recorder, kl_weight: f32) -> OpResult {
        self.backward_scaled(rec, kl_weight, None)
    }

    /// [`backward`](Self::backward) of a step whose loss gradient a GradScaler multiplied by
    /// its scale (`loss_scale`, the scaler's state): the KL term's gradient is scaled too.
    pub fn backward_scaled(
        &self,
        rec: &mut Recorder,
        kl_weight: f32,
        loss_scale: Option<&Tensor>,
    ) -> OpResult {
        let p = &self.params;
        let mut gt = GradTracker::default();
        let gt = &mut gt;
        self.decoder
            .backward(rec, p, gt, &self.dec_in, &self.output, true)?;
        if let Some(q) = &self.post_quant_conv {
            q.backward(rec, p, gt, &self.latent, &self.dec_in, true)?;
        }
        posterior_sample_backward(
            rec,
            &self.moments.value,
            &self.eps,
            &self.latent.grad,
            &self.moments.grad,
        )?;
        if kl_weight != 0.0 {
            let (moments, grad) = (&self.moments.value, &self.moments.grad);
            posterior_kl_backward(rec, moments, kl_weight, loss_scale, grad)?;
        }
        if let Some(q) = &self.quant_conv {
            q.backward(rec, p, gt, &self.enc_out, &self.moments, true)?;
        }
        self.encoder
            .backward(rec, p, gt, &self.sample, &self.enc_out, false)
    }

    /// Named intermediate activations (diffusers module names, NHWC), for debugging against the
    /// `act.*` tensors of a PyTorch fixture.
    pub fn activations(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![(
            "encoder.conv_in".to_string(),
            self.encoder.h_in.value.clone(),
        )];
        v.extend(node_activations(&self.encoder.nodes));
        v.push(("encoder.conv_out".into(), self.enc_out.value.clone()));
        if self.quant_conv.is_some() {
            v.push(("quant_conv".into(), self.moments.value.clone()));
        }
        if self.post_quant_conv.is_some() {
            v.push(("post_quant_conv".into(), self.dec_in.value.clone()));
        }
        v.push(("decoder.conv_in".into(), self.decoder.h_in.value.clone()));
        v.extend(node_activations(&self.decoder.nodes));
        v.push(("decoder.conv_out".into(), self.output.value.clone()));
        v
    }
}
