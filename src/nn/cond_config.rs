//! Reading a U-Net's config.json: `UNetConfig::from_json`, and diffusers'
//! `UNet2DConditionModel` (Stable Diffusion's U-Net) with diffusers 0.42's defaults into a
//! [`UNetConfig`] whose [`CrossAttention`] describes the text conditioning (`config.rs` writes it
//! back with the same keys). Values that would change the model and that we do not build are
//! errors naming the key.

use serde::Deserialize;
use serde_json::Value;

use super::config::{
    CROSS_DOWN, CROSS_UP, CrossAttention, MID_BLOCK_CROSS as MID_BLOCK, UNetConfig,
    parse_diffusers_config, square_sample_size,
};

/// An int for every level, or a list with one entry per level.
#[derive(Deserialize)]
#[serde(untagged)]
enum PerLevel {
    One(usize),
    Each(Vec<usize>),
}

impl PerLevel {
    fn expand(self, key: &str, levels: usize) -> Result<Vec<usize>, String> {
        match self {
            PerLevel::One(v) => Ok(vec![v; levels]),
            PerLevel::Each(v) if v.len() == levels => Ok(v),
            PerLevel::Each(v) => Err(format!(
                "`{key}` has {} entries; the model has {levels} levels",
                v.len()
            )),
        }
    }
}

/// `config.json` as `UNet2DConditionModel.__init__` reads it, with its 0.42 defaults.
#[derive(Deserialize)]
struct Raw {
    #[serde(default, deserialize_with = "square_sample_size")]
    sample_size: usize,
    #[serde(default = "four")]
    in_channels: usize,
    #[serde(default = "four")]
    out_channels: usize,
    #[serde(default)]
    center_input_sample: bool,
    #[serde(default = "yes")]
    flip_sin_to_cos: bool,
    #[serde(default)]
    freq_shift: f64,
    #[serde(default = "down_block_types")]
    down_block_types: Vec<String>,
    #[serde(default = "mid_block_type")]
    mid_block_type: Option<String>,
    #[serde(default = "up_block_types")]
    up_block_types: Vec<String>,
    #[serde(default = "block_out_channels")]
    block_out_channels: Vec<usize>,
    #[serde(default = "two")]
    layers_per_block: usize,
    #[serde(default = "one")]
    downsample_padding: usize,
    #[serde(default = "unit")]
    mid_block_scale_factor: f64,
    #[serde(default)]
    dropout: f64,
    #[serde(default = "silu")]
    act_fn: String,
    #[serde(default = "thirty_two")]
    norm_num_groups: usize,
    #[serde(default = "norm_eps")]
    norm_eps: f64,
    #[serde(default = "cross_attention_dim")]
    cross_attention_dim: usize,
    #[serde(default)]
    transformer_layers_per_block: Option<PerLevel>,
    #[serde(default)]
    attention_head_dim: Option<PerLevel>,
    #[serde(default)]
    use_linear_projection: bool,
    #[serde(default)]
    num_class_embeds: Option<usize>,
    #[serde(default)]
    upcast_attention: bool,
    #[serde(default = "positional")]
    time_embedding_type: String,
    #[serde(default, rename = "_null_class")]
    null_class: Option<usize>,
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

fn four() -> usize {
    4
}
fn two() -> usize {
    2
}
fn one() -> usize {
    1
}
fn thirty_two() -> usize {
    32
}
fn yes() -> bool {
    true
}
fn unit() -> f64 {
    1.0
}
fn norm_eps() -> f64 {
    1e-5
}
fn cross_attention_dim() -> usize {
    1280
}
fn silu() -> String {
    "silu".into()
}
fn positional() -> String {
    "positional".into()
}
fn mid_block_type() -> Option<String> {
    Some(MID_BLOCK.into())
}
fn block_out_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn down_block_types() -> Vec<String> {
    [CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, "DownBlock2D"]
        .map(String::from)
        .to_vec()
}
fn up_block_types() -> Vec<String> {
    ["UpBlock2D", CROSS_UP, CROSS_UP, CROSS_UP]
        .map(String::from)
        .to_vec()
}

/// Keys UNet2DConditionModel has that we build only at one value (its default): (key, the
/// value as JSON, what the other values would need).
const ONLY_DEFAULT: &[(&str, &str, &str)] = &[
    (
        "only_cross_attention",
        "false",
        "cross-attention-only transformer blocks",
    ),
    (
        "mid_block_only_cross_attention",
        "null",
        "a cross-attention-only mid block",
    ),
    (
        "mid_block_only_cross_attention",
        "false",
        "a cross-attention-only mid block",
    ),
    (
        "reverse_transformer_layers_per_block",
        "null",
        "per-layer transformer depths",
    ),
    (
        "encoder_hid_dim",
        "null",
        "a projection of the text embeddings",
    ),
    (
        "encoder_hid_dim_type",
        "null",
        "a projection of the text embeddings",
    ),
    (
        "num_attention_heads",
        "null",
        "(diffusers itself refuses it)",
    ),
    ("dual_cross_attention", "false", "two cross-attentions"),
    (
        "class_embed_type",
        "null",
        "a class embedding other than num_class_embeds",
    ),
    ("addition_embed_type", "null", "SDXL-style added embeddings"),
    (
        "addition_time_embed_dim",
        "null",
        "SDXL-style added embeddings",
    ),
    (
        "resnet_time_scale_shift",
        "\"default\"",
        "scale-shift time conditioning",
    ),
    (
        "resnet_skip_time_act",
        "false",
        "resnets without the time activation",
    ),
    ("resnet_out_scale_factor", "1.0", "rescaled resnet outputs"),
    ("resnet_out_scale_factor", "1", "rescaled resnet outputs"),
    ("time_embedding_dim", "null", "another time embedding width"),
    (
        "time_embedding_act_fn",
        "null",
        "an activation after the time embedding",
    ),
    (
        "timestep_post_act",
        "null",
        "an activation after the time embedding",
    ),
    (
        "time_cond_proj_dim",
        "null",
        "a timestep condition projection (LCM)",
    ),
    ("conv_in_kernel", "3", "another conv_in kernel"),
    ("conv_out_kernel", "3", "another conv_out kernel"),
    (
        "projection_class_embeddings_input_dim",
        "null",
        "projected class embeddings",
    ),
    ("attention_type", "\"default\"", "gated attention"),
    (
        "class_embeddings_concat",
        "false",
        "concatenated class embeddings",
    ),
    (
        "cross_attention_norm",
        "null",
        "a norm on the text embeddings",
    ),
];

/// Keys that do not change the computation here.
const IGNORED: &[&str] = &["addition_embed_type_num_heads"];

fn check_other_keys(other: &serde_json::Map<String, Value>) -> Result<(), String> {
    for (k, v) in other {
        if k.starts_with('_') || IGNORED.contains(&k.as_str()) {
            continue;
        }
        let rules: Vec<_> = ONLY_DEFAULT.iter().filter(|(n, _, _)| n == k).collect();
        if rules.is_empty() {
            return Err(format!(
                "config key `{k}` is not a UNet2DConditionModel key wgpu-diffusion knows"
            ));
        }
        let ok = rules
            .iter()
            .any(|(_, json, _)| serde_json::from_str::<Value>(json).expect("static JSON") == *v);
        if !ok {
            let (_, json, what) = rules[0];
            return Err(format!(
                "config key `{k}` = {v} is not supported (only {json}): it asks for {what}"
            ));
        }
    }
    Ok(())
}

impl UNetConfig {
    /// Parses a diffusers U-Net `config.json`: a `UNet2DConditionModel` (by its `_class_name`)
    /// with that class's defaults, anything else as a `UNet2DModel`
    /// ([`UNetConfig::from_unet2d_json`]).
    pub fn from_json(text: &str) -> Result<UNetConfig, String> {
        let class = serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|v| v.get("_class_name")?.as_str().map(String::from));
        if class.as_deref() == Some("UNet2DConditionModel") {
            from_cond_json(text)
        } else {
            UNetConfig::from_unet2d_json(text)
        }
    }
}

/// Parses a `UNet2DConditionModel` config.json.
fn from_cond_json(text: &str) -> Result<UNetConfig, String> {
    let nullable = |k: &str| matches!(k, "mid_block_type");
    let (raw, _): (Raw, _) = parse_diffusers_config(text, "UNet2DConditionModel", nullable)?;
    check_other_keys(&raw.other)?;
    let levels = raw.block_out_channels.len();
    let heads = raw
        .attention_head_dim
        .unwrap_or(PerLevel::One(8))
        .expand("attention_head_dim", levels)?;
    let transformer_layers = raw
        .transformer_layers_per_block
        .unwrap_or(PerLevel::One(1))
        .expand("transformer_layers_per_block", levels)?;
    let mid_block = match raw.mid_block_type.as_deref() {
        Some(MID_BLOCK) => true,
        None => false,
        Some(other) => {
            return Err(format!(
                "`mid_block_type` `{other}` is not supported ({MID_BLOCK} or null)"
            ));
        }
    };
    if raw.time_embedding_type != "positional" {
        return Err(format!(
            "`time_embedding_type` `{}` is not supported in a UNet2DConditionModel (positional)",
            raw.time_embedding_type
        ));
    }
    let config = UNetConfig {
        sample_size: raw.sample_size,
        in_channels: raw.in_channels,
        out_channels: raw.out_channels,
        block_out_channels: raw.block_out_channels,
        layers_per_block: raw.layers_per_block,
        down_block_types: raw.down_block_types,
        up_block_types: raw.up_block_types,
        norm_num_groups: raw.norm_num_groups,
        norm_eps: raw.norm_eps,
        flip_sin_to_cos: raw.flip_sin_to_cos,
        freq_shift: raw.freq_shift,
        downsample_padding: raw.downsample_padding,
        mid_block_scale_factor: raw.mid_block_scale_factor,
        attention_head_dim: None,
        dropout: raw.dropout,
        act_fn: raw.act_fn,
        center_input_sample: raw.center_input_sample,
        time_embedding_type: raw.time_embedding_type,
        num_class_embeds: raw.num_class_embeds,
        null_class: raw.null_class,
        sr_scale: None,
        cross_attention: Some(CrossAttention {
            cross_attention_dim: raw.cross_attention_dim,
            heads,
            transformer_layers,
            use_linear_projection: raw.use_linear_projection,
            upcast_attention: raw.upcast_attention,
            mid_block,
        }),
    };
    config.validate()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_defaults_and_round_trip() {
        let c = from_cond_json(r#"{"sample_size": 64}"#).unwrap();
        let x = c.cross_attention.clone().unwrap();
        assert_eq!(c.block_out_channels, vec![320, 640, 1280, 1280]);
        assert_eq!((x.heads[0], x.cross_attention_dim), (8, 1280));
        assert_eq!(UNetConfig::from_json(&c.to_json()).unwrap(), c);
    }

    #[test]
    fn unsupported_values_are_named() {
        for (key, value) in [
            ("addition_embed_type", "\"text_time\""),
            ("dual_cross_attention", "true"),
            ("class_embed_type", "\"timestep\""),
            ("only_cross_attention", "true"),
        ] {
            let e =
                from_cond_json(&format!(r#"{{"sample_size": 64, "{key}": {value}}}"#)).unwrap_err();
            assert!(e.contains(key), "{key}: {e}");
        }
        let e = from_cond_json(r#"{"sample_size": 64, "attention_head_dim": [8, 8]}"#).unwrap_err();
        assert!(e.contains("attention_head_dim"), "{e}");
        let e = from_cond_json(r#"{"sample_size": 64, "down_block_types": ["AttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"]}"#).unwrap_err();
        assert!(e.contains("AttnDownBlock2D"), "{e}");
    }
}
