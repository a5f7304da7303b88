//! diffusers model directories (`config.json` + `diffusion_pytorch_model.safetensors` +
//! `scheduler_config.json`, and the pipeline layout beside them): written whole under a
//! temporary name and renamed into place; read with every unknown, missing or mis-shaped tensor
//! named.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use super::atomic::atomic_write;
use super::tensors::{LoadedTensors, gather_params, serialize_named};
use crate::nn::{ParamStore, UNetConfig};

/// The file beside a class-conditional model's config.json that names its classes: a JSON list
/// of names, by class index.
pub const CLASS_NAMES: &str = "class_names.json";

/// Older diffusers attention parameter names (`query`, `key`, `value`, `proj_attn`) → current.
pub fn modern_name(name: &str) -> String {
    for (old, new) in [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ] {
        if name.contains(old) {
            return name.replacen(old, new, 1);
        }
    }
    name.to_string()
}

pub const MODEL_WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

/// `model_index.json`'s class of a pixel-space text-to-image model we export (diffusers has
/// no such pipeline; its U-Net, text encoder, tokenizer and scheduler load one by one).
pub const TEXT_PIPELINE: &str = "WgpuDiffusionTextPipeline";

/// Writes a diffusers model directory with the weights given (diffusers' names): `config.json`,
/// `diffusion_pytorch_model.safetensors` and `scheduler_config.json` at the top
/// (`UNet2DModel.from_pretrained(dir)`), and the pipeline layout beside them — `model_index.json`,
/// `unet/`, `scheduler/` — so `DDPMPipeline.from_pretrained(dir)` loads it too; `extra` files
/// (e.g. `class_names.json`; a latent model's `vae/config.json` and weights, which make the
/// index list the VAE) go beside them. The `unet/` weights are a hard link to the top-level
/// file where the file system allows it.
///
/// The directory is written whole under a temporary name and renamed into place, so a kill
/// never leaves files of two different steps side by side.
pub fn save_model_dir(
    dir: &Path,
    config: &UNetConfig,
    store: &ParamStore,
    weights: &[f32],
    scheduler_json: &str,
    extra: &[(&str, &[u8])],
) -> Result<()> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model")
        .to_string();
    let tmp = parent.join(format!(".{name}.tmp"));
    let old = parent.join(format!(".{name}.old.tmp"));
    for leftover in [&tmp, &old] {
        if leftover.exists() {
            std::fs::remove_dir_all(leftover)
                .with_context(|| format!("removing {}", leftover.display()))?;
        }
    }
    write_model_files(&tmp, config, store, weights, scheduler_json, extra)?;
    if dir.exists() {
        std::fs::rename(dir, &old).with_context(|| format!("moving {} aside", dir.display()))?;
    }
    std::fs::rename(&tmp, dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
    if old.exists() {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

fn write_model_files(
    dir: &Path,
    config: &UNetConfig,
    store: &ParamStore,
    weights: &[f32],
    scheduler_json: &str,
    extra: &[(&str, &[u8])],
) -> Result<()> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let bytes = serialize_named(store, &[("", weights)], meta)?;
    let config_json = config.to_json();
    atomic_write(&dir.join(MODEL_WEIGHTS), &bytes)?;
    atomic_write(&dir.join("config.json"), config_json.as_bytes())?;
    atomic_write(
        &dir.join("scheduler_config.json"),
        scheduler_json.as_bytes(),
    )?;
    let unet = dir.join("unet");
    std::fs::create_dir_all(&unet).with_context(|| format!("creating {}", unet.display()))?;
    let linked = unet.join(MODEL_WEIGHTS);
    if std::fs::hard_link(dir.join(MODEL_WEIGHTS), &linked).is_err() {
        atomic_write(&linked, &bytes)?;
    }
    atomic_write(&unet.join("config.json"), config_json.as_bytes())?;
    atomic_write(
        &dir.join("scheduler").join("scheduler_config.json"),
        scheduler_json.as_bytes(),
    )?;
    let scheduler_class = serde_json::from_str::<serde_json::Value>(scheduler_json)
        .ok()
        .and_then(|v| v.get("_class_name")?.as_str().map(str::to_string))
        .unwrap_or_else(|| "DDPMScheduler".to_string());
    let mut index = serde_json::json!({
        "_class_name": "DDPMPipeline",
        "_diffusers_version": "0.31.0",
        "scheduler": ["diffusers", scheduler_class],
        "unet": ["diffusers", "UNet2DModel"]
    });
    if scheduler_class != "DDPMScheduler" {
        // An EDM model: DDPMPipeline neither preconditions the input nor passes σ, so the
        // index names ours; the U-Net and EDMEulerScheduler load in diffusers on their own.
        index["_class_name"] = "WgpuDiffusionEDMPipeline".into();
    }
    let has = |dir: &str| extra.iter().any(|(name, _)| name.starts_with(dir));
    if config.cross_attention.is_some() {
        index["unet"] = serde_json::json!(["diffusers", "UNet2DConditionModel"]);
    }
    if has("text_encoder/") {
        // Text to image: with a VAE, Stable Diffusion's own pipeline (no safety checker);
        // in pixel space ours, whose components load in diffusers/transformers one by one.
        index["_class_name"] = TEXT_PIPELINE.into();
        index["text_encoder"] = serde_json::json!(["transformers", "CLIPTextModel"]);
        index["tokenizer"] = serde_json::json!(["transformers", "CLIPTokenizer"]);
        if has("vae/") {
            index["_class_name"] = "StableDiffusionPipeline".into();
            index["vae"] = serde_json::json!(["diffusers", "AutoencoderKL"]);
            index["safety_checker"] = serde_json::json!([null, null]);
            index["feature_extractor"] = serde_json::json!([null, null]);
            index["image_encoder"] = serde_json::json!([null, null]);
            index["requires_safety_checker"] = false.into();
        }
    } else if has("vae/") {
        // A latent diffusion model: diffusers has no unconditional AutoencoderKL + UNet2DModel
        // pipeline (LDMPipeline takes a VQModel), so the index names ours; each component
        // loads in diffusers on its own (UNet2DModel / AutoencoderKL / DDPMScheduler).
        index["_class_name"] = "WgpuDiffusionLatentPipeline".into();
        index["vae"] = serde_json::json!(["diffusers", "AutoencoderKL"]);
    }
    atomic_write(
        &dir.join("model_index.json"),
        serde_json::to_string_pretty(&index)?.as_bytes(),
    )?;
    for (name, bytes) in extra {
        atomic_write(&dir.join(name), bytes)?;
    }
    Ok(())
}

/// Reads a diffusers model directory: its config and weights in `store`'s flat layout (built by
/// the caller from that config). Unknown, missing or mis-shaped tensors are errors naming them.
pub fn read_model_config(dir: &Path) -> Result<UNetConfig> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("reading {}", cfg_path.display()))?;
    UNetConfig::from_json(&text).map_err(|e| anyhow!("{}: {e}", cfg_path.display()))
}

/// Weight-file variants diffusers writes with `save_pretrained(..., variant=…)`, in the order
/// they are looked for when `diffusion_pytorch_model.safetensors` itself is absent.
pub const WEIGHT_VARIANTS: [&str; 3] = ["fp16", "bf16", "fp32"];

/// The weights file of a diffusers model directory and, when it is a variant
/// (`diffusion_pytorch_model.fp16.safetensors`, what `variant="fp16"` writes), its name: the
/// plain file first, then the variants of [`WEIGHT_VARIANTS`]. None when there is neither.
pub fn weights_file(dir: &Path) -> Option<(PathBuf, Option<&'static str>)> {
    let plain = dir.join(MODEL_WEIGHTS);
    if plain.is_file() {
        return Some((plain, None));
    }
    WEIGHT_VARIANTS.iter().find_map(|v| {
        let p = dir.join(format!("diffusion_pytorch_model.{v}.safetensors"));
        p.is_file().then_some((p, Some(*v)))
    })
}

/// The weights of a model directory (its plain or variant file, see [`weights_file`]) in
/// `store`'s flat layout; half-precision tensors widen to f32 exactly.
pub fn read_model_weights(dir: &Path, store: &ParamStore) -> Result<Vec<f32>> {
    let (path, _) = weights_file(dir).ok_or_else(|| {
        anyhow!(
            "{}: {MODEL_WEIGHTS} is missing (nor is there an fp16/bf16 variant of it)",
            dir.display()
        )
    })?;
    model_weights(&LoadedTensors::read(&path)?, store)
}

/// The weights of a diffusers model file in `store`'s flat layout (legacy attention names and
/// 1x1-conv attention shapes accepted); every unknown, missing or mis-shaped tensor is named.
pub fn model_weights(loaded: &LoadedTensors, store: &ParamStore) -> Result<Vec<f32>> {
    let names = loaded.names();
    let mut renamed: HashMap<String, String> = HashMap::new();
    let mut unknown = Vec::new();
    for n in &names {
        let m = modern_name(n);
        if store.spec(&m).is_none() {
            unknown.push(n.clone());
        }
        renamed.insert(m, n.clone());
    }
    if !unknown.is_empty() {
        unknown.sort();
        bail!(
            "{}: tensors the model does not have: {}",
            loaded.path.display(),
            unknown.join(", ")
        );
    }
    gather_params(store, &loaded.path, "does not fit its config", |spec| {
        let file_name = renamed
            .get(&spec.name)
            .ok_or_else(|| format!("`{}` is missing", spec.name))?;
        let (shape, v) = loaded.get(file_name).map_err(|e| e.to_string())?;
        // Old checkpoints store attention projections as 1x1 convs [C, C, 1, 1].
        let same_but_unit_dims = shape.iter().product::<usize>() == spec.numel()
            && shape
                .iter()
                .filter(|&&d| d != 1)
                .eq(spec.shape.iter().filter(|&&d| d != 1));
        if same_but_unit_dims {
            Ok(v)
        } else {
            Err(format!(
                "`{file_name}` has shape {shape:?}, the model expects {:?}",
                spec.shape
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::modern_name;

    #[test]
    fn legacy_attention_names() {
        assert_eq!(
            modern_name("mid_block.attentions.0.query.weight"),
            "mid_block.attentions.0.to_q.weight"
        );
        assert_eq!(
            modern_name("up_blocks.0.attentions.1.proj_attn.bias"),
            "up_blocks.0.attentions.1.to_out.0.bias"
        );
        assert_eq!(modern_name("conv_in.weight"), "conv_in.weight");
    }
}
