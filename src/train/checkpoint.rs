//! Checkpoints (one safetensors file: parameters, EMA, AdamW moments, and the run state in the
//! header's `__metadata__`) and diffusers model directories (`config.json` +
//! `diffusion_pytorch_model.safetensors` + `scheduler_config.json`). Files are written to a
//! temporary name, synced and renamed, so a crash never leaves a torn file.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::nn::{ParamStore, UNetConfig};

/// Writes `bytes` to `path` atomically (temp file in the same directory, fsync, rename).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Serializes named f32 tensors (split out of flat buffers by the store's layout).
pub fn serialize_named(
    store: &ParamStore,
    groups: &[(&str, &[f32])],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let mut views = Vec::new();
    for (prefix, flat) in groups {
        if flat.len() != store.len {
            bail!(
                "buffer `{prefix}` has {} values, the parameter layout {}",
                flat.len(),
                store.len
            );
        }
        for (spec, values) in store.unflatten(flat) {
            let name = if prefix.is_empty() {
                spec.name.clone()
            } else {
                format!("{prefix}.{}", spec.name)
            };
            views.push((
                name,
                TensorView::new(Dtype::F32, spec.shape.clone(), bytemuck::cast_slice(values))?,
            ));
        }
    }
    Ok(safetensors::serialize(views, Some(metadata))?)
}

/// A safetensors file read into memory, with its header parsed once.
pub struct LoadedTensors {
    pub path: PathBuf,
    bytes: Vec<u8>,
    /// Length of the JSON header (the data starts at 8 + this).
    header_len: usize,
    header: safetensors::tensor::Metadata,
}

impl LoadedTensors {
    pub fn read(path: &Path) -> Result<LoadedTensors> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_bytes(path, bytes)
    }

    /// Checks `bytes` as a safetensors file (`path` names it in errors). The header is bounded
    /// and every offset checked against the bytes' length before anything is allocated from it.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<LoadedTensors> {
        let invalid = |e: safetensors::SafeTensorError| {
            anyhow!(
                "{} is not a valid safetensors file (truncated or corrupt?): {e}",
                path.display()
            )
        };
        // `deserialize` also checks that the data section has exactly the bytes the header
        // describes.
        SafeTensors::deserialize(&bytes).map_err(invalid)?;
        let (header_len, header) = SafeTensors::read_metadata(&bytes).map_err(invalid)?;
        Ok(LoadedTensors {
            path: path.to_path_buf(),
            bytes,
            header_len,
            header,
        })
    }
    pub fn metadata(&self) -> HashMap<String, String> {
        self.header.metadata().clone().unwrap_or_default()
    }
    pub fn names(&self) -> Vec<String> {
        self.header.offset_keys()
    }
    /// The f32 values and shape of `name`.
    pub fn get(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self
            .header
            .info(name)
            .ok_or_else(|| anyhow!("{}: tensor `{name}` is missing", self.path.display()))?;
        let start = 8 + self.header_len;
        let (a, b) = info.data_offsets;
        // Validated against the buffer when the file was read.
        let data = &self.bytes[start + a..start + b];
        let values: Vec<f32> = match info.dtype {
            Dtype::F32 => bytemuck::pod_collect_to_vec(data),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            // bfloat16 is the top half of an f32: the conversion is exact.
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
                .collect(),
            d => bail!(
                "{}: tensor `{name}` has dtype {d:?}; F32, F16 or BF16 expected",
                self.path.display()
            ),
        };
        Ok((info.shape.clone(), values))
    }

    /// Gathers `prefix.<param name>` for every parameter of `store` into the flat layout; every
    /// missing or mis-shaped tensor is named in the error.
    pub fn flat(&self, store: &ParamStore, prefix: &str) -> Result<Vec<f32>> {
        let mut problems = Vec::new();
        let flat = store.flatten(|spec| {
            let name = if prefix.is_empty() {
                spec.name.clone()
            } else {
                format!("{prefix}.{}", spec.name)
            };
            match self.get(&name) {
                Ok((shape, v)) if shape == spec.shape => Ok(v),
                Ok((shape, _)) => {
                    problems.push(format!(
                        "`{name}` has shape {shape:?}, the model expects {:?}",
                        spec.shape
                    ));
                    Ok(vec![0.0; spec.numel()])
                }
                Err(_) => {
                    problems.push(format!("`{name}` is missing"));
                    Ok(vec![0.0; spec.numel()])
                }
            }
        });
        let flat = flat.map_err(|e| anyhow!(e))?;
        if !problems.is_empty() {
            bail!(
                "{} does not fit the model:\n  {}",
                self.path.display(),
                problems.join("\n  ")
            );
        }
        Ok(flat)
    }
}

/// IEEE half → f32 (diffusers checkpoints are sometimes saved in fp16).
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // subnormal: normalise
            let mut e = 127 - 15 + 1;
            let mut f = f;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((f & 0x3ff) << 13)
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

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

/// Writes a diffusers model directory with the weights given (diffusers' names): `config.json`,
/// `diffusion_pytorch_model.safetensors` and `scheduler_config.json` at the top
/// (`UNet2DModel.from_pretrained(dir)`), and the pipeline layout beside them — `model_index.json`,
/// `unet/`, `scheduler/` — so `DDPMPipeline.from_pretrained(dir)` loads it too; `extra` files
/// (e.g. `class_names.json`) go beside them. The `unet/` weights are a hard link to the top-level
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
    let index = serde_json::json!({
        "_class_name": "DDPMPipeline",
        "_diffusers_version": "0.31.0",
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"]
    });
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

pub fn read_model_weights(dir: &Path, store: &ParamStore) -> Result<Vec<f32>> {
    model_weights(&LoadedTensors::read(&dir.join(MODEL_WEIGHTS))?, store)
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
    let mut problems = Vec::new();
    let flat = store
        .flatten(|spec| match renamed.get(&spec.name) {
            None => {
                problems.push(format!("`{}` is missing", spec.name));
                Ok(vec![0.0; spec.numel()])
            }
            Some(file_name) => {
                let (shape, v) = loaded.get(file_name).map_err(|e| e.to_string())?;
                // Old checkpoints store attention projections as 1x1 convs [C, C, 1, 1].
                if shape.iter().product::<usize>() == spec.numel()
                    && shape
                        .iter()
                        .filter(|&&d| d != 1)
                        .eq(spec.shape.iter().filter(|&&d| d != 1))
                {
                    Ok(v)
                } else {
                    problems.push(format!(
                        "`{}` has shape {shape:?}, the model expects {:?}",
                        file_name, spec.shape
                    ));
                    Ok(vec![0.0; spec.numel()])
                }
            }
        })
        .map_err(|e| anyhow!(e))?;
    if !problems.is_empty() {
        bail!(
            "{} does not fit its config:\n  {}",
            loaded.path.display(),
            problems.join("\n  ")
        );
    }
    Ok(flat)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_floats_and_legacy_names() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
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

    #[test]
    fn bf16_loads_exactly_and_other_dtypes_are_named() {
        let dir = std::env::temp_dir().join(format!("wgpu-diffusion-bf16-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.safetensors");
        // 1.0, -2.5, 3.140625 in bfloat16.
        let bf: Vec<u8> = [0x3f80u16, 0xc020, 0x4049]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let ints = [7u8, 0, 0, 0];
        let bytes = safetensors::serialize(
            [
                ("w", TensorView::new(Dtype::BF16, vec![3], &bf).unwrap()),
                ("i", TensorView::new(Dtype::I32, vec![1], &ints).unwrap()),
            ],
            None,
        )
        .unwrap();
        std::fs::write(&path, bytes).unwrap();
        let t = LoadedTensors::read(&path).unwrap();
        assert_eq!(t.get("w").unwrap().1, vec![1.0, -2.5, 3.140625]);
        let e = t.get("i").unwrap_err().to_string();
        assert!(e.contains("I32") && e.contains("BF16 expected"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
