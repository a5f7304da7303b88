//! Stable Diffusion's two trained networks as one model: the CLIP text encoder whose
//! `last_hidden_state` a UNet2DConditionModel attends to, both in one parameter store, so the
//! trainer's clipping, AdamW, EMA, checkpoints and gradient all-reduce cover the pair exactly as
//! they cover a U-Net alone (torch: one optimizer over `unet.parameters()` and
//! `text_encoder.parameters()`, one `clip_grad_norm_` over both).
//!
//! The U-Net's parameters keep their own layout at the front of the store; the text encoder's
//! follow as one contiguous range under the `text_encoder.` prefix, so either half is read or
//! written as a range (exports, the sample grids' text encoder). A frozen text encoder
//! (`requires_grad_(False)`) lies outside every optimizer chunk and skips its backward pass.

use std::ops::Range;
use std::sync::Arc;

use super::clip_text::{ClipTextConfig, ClipTextModel};
use super::{ParamStore, UNet, UNetConfig};
use crate::gpu::{Gpu, GpuError, Recorder};
use crate::ops::OpResult;

/// The name prefix of the text encoder's parameters in a joint store (and in checkpoints).
pub const TEXT_ENCODER_PREFIX: &str = "text_encoder.";

/// The text encoder of a jointly built pair.
pub struct JointTextEncoder {
    pub model: ClipTextModel,
    /// Trained with the U-Net (else frozen: no gradient, no update).
    pub trainable: bool,
}

/// A UNet2DConditionModel for `batch` samples in training mode and the text encoder it attends
/// to (context length = the encoder's `max_position_embeddings`), sharing one store.
pub fn build(
    gpu: &Arc<Gpu>,
    (unet_config, text_config): (&UNetConfig, &ClipTextConfig),
    batch: usize,
    text_trainable: bool,
) -> Result<(UNet, JointTextEncoder), GpuError> {
    let Some(cross) = unet_config.cross_attention.as_ref() else {
        return Err(GpuError::Invalid(
            "a text-conditional model needs a U-Net with cross-attention (UNet2DConditionModel)"
                .into(),
        ));
    };
    if cross.cross_attention_dim != text_config.hidden_size {
        return Err(GpuError::Invalid(format!(
            "the U-Net's cross_attention_dim {} differs from the text encoder's hidden_size {}",
            cross.cross_attention_dim, text_config.hidden_size
        )));
    }
    let tokens = text_config.max_position_embeddings;
    let mut unet = UNet::conditional(gpu, unet_config, batch, tokens, true)?;
    let mut text = ClipTextModel::with_prefix(gpu, text_config, batch, TEXT_ENCODER_PREFIX)?;
    let joint = ParamStore::concat(gpu, &unet.params, &text.params, text_trainable)?;
    unet.params = joint.clone();
    text.params = joint;
    Ok((
        unet,
        JointTextEncoder {
            model: text,
            trainable: text_trainable,
        },
    ))
}

impl JointTextEncoder {
    /// The text encoder's range of the joint flat layout (equal to its own store's layout
    /// without the prefix).
    pub fn range(&self, unet: &UNet) -> Range<usize> {
        let start = self
            .model
            .params
            .specs
            .iter()
            .find(|s| s.name.starts_with(TEXT_ENCODER_PREFIX))
            .map_or(unet.params.len, |s| s.offset);
        start..unet.params.len
    }

    /// The U-Net's range: the front of the layout.
    pub fn unet_range(&self, unet: &UNet) -> Range<usize> {
        0..self.range(unet).start
    }

    /// Records the text encoder over its `input_ids` and copies `last_hidden_state` into the
    /// U-Net's `encoder_hidden_states` (then the U-Net's forward is recorded by the caller).
    pub fn record_forward(&self, rec: &mut Recorder, unet: &UNet) -> OpResult {
        self.model.forward(rec)?;
        let context = unet
            .encoder_hidden_states
            .as_ref()
            .expect("a joint U-Net has cross-attention");
        rec.copy(&self.model.last_hidden_state, &context.value)
    }

    /// After the U-Net's backward: the text encoder's backward from the context's gradient
    /// (nothing when frozen).
    pub fn record_backward(&self, rec: &mut Recorder, unet: &UNet) -> OpResult {
        if !self.trainable {
            return Ok(());
        }
        let context = unet
            .encoder_hidden_states
            .as_ref()
            .expect("a joint U-Net has cross-attention");
        self.model.backward(rec, &context.grad)
    }
}
