//! A model's blocks as a list of nodes recorded in order (forward) and in reverse (backward):
//! what `UNet2DModel` and `AutoencoderKL` are built from. Each node names its input and output
//! activations; parameter gradients accumulate into the store, activation gradients through a
//! [`GradTracker`].

use std::sync::Arc;

use super::layers::{AttentionBlock, BlockSettings, Downsample, ParamDecls, ResnetBlock, Upsample};
use super::transformer::{Transformer2D, TransformerSettings};
use super::{Act, GradTracker, ParamStore};
use crate::gpu::{Gpu, Recorder, Tensor};
use crate::ops::elementwise::copy_channels;
use crate::ops::{OpResult, invalid};

pub enum Node {
    Resnet {
        block: Box<ResnetBlock>,
        x: Act,
        out: Act,
    },
    Attention {
        block: Box<AttentionBlock>,
        x: Act,
        out: Act,
    },
    /// Cross-attention to the context (a UNet2DConditionModel's Transformer2DModel).
    Transformer {
        block: Box<Transformer2D>,
        x: Act,
        out: Act,
    },
    Down {
        block: Downsample,
        x: Act,
        out: Act,
    },
    Up {
        block: Upsample,
        x: Act,
        out: Act,
    },
    Concat {
        a: Act,
        b: Act,
        out: Act,
    },
}

/// Appends an attention block reading `x` and returns its output.
#[allow(clippy::too_many_arguments)]
pub fn attention_node(
    gpu: &Arc<Gpu>,
    d: &mut ParamDecls,
    prefix: &str,
    x: &Act,
    head_dim: usize,
    settings: BlockSettings,
    rescale: f64,
    nodes: &mut Vec<Node>,
) -> Act {
    let out = Act::new(gpu, x.shape(), prefix);
    let block = AttentionBlock::new(gpu, d, prefix, x.shape(), head_dim, settings, rescale);
    nodes.push(Node::Attention {
        block: Box::new(block),
        x: x.clone(),
        out: out.clone(),
    });
    out
}

/// Appends a Transformer2DModel reading `x` (attending to `context_tokens` rows of context per
/// sample) and returns its output.
pub fn transformer_node(
    gpu: &Arc<Gpu>,
    d: &mut ParamDecls,
    prefix: &str,
    x: &Act,
    context_tokens: usize,
    settings: &TransformerSettings,
    nodes: &mut Vec<Node>,
) -> Act {
    let out = Act::new(gpu, x.shape(), prefix);
    let block = Transformer2D::new(gpu, d, prefix, x.shape(), context_tokens, settings);
    nodes.push(Node::Transformer {
        block: Box::new(block),
        x: x.clone(),
        out: out.clone(),
    });
    out
}

fn need_context(context: Option<&Act>) -> OpResult<&Act> {
    context.ok_or_else(|| invalid("a cross-attention block needs encoder_hidden_states"))
}

/// Records the nodes' forward passes in order. `temb_act` = silu(time embedding) for the resnets
/// of a model that has one; `rng` = (state, first stream index) for dropout; `context` = the
/// encoder hidden states [samples · tokens, width] the cross-attention blocks attend to.
pub fn forward_nodes(
    rec: &mut Recorder,
    p: &ParamStore,
    nodes: &[Node],
    temb_act: Option<&Act>,
    rng: Option<(&Tensor, u32)>,
    context: Option<&Act>,
) -> OpResult {
    for node in nodes {
        match node {
            Node::Resnet { block, x, out } => block.forward(rec, p, x, temb_act, out, rng)?,
            Node::Attention { block, x, out } => block.forward(rec, p, x, out)?,
            Node::Transformer { block, x, out } => {
                block.forward(rec, p, x, &need_context(context)?.value, out)?
            }
            Node::Down { block, x, out } => block.forward(rec, p, x, out)?,
            Node::Up { block, x, out } => block.forward(rec, p, x, out)?,
            Node::Concat { a, b, out } => {
                let (ca, cb) = (a.shape()[3], b.shape()[3]);
                copy_channels(rec, &a.value, 0, &out.value, 0, ca, false)?;
                copy_channels(rec, &b.value, 0, &out.value, ca, cb, false)?;
            }
        }
    }
    Ok(())
}

/// Records the nodes' backward passes in reverse order, from the last output's gradient (the
/// context's gradient accumulated through the tracker).
pub fn backward_nodes(
    rec: &mut Recorder,
    p: &ParamStore,
    gt: &mut GradTracker,
    nodes: &[Node],
    (temb_act, context): (Option<&Act>, Option<&Act>),
    rng: Option<(&Tensor, u32)>,
) -> OpResult {
    for node in nodes.iter().rev() {
        match node {
            Node::Resnet { block, x, out } => block.backward(rec, p, gt, x, temb_act, out, rng)?,
            Node::Attention { block, x, out } => block.backward(rec, p, gt, x, out)?,
            Node::Transformer { block, x, out } => {
                block.backward(rec, p, gt, (x, need_context(context)?), out)?
            }
            Node::Down { block, x, out } => block.backward(rec, p, gt, x, out)?,
            Node::Up { block, x, out } => block.backward(rec, p, gt, x, out)?,
            Node::Concat { a, b, out } => {
                let (ca, cb) = (a.shape()[3], b.shape()[3]);
                let acc = gt.accumulate(&a.grad);
                copy_channels(rec, &out.grad, 0, &a.grad, 0, ca, acc)?;
                let acc = gt.accumulate(&b.grad);
                copy_channels(rec, &out.grad, ca, &b.grad, 0, cb, acc)?;
            }
        }
    }
    Ok(())
}

/// The output of the last node.
pub fn last_output(nodes: &[Node]) -> Option<&Act> {
    nodes.last().map(|node| match node {
        Node::Resnet { out, .. }
        | Node::Attention { out, .. }
        | Node::Transformer { out, .. }
        | Node::Down { out, .. }
        | Node::Up { out, .. }
        | Node::Concat { out, .. } => out,
    })
}

/// (label, value) of every node's output but the concatenations, for debugging against a
/// fixture's `act.*` tensors.
pub fn node_activations(nodes: &[Node]) -> Vec<(String, Tensor)> {
    nodes
        .iter()
        .filter_map(|node| match node {
            Node::Resnet { out, .. }
            | Node::Attention { out, .. }
            | Node::Transformer { out, .. }
            | Node::Down { out, .. }
            | Node::Up { out, .. } => Some((out.value.label().to_string(), out.value.clone())),
            Node::Concat { .. } => None,
        })
        .collect()
}
