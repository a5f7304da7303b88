//! `UNetConfig`: the subset of diffusers' `UNet2DModel` config.json this project builds, read and
//! written with diffusers' own keys. A key or value that would change the model and is not
//! supported is an error naming it, never silently ignored.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    pub sample_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub attention_head_dim: Option<usize>,
    pub dropout: f64,
    pub act_fn: String,
    pub center_input_sample: bool,
    pub time_embedding_type: String,
    /// Class conditioning: a learned `nn.Embedding(num_class_embeds, time_embed_dim)` row added
    /// to the time embedding (diffusers' `class_embed_type` null).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_class_embeds: Option<usize>,
    /// The label of the unconditional ("null") class of a model trained with label dropout
    /// (classifier-free guidance); written as `_null_class` (diffusers ignores `_` keys).
    #[serde(
        default,
        rename = "_null_class",
        skip_serializing_if = "Option::is_none"
    )]
    pub null_class: Option<usize>,
    /// Super-resolution by this factor: the input is `cat([x_t, bicubic(LR)])`, so
    /// `in_channels` = 2 × `out_channels`; written as `_sr_scale`.
    #[serde(default, rename = "_sr_scale", skip_serializing_if = "Option::is_none")]
    pub sr_scale: Option<usize>,
    /// A `UNet2DConditionModel`'s text conditioning (read and written by `cond_config`).
    #[serde(skip)]
    pub cross_attention: Option<CrossAttention>,
}

/// What a `UNet2DConditionModel` adds to the U-Net: a Transformer2DModel after each resnet of
/// its cross-attention blocks and in the mid block, attending to `encoder_hidden_states`.
#[derive(Clone, Debug, PartialEq)]
pub struct CrossAttention {
    /// Width of the context rows (the text encoder's hidden size).
    pub cross_attention_dim: usize,
    /// Heads of each level's transformers: diffusers' `attention_head_dim`, which in
    /// UNet2DConditionModel is the number of heads (SD 1.5: 8 heads of width 40, 80, 160).
    pub heads: Vec<usize>,
    /// `transformer_layers_per_block` of each level.
    pub transformer_layers: Vec<usize>,
    pub use_linear_projection: bool,
    /// Attention in f32 where it would run in f16; we compute in f32 anyway, so either value
    /// gives the same model. Kept to write the config back unchanged.
    pub upcast_attention: bool,
    /// The mid block: `UNetMidBlock2DCrossAttn` (true) or none at all (diffusers' null).
    pub mid_block: bool,
}

pub const CROSS_DOWN: &str = "CrossAttnDownBlock2D";
pub const CROSS_UP: &str = "CrossAttnUpBlock2D";
pub const MID_BLOCK_CROSS: &str = "UNetMidBlock2DCrossAttn";

/// Keys diffusers writes that we accept, with the only values we support (None = any value is
/// fine because it does not change the computation, e.g. bookkeeping keys).
const ACCEPTED_AS_DEFAULT: &[(&str, Option<&str>)] = &[
    ("_class_name", None),
    ("_diffusers_version", None),
    ("_name_or_path", None),
    ("resnet_time_scale_shift", Some("\"default\"")),
    ("class_embed_type", Some("null")),
    ("add_attention", Some("true")),
    ("attn_norm_num_groups", Some("null")),
    ("downsample_type", Some("\"conv\"")),
    ("upsample_type", Some("\"conv\"")),
    ("time_embedding_dim", Some("null")),
    ("num_train_timesteps", Some("null")),
    // diffusers ≥ 0.30 writes the mid block's class; null would mean "no mid block".
    ("mid_block_type", Some("\"UNetMidBlock2D\"")),
];

/// Bounds on the sizes a config may ask for, checked before anything is computed from them:
/// far beyond any model this tool trains, small enough that no arithmetic overflows.
pub const MAX_CHANNELS: usize = 1 << 14;
pub const MAX_SAMPLE_SIZE: usize = 4096;
pub const MAX_CLASSES: usize = 1 << 20;

impl UNetConfig {
    /// Named presets ([`UNetConfig::PRESETS`]): tiny16, mnist28, cifar32
    /// (google/ddpm-cifar10-32), tiny28 (tiny16's network at 28×28), mnist-ldm (latents), and
    /// the text-to-image ones of [`UNetConfig::text_preset`].
    pub fn preset(name: &str) -> Option<UNetConfig> {
        let ddpm = Self::preset_layout;
        match name {
            "tiny16" => Some(ddpm(
                16,
                1,
                &[32, 64],
                1,
                &["DownBlock2D", "AttnDownBlock2D"],
                &["AttnUpBlock2D", "UpBlock2D"],
                8,
            )),
            // tiny16's network at MNIST's full size (super-resolution runs).
            "tiny28" => Some(ddpm(
                28,
                1,
                &[32, 64],
                1,
                &["DownBlock2D", "AttnDownBlock2D"],
                &["AttnUpBlock2D", "UpBlock2D"],
                8,
            )),
            "mnist28" => Some(ddpm(
                28,
                1,
                &[32, 64, 64],
                2,
                &["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
                &["AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
                8,
            )),
            // Latent diffusion on mnist-vae's 4×8×8 latents (issue 22's suggested U-Net):
            // 8×8 then 4×4 with attention, 32 groups as Stable Diffusion's U-Net.
            "mnist-ldm" => Some(ddpm(
                8,
                4,
                &[64, 128],
                2,
                &["DownBlock2D", "AttnDownBlock2D"],
                &["AttnUpBlock2D", "UpBlock2D"],
                32,
            )),
            "cifar32" => Some(ddpm(
                32,
                3,
                &[128, 256, 256, 256],
                2,
                &[
                    "DownBlock2D",
                    "AttnDownBlock2D",
                    "DownBlock2D",
                    "DownBlock2D",
                ],
                &["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
                32,
            )),
            _ => Self::text_preset(name),
        }
    }

    /// The layout every preset starts from: a DDPM UNet2DModel (google/ddpm-*'s settings).
    fn preset_layout(
        sample_size: usize,
        in_out: usize,
        blocks: &[usize],
        layers: usize,
        down: &[&str],
        up: &[&str],
        groups: usize,
    ) -> UNetConfig {
        UNetConfig {
            sample_size,
            in_channels: in_out,
            out_channels: in_out,
            block_out_channels: blocks.to_vec(),
            layers_per_block: layers,
            down_block_types: down.iter().map(|s| s.to_string()).collect(),
            up_block_types: up.iter().map(|s| s.to_string()).collect(),
            norm_num_groups: groups,
            norm_eps: 1e-6,
            flip_sin_to_cos: false,
            freq_shift: 1.0,
            downsample_padding: 0,
            mid_block_scale_factor: 1.0,
            attention_head_dim: None,
            dropout: 0.0,
            act_fn: "silu".into(),
            center_input_sample: false,
            time_embedding_type: "positional".into(),
            num_class_embeds: None,
            null_class: None,
            sr_scale: None,
            cross_attention: None,
        }
    }

    /// The text-to-image presets (UNet2DConditionModel, issue 23).
    fn text_preset(name: &str) -> Option<UNetConfig> {
        // UNet2DConditionModel's own defaults (sin first, no shift, eps 1e-5, padding 1) and
        // 4 heads of cross-attention to the 64-wide text encoder at every level of `layout`
        // whose blocks have it, and in the mid-block.
        let conditional = |layout: UNetConfig| UNetConfig {
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            downsample_padding: 1,
            cross_attention: Some(CrossAttention {
                cross_attention_dim: 64,
                heads: vec![4; layout.block_out_channels.len()],
                transformer_layers: vec![1; layout.block_out_channels.len()],
                use_linear_projection: false,
                upcast_attention: false,
                mid_block: true,
            }),
            ..layout
        };
        let ddpm = Self::preset_layout;
        match name {
            // Text-to-image on MNIST (issue 23): a UNet2DConditionModel at 28, 14 and 7 pixels
            // with cross-attention at 7×7 (down, mid and up: 49 tokens, where attention is
            // cheap).
            "mnist28-text" => Some(conditional(ddpm(
                28,
                1,
                &[32, 64, 64],
                1,
                &["DownBlock2D", "DownBlock2D", CROSS_DOWN],
                &[CROSS_UP, "UpBlock2D", "UpBlock2D"],
                8,
            ))),
            // Stable Diffusion's layout at MNIST's latent size (issue 23, `--vae` with
            // `--text-conditional`): a UNet2DConditionModel on mnist-vae's 4×8×8 latents with
            // cross-attention at 8×8 and 4×4 (64 and 16 tokens) and in the mid-block, 32
            // groups as SD's U-Net.
            "mnist-sd" => Some(conditional(ddpm(
                8,
                4,
                &[64, 128],
                2,
                &[CROSS_DOWN, CROSS_DOWN],
                &[CROSS_UP, CROSS_UP],
                32,
            ))),
            _ => None,
        }
    }

    pub const PRESETS: [&'static str; 7] = [
        "tiny16",
        "tiny28",
        "mnist28",
        "mnist-ldm",
        "cifar32",
        "mnist28-text",
        "mnist-sd",
    ];

    /// Parses a diffusers `UNet2DModel` config.json: diffusers' defaults fill missing keys (and keys set to
    /// null, as diffusers' `__init__` would), keys of other meanings are checked against
    /// [`ACCEPTED_AS_DEFAULT`], and anything else is an error naming the key.
    pub fn from_unet2d_json(text: &str) -> Result<UNetConfig, String> {
        let (raw, _): (DiffusersUNetConfig, _) =
            parse_diffusers_config(text, "UNet2DModel", |k| {
                k == "attention_head_dim" || ACCEPTED_AS_DEFAULT.iter().any(|(n, _)| *n == k)
            })?;
        check_other_keys(&raw.other)?;
        let cfg = UNetConfig {
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
            attention_head_dim: raw.attention_head_dim,
            dropout: raw.dropout,
            act_fn: raw.act_fn,
            center_input_sample: raw.center_input_sample,
            time_embedding_type: raw.time_embedding_type,
            num_class_embeds: raw.num_class_embeds,
            null_class: raw.null_class,
            sr_scale: raw.sr_scale,
            cross_attention: None,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// diffusers' config.json for this model.
    pub fn to_json(&self) -> String {
        if let Some(x) = &self.cross_attention {
            return cond_to_json(self, x);
        }
        let mut v = serde_json::to_value(self).expect("serialize config");
        let o = v.as_object_mut().expect("object");
        o.insert("_class_name".into(), Value::from("UNet2DModel"));
        o.insert("_diffusers_version".into(), Value::from("0.31.0"));
        o.insert("resnet_time_scale_shift".into(), Value::from("default"));
        o.insert("class_embed_type".into(), Value::Null);
        o.insert(
            "num_class_embeds".into(),
            self.num_class_embeds
                .map(Value::from)
                .unwrap_or(Value::Null),
        );
        o.insert("add_attention".into(), Value::from(true));
        o.insert("downsample_type".into(), Value::from("conv"));
        o.insert("upsample_type".into(), Value::from("conv"));
        o.insert("mid_block_type".into(), Value::from("UNetMidBlock2D"));
        serde_json::to_string_pretty(&v).expect("serialize config")
    }

    /// Checks the combination is one this project builds.
    pub fn validate(&self) -> Result<(), String> {
        self.check_blocks()?;
        self.check_sizes()?;
        self.check_conditioning()
    }

    /// The block structure: one down and one up block per level, of the types we build.
    fn check_blocks(&self) -> Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("`block_out_channels` is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "`down_block_types` ({}) and `up_block_types` ({}) must have one entry per `block_out_channels` ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        if let Some(x) = &self.cross_attention {
            check_cross(self, x)?;
        }
        for t in &self.down_block_types {
            if self.cross_attention.is_some() {
                break;
            }
            if t != "DownBlock2D" && t != "AttnDownBlock2D" {
                return Err(format!(
                    "down block type `{t}` is not supported (DownBlock2D, AttnDownBlock2D)"
                ));
            }
        }
        for t in &self.up_block_types {
            if self.cross_attention.is_some() {
                break;
            }
            if t != "UpBlock2D" && t != "AttnUpBlock2D" {
                return Err(format!(
                    "up block type `{t}` is not supported (UpBlock2D, AttnUpBlock2D)"
                ));
            }
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            return Err(format!(
                "`act_fn` = `{}` is not supported (silu)",
                self.act_fn
            ));
        }
        if self.time_embedding_type != "positional" && self.time_embedding_type != "fourier" {
            return Err(format!(
                "`time_embedding_type` = `{}` is not supported (positional, fourier)",
                self.time_embedding_type
            ));
        }
        if self.center_input_sample {
            return Err("`center_input_sample` = true is not supported".into());
        }
        if self.downsample_padding > 1 {
            return Err(format!(
                "`downsample_padding` {} is not supported (0 or 1)",
                self.downsample_padding
            ));
        }
        Ok(())
    }

    /// The multiple each side of an input must be: 2^(levels − 1), so that every downsampling
    /// halves it exactly and the up path comes back to the same size.
    pub fn size_multiple(&self) -> usize {
        1 << (self.block_out_channels.len().max(1) - 1)
    }

    /// An input of `(height, width)` other than the square `sample_size` (sampling at another
    /// size): each side in 1..=MAX_SAMPLE_SIZE and a multiple of [`Self::size_multiple`].
    pub fn check_input_size(&self, (h, w): (usize, usize)) -> Result<(), String> {
        if (h, w) == (self.sample_size, self.sample_size) {
            return Ok(());
        }
        let m = self.size_multiple();
        for (what, v) in [("height", h), ("width", w)] {
            if v == 0 || v > MAX_SAMPLE_SIZE || !v.is_multiple_of(m) {
                return Err(format!(
                    "{what} {v} does not fit the U-Net: it must be a multiple of {m} (its {} levels halve it {} times) up to {MAX_SAMPLE_SIZE}",
                    self.block_out_channels.len(),
                    self.block_out_channels.len() - 1
                ));
            }
        }
        Ok(())
    }

    /// Sizes: within the bounds every later computation assumes, and consistent with each other.
    fn check_sizes(&self) -> Result<(), String> {
        let n = self.block_out_channels.len();
        if self.sample_size == 0
            || !self.sample_size.is_multiple_of(1 << (n - 1)) && self.downsample_padding != 0
        {
            // Odd sizes work with the asymmetric (google/ddpm) padding; diffusers' symmetric
            // padding needs even sizes at every level to upsample back to the same size.
            return Err(format!(
                "`sample_size` {} must be divisible by {} with `downsample_padding` 1",
                self.sample_size,
                1 << (n - 1)
            ));
        }
        // Bounds first: every size below is used in arithmetic and allocations.
        if n > 8 {
            return Err(format!(
                "`block_out_channels` has {n} levels; at most 8 are supported"
            ));
        }
        if !(1..=MAX_CHANNELS).contains(&self.in_channels)
            || !(1..=MAX_CHANNELS).contains(&self.out_channels)
        {
            return Err(format!(
                "`in_channels` ({}) and `out_channels` ({}) must be in 1..={MAX_CHANNELS}",
                self.in_channels, self.out_channels
            ));
        }
        if let Some(&c) = self
            .block_out_channels
            .iter()
            .find(|&&c| !(1..=MAX_CHANNELS).contains(&c))
        {
            return Err(format!(
                "`block_out_channels` entry {c} must be in 1..={MAX_CHANNELS}"
            ));
        }
        if self.sample_size > MAX_SAMPLE_SIZE {
            return Err(format!(
                "`sample_size` {} is above the {MAX_SAMPLE_SIZE} supported",
                self.sample_size
            ));
        }
        if !(1..=16).contains(&self.layers_per_block) {
            return Err(format!(
                "`layers_per_block` must be in 1..=16, is {}",
                self.layers_per_block
            ));
        }
        if self.norm_num_groups == 0 {
            return Err("`norm_num_groups` must be at least 1".into());
        }
        if self.attention_head_dim == Some(0) {
            return Err("`attention_head_dim` must be at least 1".into());
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(format!("`norm_eps` must be > 0, is {}", self.norm_eps));
        }
        if let Some(k) = self.num_class_embeds
            && k > MAX_CLASSES
        {
            return Err(format!(
                "`num_class_embeds` {k} is above the {MAX_CLASSES} supported"
            ));
        }
        for &c in &self.block_out_channels {
            if c % self.norm_num_groups != 0 {
                return Err(format!(
                    "`block_out_channels` {c} is not divisible by `norm_num_groups` {}",
                    self.norm_num_groups
                ));
            }
            if let Some(d) = self.attention_head_dim
                && c % d != 0
            {
                return Err(format!(
                    "channels {c} are not divisible by `attention_head_dim` {d}"
                ));
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("`dropout` {} must be in [0, 1)", self.dropout));
        }
        Ok(())
    }

    /// Class conditioning and super-resolution inputs.
    fn check_conditioning(&self) -> Result<(), String> {
        match (self.num_class_embeds, self.null_class) {
            (Some(0), _) => return Err("`num_class_embeds` must be at least 1".into()),
            (None, Some(_)) => {
                return Err("`_null_class` is set but the model has no `num_class_embeds`".into());
            }
            (Some(k), Some(n)) if n >= k => {
                return Err(format!(
                    "`_null_class` {n} is not a class of `num_class_embeds` {k}"
                ));
            }
            _ => {}
        }
        if let Some(k) = self.sr_scale {
            if k < 2 || !self.sample_size.is_multiple_of(k) {
                return Err(format!(
                    "`_sr_scale` {k} must be at least 2 and divide `sample_size` {}",
                    self.sample_size
                ));
            }
            if self.in_channels != 2 * self.out_channels {
                return Err(format!(
                    "a super-resolution model takes cat([x_t, upsampled LR]): `in_channels` must be 2 × `out_channels` ({}), is {}",
                    self.out_channels, self.in_channels
                ));
            }
        }
        Ok(())
    }

    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * 4
    }

    /// `time_embedding_type = "fourier"` (NCSN++-style, Song et al. 2021): the U-Net takes σ as
    /// its timestep, embeds ln σ with frozen random fourier features and divides its output by σ.
    pub fn is_fourier(&self) -> bool {
        self.time_embedding_type == "fourier"
    }

    /// Width of the time projection feeding `time_embedding.linear_1`: block_out_channels[0],
    /// or twice that for fourier features (sin and cos of each).
    pub fn time_proj_dim(&self) -> usize {
        let c0 = self.block_out_channels[0];
        if self.is_fourier() { 2 * c0 } else { c0 }
    }
}

/// diffusers' config.json for a model with cross-attention.
fn cond_to_json(c: &UNetConfig, x: &CrossAttention) -> String {
    let mut v = serde_json::json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.42.1",
        "sample_size": c.sample_size,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "center_input_sample": c.center_input_sample,
        "flip_sin_to_cos": c.flip_sin_to_cos,
        "freq_shift": c.freq_shift,
        "down_block_types": c.down_block_types,
        "mid_block_type": if x.mid_block { Value::from(MID_BLOCK_CROSS) } else { Value::Null },
        "up_block_types": c.up_block_types,
        "only_cross_attention": false,
        "block_out_channels": c.block_out_channels,
        "layers_per_block": c.layers_per_block,
        "downsample_padding": c.downsample_padding,
        "mid_block_scale_factor": c.mid_block_scale_factor,
        "dropout": c.dropout,
        "act_fn": c.act_fn,
        "norm_num_groups": c.norm_num_groups,
        "norm_eps": c.norm_eps,
        "cross_attention_dim": x.cross_attention_dim,
        "transformer_layers_per_block": x.transformer_layers,
        "attention_head_dim": x.heads,
        "use_linear_projection": x.use_linear_projection,
        "class_embed_type": null,
        "num_class_embeds": c.num_class_embeds,
        "upcast_attention": x.upcast_attention,
        "resnet_time_scale_shift": "default",
        "time_embedding_type": c.time_embedding_type,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "attention_type": "default",
    });
    if let Some(n) = c.null_class {
        v["_null_class"] = Value::from(n);
    }
    serde_json::to_string_pretty(&v).expect("serialize config")
}

/// The block structure of a model with cross-attention: CrossAttn/plain down and up blocks,
/// levels whose channels split into their heads.
fn check_cross(c: &UNetConfig, x: &CrossAttention) -> Result<(), String> {
    let levels = c.block_out_channels.len();
    for (key, types, ok) in [
        (
            "down_block_types",
            &c.down_block_types,
            [CROSS_DOWN, "DownBlock2D"],
        ),
        ("up_block_types", &c.up_block_types, [CROSS_UP, "UpBlock2D"]),
    ] {
        if let Some(t) = types.iter().find(|t| !ok.contains(&t.as_str())) {
            return Err(format!(
                "`{key}` entry `{t}` is not supported in a UNet2DConditionModel ({})",
                ok.join(", ")
            ));
        }
    }
    if x.heads.len() != levels || x.transformer_layers.len() != levels {
        return Err(format!(
            "`attention_head_dim` and `transformer_layers_per_block` need one entry per level ({levels})"
        ));
    }
    if !(1..=MAX_CHANNELS).contains(&x.cross_attention_dim) {
        return Err(format!(
            "`cross_attention_dim` {} is out of range",
            x.cross_attention_dim
        ));
    }
    for (i, (&ch, (&h, &l))) in c
        .block_out_channels
        .iter()
        .zip(x.heads.iter().zip(&x.transformer_layers))
        .enumerate()
    {
        if h == 0 || !ch.is_multiple_of(h) {
            return Err(format!(
                "level {i}: {ch} channels do not split into `attention_head_dim` = {h} heads"
            ));
        }
        if !(1..=16).contains(&l) {
            return Err(format!(
                "level {i}: `transformer_layers_per_block` {l} must be in 1..=16"
            ));
        }
    }
    Ok(())
}

/// `config.json` as diffusers' `UNet2DModel.__init__` reads it: each key with diffusers' default,
/// and every other key in `other` (the unknown-key policy of [`check_other_keys`]).
#[derive(Deserialize)]
struct DiffusersUNetConfig {
    #[serde(default, deserialize_with = "square_sample_size")]
    sample_size: usize,
    #[serde(default = "defaults::channels")]
    in_channels: usize,
    #[serde(default = "defaults::channels")]
    out_channels: usize,
    #[serde(default = "defaults::block_out_channels")]
    block_out_channels: Vec<usize>,
    #[serde(default = "defaults::layers_per_block")]
    layers_per_block: usize,
    #[serde(default = "defaults::down_block_types")]
    down_block_types: Vec<String>,
    #[serde(default = "defaults::up_block_types")]
    up_block_types: Vec<String>,
    #[serde(default = "defaults::norm_num_groups")]
    norm_num_groups: usize,
    #[serde(default = "defaults::norm_eps")]
    norm_eps: f64,
    #[serde(default = "defaults::yes")]
    flip_sin_to_cos: bool,
    #[serde(default)]
    freq_shift: f64,
    #[serde(default = "defaults::downsample_padding")]
    downsample_padding: usize,
    #[serde(default = "defaults::mid_block_scale_factor")]
    mid_block_scale_factor: f64,
    /// Missing: diffusers' 8; null: one head as wide as the channels.
    #[serde(default = "defaults::attention_head_dim")]
    attention_head_dim: Option<usize>,
    #[serde(default)]
    dropout: f64,
    #[serde(default = "defaults::act_fn")]
    act_fn: String,
    #[serde(default)]
    center_input_sample: bool,
    #[serde(default = "defaults::time_embedding_type")]
    time_embedding_type: String,
    #[serde(default)]
    num_class_embeds: Option<usize>,
    #[serde(default, rename = "_null_class")]
    null_class: Option<usize>,
    #[serde(default, rename = "_sr_scale")]
    sr_scale: Option<usize>,
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

/// diffusers 0.42's `UNet2DModel.__init__` defaults.
mod defaults {
    pub fn channels() -> usize {
        3
    }
    pub fn block_out_channels() -> Vec<usize> {
        vec![224, 448, 672, 896]
    }
    pub fn layers_per_block() -> usize {
        2
    }
    pub fn down_block_types() -> Vec<String> {
        [
            "DownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
        ]
        .map(String::from)
        .to_vec()
    }
    pub fn up_block_types() -> Vec<String> {
        [
            "AttnUpBlock2D",
            "AttnUpBlock2D",
            "AttnUpBlock2D",
            "UpBlock2D",
        ]
        .map(String::from)
        .to_vec()
    }
    pub fn norm_num_groups() -> usize {
        32
    }
    pub fn norm_eps() -> f64 {
        1e-5
    }
    pub fn yes() -> bool {
        true
    }
    pub fn downsample_padding() -> usize {
        1
    }
    pub fn mid_block_scale_factor() -> f64 {
        1.0
    }
    pub fn attention_head_dim() -> Option<usize> {
        Some(8)
    }
    pub fn act_fn() -> String {
        "silu".into()
    }
    pub fn time_embedding_type() -> String {
        "positional".into()
    }
}

/// Parses a diffusers `config.json` into `T`, whose serde defaults are diffusers' `__init__`
/// defaults: `_class_name`, when present, must be `class`; a key set to null takes its default,
/// as `__init__` would, unless `null_is_a_value(key)`; a type error names its key. Returns the
/// file's object too (before the nulls were dropped), for keys whose absence matters.
pub(crate) fn parse_diffusers_config<T: serde::de::DeserializeOwned>(
    text: &str,
    class: &str,
    null_is_a_value: impl Fn(&str) -> bool,
) -> Result<(T, serde_json::Map<String, Value>), String> {
    let v: Value =
        serde_json::from_str(text).map_err(|e| format!("config.json is not valid JSON: {e}"))?;
    let Value::Object(original) = v else {
        return Err("config.json must be a JSON object".into());
    };
    if let Some(found) = original.get("_class_name").and_then(|c| c.as_str())
        && found != class
    {
        return Err(format!(
            "config.json describes a `{found}`; only `{class}` is supported here"
        ));
    }
    let mut obj = original.clone();
    obj.retain(|k, val| !val.is_null() || null_is_a_value(k));
    let raw = serde_path_to_error::deserialize(Value::Object(obj)).map_err(|e| {
        let path = e.path().to_string();
        format!("config key `{path}`: {}", e.into_inner())
    })?;
    Ok((raw, original))
}

/// `sample_size` is an integer, or a square `[size, size]` pair (the U-Net's and the VAE's).
pub(crate) fn square_sample_size<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Square(usize),
        Pair(Vec<usize>),
    }
    match Size::deserialize(d)? {
        Size::Square(s) => Ok(s),
        Size::Pair(p) if p.len() == 2 && p[0] == p[1] => Ok(p[0]),
        Size::Pair(p) => Err(serde::de::Error::custom(format!(
            "non-square `sample_size` {p:?} is not supported"
        ))),
    }
}

/// The keys the model does not read: `_`-prefixed bookkeeping is ignored (as diffusers does on
/// load), keys of [`ACCEPTED_AS_DEFAULT`] must hold the one value we build, anything else is an
/// error naming it.
fn check_other_keys(other: &serde_json::Map<String, Value>) -> Result<(), String> {
    for (k, val) in other {
        if k.starts_with('_') {
            continue;
        }
        match ACCEPTED_AS_DEFAULT.iter().find(|(n, _)| n == k) {
            Some((_, None)) => {}
            Some((_, Some(ok))) => {
                let ok_v: Value = serde_json::from_str(ok).expect("static JSON");
                if *val != ok_v {
                    let why = if k == "mid_block_type" && val.is_null() {
                        ": a U-Net without a mid block is not built by wgpu-diffusion"
                    } else {
                        ""
                    };
                    return Err(format!(
                        "config key `{k}` = {val} is not supported (only {ok}){why}"
                    ));
                }
            }
            None => {
                return Err(format!(
                    "config key `{k}` is not supported by wgpu-diffusion's UNet2DModel"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_round_trip_through_json() {
        for name in UNetConfig::PRESETS {
            let c = UNetConfig::preset(name).unwrap();
            c.validate().unwrap();
            assert_eq!(UNetConfig::from_json(&c.to_json()).unwrap(), c);
        }
    }

    /// A config.json that diffusers 0.42.1 wrote with `UNet2DModel.save_pretrained` (its own
    /// defaults: flip_sin_to_cos, freq_shift 0, downsample_padding 1, mid_block_type, …).
    #[test]
    fn diffusers_saved_config_loads() {
        let text = include_str!("../../tests/fixtures/samplers/eps/config.json");
        let c = UNetConfig::from_json(text).unwrap();
        assert_eq!(c.block_out_channels, vec![16, 32]);
        assert!(c.flip_sin_to_cos && c.downsample_padding == 1 && c.attention_head_dim == Some(8));
    }

    #[test]
    fn unsupported_keys_are_named() {
        let mut v: Value =
            serde_json::from_str(&UNetConfig::preset("tiny16").unwrap().to_json()).unwrap();
        v["resnet_time_scale_shift"] = Value::from("scale_shift");
        let e = UNetConfig::from_json(&v.to_string()).unwrap_err();
        assert!(e.contains("resnet_time_scale_shift"), "{e}");
        v["resnet_time_scale_shift"] = Value::from("default");
        v["class_embed_type"] = Value::from("timestep");
        assert!(
            UNetConfig::from_json(&v.to_string())
                .unwrap_err()
                .contains("class_embed_type")
        );
        v["class_embed_type"] = Value::Null;
        v["time_embedding_type"] = Value::from("learned");
        assert!(
            UNetConfig::from_json(&v.to_string())
                .unwrap_err()
                .contains("time_embedding_type")
        );
        v["time_embedding_type"] = Value::from("fourier");
        assert!(UNetConfig::from_json(&v.to_string()).unwrap().is_fourier());
        v["time_embedding_type"] = Value::from("positional");
        v["mid_block_type"] = Value::Null;
        let e = UNetConfig::from_json(&v.to_string()).unwrap_err();
        assert!(
            e.contains("mid_block_type") && e.contains("mid block"),
            "{e}"
        );
        v["mid_block_type"] = Value::from("UNetMidBlock2D");
        v["mystery"] = Value::from(1);
        assert!(
            UNetConfig::from_json(&v.to_string())
                .unwrap_err()
                .contains("mystery")
        );
    }

    #[test]
    fn defaults_nulls_and_bad_types() {
        // An empty object is diffusers' default UNet2DModel but for its (required) size.
        let e = UNetConfig::from_json("{}").unwrap_err();
        assert!(e.contains("sample_size"), "{e}");
        let c =
            UNetConfig::from_json(r#"{"sample_size": [32, 32], "norm_num_groups": null}"#).unwrap();
        assert_eq!(c.block_out_channels, vec![224, 448, 672, 896]);
        assert_eq!(
            (c.in_channels, c.norm_num_groups, c.sample_size),
            (3, 32, 32)
        );
        assert_eq!(c.attention_head_dim, Some(8));
        let c =
            UNetConfig::from_json(r#"{"sample_size": 32, "attention_head_dim": null}"#).unwrap();
        assert_eq!(c.attention_head_dim, None);
        let e =
            UNetConfig::from_json(r#"{"sample_size": 32, "in_channels": "three"}"#).unwrap_err();
        assert!(e.contains("`in_channels`"), "{e}");
        let e = UNetConfig::from_json(r#"{"sample_size": [32, 16]}"#).unwrap_err();
        assert!(e.contains("non-square"), "{e}");
        let e = UNetConfig::from_json(r#"{"sample_size": 32, "block_out_channels": [1, "x"]}"#)
            .unwrap_err();
        assert!(e.contains("block_out_channels"), "{e}");
        let e = UNetConfig::from_json("[1]").unwrap_err();
        assert!(e.contains("object"), "{e}");
    }
}
