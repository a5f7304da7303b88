//! `VaeConfig`: diffusers 0.42's `AutoencoderKL` config.json (`models/autoencoders/
//! autoencoder_kl.py`), every `__init__` key with diffusers' default, read and written with
//! diffusers' own keys. As for the U-Net, a key or value that would change the model and that we do
//! not build is an error naming it, never silently ignored.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::config::{MAX_CHANNELS, MAX_SAMPLE_SIZE, parse_diffusers_config, square_sample_size};

/// diffusers' `AutoencoderKL` default `scaling_factor` (Stable Diffusion 1.x's VAE).
pub const DEFAULT_SCALING_FACTOR: f64 = 0.18215;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block; each decoder block has one more (diffusers' Decoder).
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: usize,
    /// Latents are `encode(x).sample() · scaling_factor` (Rombach et al. 2022, §4.3 and
    /// appendix G: scale_by_std) and decoded from `z / scaling_factor`.
    pub scaling_factor: f64,
    /// Subtracted before scaling (SD3, Flux); null for SD 1.x and for the VAEs we train.
    pub shift_factor: Option<f64>,
    /// Per-channel latent statistics some pipelines normalise with (kept, not used here).
    pub latents_mean: Option<Vec<f64>>,
    pub latents_std: Option<Vec<f64>>,
    /// diffusers runs such a VAE in f32 under fp16 pipelines; kept for the round trip.
    pub force_upcast: bool,
    /// The 1×1 convs between the encoder and the posterior, and the latent and the decoder.
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    /// The mid blocks' attention (resnet – attention – resnet, or resnet – resnet).
    pub mid_block_add_attention: bool,
    /// The config.json had no `scaling_factor` and took diffusers' default: worth a warning, since
    /// latents scaled by another VAE's factor are off by that ratio.
    #[serde(skip)]
    pub scaling_factor_defaulted: bool,
}

impl VaeConfig {
    /// `mnist-vae`: 1×32×32 (MNIST padded by 2 on each side) to 4×8×8 latents.
    pub fn preset(name: &str) -> Option<VaeConfig> {
        match name {
            "mnist-vae" => Some(VaeConfig {
                in_channels: 1,
                out_channels: 1,
                down_block_types: vec!["DownEncoderBlock2D".into(); 3],
                up_block_types: vec!["UpDecoderBlock2D".into(); 3],
                block_out_channels: vec![32, 64, 64],
                layers_per_block: 1,
                act_fn: "silu".into(),
                latent_channels: 4,
                norm_num_groups: 32,
                sample_size: 32,
                scaling_factor: DEFAULT_SCALING_FACTOR,
                shift_factor: None,
                latents_mean: None,
                latents_std: None,
                force_upcast: true,
                use_quant_conv: true,
                use_post_quant_conv: true,
                mid_block_add_attention: true,
                scaling_factor_defaulted: false,
            }),
            _ => None,
        }
    }

    pub const PRESETS: [&'static str; 1] = ["mnist-vae"];

    /// The latent's side: the encoder halves the image at every block but the last.
    pub fn latent_size(&self) -> usize {
        self.sample_size >> (self.block_out_channels.len() - 1)
    }

    /// How many image pixels a latent pixel spans along each side: 2^(levels − 1) (8 for SD's).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len().max(1) - 1)
    }

    /// The most values one of the decoder's activations holds per image of `(h, w)`: up-block
    /// i works at 2^i × the latents' size with the i-th of the reversed block channels, and
    /// its upsampler (all but the last block's) doubles that size.
    pub fn largest_decoder_activation(&self, (h, w): (usize, usize)) -> usize {
        let levels = self.block_out_channels.len();
        let (lh, lw) = (h / self.downscale(), w / self.downscale());
        self.block_out_channels
            .iter()
            .rev()
            .enumerate()
            .map(|(i, &c)| {
                let up = if i + 1 < levels { 2 } else { 1 };
                (lh << i) * (lw << i) * c * up * up
            })
            .max()
            .unwrap_or(0)
    }

    /// Images of `(height, width)` other than the square `sample_size`: each side in
    /// 1..=MAX_SAMPLE_SIZE and a multiple of [`Self::downscale`].
    pub fn check_image_size(&self, (h, w): (usize, usize)) -> Result<(), String> {
        if (h, w) == (self.sample_size, self.sample_size) {
            return Ok(());
        }
        let m = self.downscale();
        for (what, v) in [("height", h), ("width", w)] {
            if v == 0 || v > MAX_SAMPLE_SIZE || !v.is_multiple_of(m) {
                return Err(format!(
                    "{what} {v} does not fit the VAE: it must be a multiple of {m} (its encoder halves it {} times) up to {MAX_SAMPLE_SIZE}",
                    self.block_out_channels.len() - 1
                ));
            }
        }
        Ok(())
    }

    /// Parses a diffusers AutoencoderKL `config.json`: missing keys (and keys set to null where
    /// null is not a value of its own) take diffusers' defaults; `_`-prefixed keys are ignored, as
    /// diffusers ignores them; anything else unknown is an error naming the key.
    pub fn from_json(text: &str) -> Result<VaeConfig, String> {
        const NULLABLE: [&str; 3] = ["shift_factor", "latents_mean", "latents_std"];
        let (raw, original): (DiffusersVaeConfig, _) =
            parse_diffusers_config(text, "AutoencoderKL", |k| NULLABLE.contains(&k))?;
        let defaulted = original.get("scaling_factor").is_none_or(Value::is_null);
        if let Some(k) = raw.other.keys().find(|k| !k.starts_with('_')) {
            return Err(format!(
                "config key `{k}` is not supported by wgpu-diffusion's AutoencoderKL"
            ));
        }
        let cfg = VaeConfig {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            down_block_types: raw.down_block_types,
            up_block_types: raw.up_block_types,
            block_out_channels: raw.block_out_channels,
            layers_per_block: raw.layers_per_block,
            act_fn: raw.act_fn,
            latent_channels: raw.latent_channels,
            norm_num_groups: raw.norm_num_groups,
            sample_size: raw.sample_size,
            scaling_factor: raw.scaling_factor,
            shift_factor: raw.shift_factor,
            latents_mean: raw.latents_mean,
            latents_std: raw.latents_std,
            force_upcast: raw.force_upcast,
            use_quant_conv: raw.use_quant_conv,
            use_post_quant_conv: raw.use_post_quant_conv,
            mid_block_add_attention: raw.mid_block_add_attention,
            scaling_factor_defaulted: defaulted,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// diffusers' config.json for this VAE.
    pub fn to_json(&self) -> String {
        let mut v = serde_json::to_value(self).expect("serialize config");
        let o = v.as_object_mut().expect("object");
        o.insert("_class_name".into(), Value::from("AutoencoderKL"));
        o.insert("_diffusers_version".into(), Value::from("0.42.1"));
        serde_json::to_string_pretty(&v).expect("serialize config")
    }

    /// Checks the combination is one this project builds.
    pub fn validate(&self) -> Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 || n > 8 {
            return Err(format!(
                "`block_out_channels` has {n} levels; 1 to 8 are supported"
            ));
        }
        for (key, types, want) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if types.len() != n {
                return Err(format!(
                    "`{key}` has {} entries, `block_out_channels` {n}: one block per level",
                    types.len()
                ));
            }
            if let Some(t) = types.iter().find(|t| *t != want) {
                return Err(format!(
                    "{key}: block type `{t}` is not supported by wgpu-diffusion's AutoencoderKL (only {want})"
                ));
            }
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            return Err(format!(
                "`act_fn` = `{}` is not supported (silu)",
                self.act_fn
            ));
        }
        let channels = [self.in_channels, self.out_channels, self.latent_channels];
        if channels.iter().any(|c| !(1..=MAX_CHANNELS).contains(c)) {
            return Err(format!(
                "`in_channels`, `out_channels` and `latent_channels` ({channels:?}) must be in 1..={MAX_CHANNELS}"
            ));
        }
        if self.norm_num_groups == 0 {
            return Err("`norm_num_groups` must be at least 1".into());
        }
        for &c in &self.block_out_channels {
            if !(1..=MAX_CHANNELS).contains(&c) || c % self.norm_num_groups != 0 {
                return Err(format!(
                    "`block_out_channels` entry {c} must be in 1..={MAX_CHANNELS} and divisible by `norm_num_groups` {}",
                    self.norm_num_groups
                ));
            }
        }
        if !(1..=16).contains(&self.layers_per_block) {
            return Err(format!(
                "`layers_per_block` must be in 1..=16, is {}",
                self.layers_per_block
            ));
        }
        let fold = 1usize << (n - 1);
        if self.sample_size == 0
            || self.sample_size > MAX_SAMPLE_SIZE
            || !self.sample_size.is_multiple_of(fold)
        {
            return Err(format!(
                "`sample_size` {} must be in 1..={MAX_SAMPLE_SIZE} and divisible by {fold} (the encoder halves it {} times)",
                self.sample_size,
                n - 1
            ));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return Err(format!(
                "`scaling_factor` must be a finite number > 0, is {}",
                self.scaling_factor
            ));
        }
        if self.shift_factor.is_some_and(|s| !s.is_finite()) {
            return Err("`shift_factor` must be finite or null".into());
        }
        for (key, stats) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if let Some(s) = stats
                && s.len() != self.latent_channels
            {
                return Err(format!(
                    "`{key}` has {} values for {} latent channels",
                    s.len(),
                    self.latent_channels
                ));
            }
        }
        Ok(())
    }
}

/// `config.json` as `AutoencoderKL.__init__` reads it: each key with diffusers 0.42's default,
/// every other key in `other`.
#[derive(Deserialize)]
struct DiffusersVaeConfig {
    #[serde(default = "defaults::channels")]
    in_channels: usize,
    #[serde(default = "defaults::channels")]
    out_channels: usize,
    #[serde(default = "defaults::down_block_types")]
    down_block_types: Vec<String>,
    #[serde(default = "defaults::up_block_types")]
    up_block_types: Vec<String>,
    #[serde(default = "defaults::block_out_channels")]
    block_out_channels: Vec<usize>,
    #[serde(default = "defaults::one")]
    layers_per_block: usize,
    #[serde(default = "defaults::act_fn")]
    act_fn: String,
    #[serde(default = "defaults::latent_channels")]
    latent_channels: usize,
    #[serde(default = "defaults::norm_num_groups")]
    norm_num_groups: usize,
    #[serde(
        default = "defaults::sample_size",
        deserialize_with = "square_sample_size"
    )]
    sample_size: usize,
    #[serde(default = "defaults::scaling_factor")]
    scaling_factor: f64,
    #[serde(default)]
    shift_factor: Option<f64>,
    #[serde(default)]
    latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    latents_std: Option<Vec<f64>>,
    #[serde(default = "defaults::yes")]
    force_upcast: bool,
    #[serde(default = "defaults::yes")]
    use_quant_conv: bool,
    #[serde(default = "defaults::yes")]
    use_post_quant_conv: bool,
    #[serde(default = "defaults::yes")]
    mid_block_add_attention: bool,
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

/// diffusers 0.42's `AutoencoderKL.__init__` defaults.
mod defaults {
    pub fn channels() -> usize {
        3
    }
    pub fn down_block_types() -> Vec<String> {
        vec!["DownEncoderBlock2D".into()]
    }
    pub fn up_block_types() -> Vec<String> {
        vec!["UpDecoderBlock2D".into()]
    }
    pub fn block_out_channels() -> Vec<usize> {
        vec![64]
    }
    pub fn one() -> usize {
        1
    }
    pub fn act_fn() -> String {
        "silu".into()
    }
    pub fn latent_channels() -> usize {
        4
    }
    pub fn norm_num_groups() -> usize {
        32
    }
    pub fn sample_size() -> usize {
        32
    }
    pub fn scaling_factor() -> f64 {
        super::DEFAULT_SCALING_FACTOR
    }
    pub fn yes() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys diffusers' `AutoencoderKL.__init__` writes, as Stable Diffusion 1.x's VAE has
    /// them (block_out_channels [128, 256, 512, 512], 4 latent channels, scaling_factor 0.18215).
    const SD_VAE: &str = r#"{
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1",
        "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D",
                             "DownEncoderBlock2D"],
        "force_upcast": true, "in_channels": 3, "latent_channels": 4, "latents_mean": null,
        "latents_std": null, "layers_per_block": 2, "mid_block_add_attention": true,
        "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
        "scaling_factor": 0.18215, "shift_factor": null,
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D",
                           "UpDecoderBlock2D"],
        "use_post_quant_conv": true, "use_quant_conv": true
    }"#;

    #[test]
    fn stable_diffusions_vae_config_loads_and_round_trips() {
        let c = VaeConfig::from_json(SD_VAE).unwrap();
        assert_eq!(c.block_out_channels, vec![128, 256, 512, 512]);
        assert_eq!((c.latent_size(), c.layers_per_block), (64, 2));
        assert!(!c.scaling_factor_defaulted);
        assert_eq!(VaeConfig::from_json(&c.to_json()).unwrap(), c);
        let p = VaeConfig::preset("mnist-vae").unwrap();
        assert_eq!(VaeConfig::from_json(&p.to_json()).unwrap(), p);
        assert_eq!(p.latent_size(), 8);
    }

    #[test]
    fn defaults_and_the_missing_scaling_factor() {
        let c = VaeConfig::from_json("{}").unwrap();
        assert_eq!(
            (c.in_channels, c.sample_size, c.latent_channels),
            (3, 32, 4)
        );
        assert_eq!(c.scaling_factor, DEFAULT_SCALING_FACTOR);
        assert!(c.scaling_factor_defaulted);
    }

    #[test]
    fn unsupported_keys_and_values_are_named() {
        let mut v: Value = serde_json::from_str(SD_VAE).unwrap();
        v["down_block_types"][1] = Value::from("AttnDownEncoderBlock2D");
        let e = VaeConfig::from_json(&v.to_string()).unwrap_err();
        assert!(e.contains("AttnDownEncoderBlock2D"), "{e}");
        let mut v: Value = serde_json::from_str(SD_VAE).unwrap();
        v["mystery"] = Value::from(1);
        let e = VaeConfig::from_json(&v.to_string()).unwrap_err();
        assert!(e.contains("mystery"), "{e}");
        let mut v: Value = serde_json::from_str(SD_VAE).unwrap();
        v["latent_channels"] = Value::from("four");
        let e = VaeConfig::from_json(&v.to_string()).unwrap_err();
        assert!(e.contains("`latent_channels`"), "{e}");
        let mut v: Value = serde_json::from_str(SD_VAE).unwrap();
        v["_class_name"] = Value::from("VQModel");
        let e = VaeConfig::from_json(&v.to_string()).unwrap_err();
        assert!(e.contains("VQModel"), "{e}");
        let mut v: Value = serde_json::from_str(SD_VAE).unwrap();
        v["sample_size"] = Value::from(100);
        let e = VaeConfig::from_json(&v.to_string()).unwrap_err();
        assert!(e.contains("divisible by 8"), "{e}");
    }
}
