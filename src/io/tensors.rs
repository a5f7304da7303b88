//! safetensors files: named f32 tensors serialised out of the parameter store's flat buffers,
//! and files read into memory with their header parsed once (f32, f16 and bf16 loaded as f32).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::nn::{ParamSpec, ParamStore};

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

/// The `__metadata__` of a safetensors file, reading its header only (8-byte little-endian
/// length, then that much JSON): a checkpoint's step, configs and kernel path without reading
/// its tensors. A file too short for the header it announces is an error naming it.
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    use std::io::Read;
    /// safetensors' own bound on the header (100 MB).
    const MAX_HEADER: u64 = 100_000_000;
    let invalid = |what: String| {
        anyhow!(
            "{} is not a valid safetensors file (truncated or corrupt?): {what}",
            path.display()
        )
    };
    let mut file =
        std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| invalid("shorter than the 8-byte header length".into()))?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER {
        return Err(invalid(format!("a header of {n} bytes")));
    }
    let mut header = Vec::with_capacity(n as usize);
    file.take(n)
        .read_to_end(&mut header)
        .with_context(|| format!("reading {}", path.display()))?;
    if header.len() as u64 != n {
        return Err(invalid(format!(
            "the header announces {n} bytes, the file holds {}",
            header.len()
        )));
    }
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| invalid(format!("the header is not JSON: {e}")))?;
    let mut out = HashMap::new();
    if let Some(meta) = json.get("__metadata__") {
        let map = meta
            .as_object()
            .ok_or_else(|| invalid("`__metadata__` is not an object".into()))?;
        for (k, v) in map {
            let v = v
                .as_str()
                .ok_or_else(|| invalid(format!("metadata `{k}` is not a string")))?;
            out.insert(k.clone(), v.to_string());
        }
    }
    Ok(out)
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
            // diffusers checkpoints are sometimes saved in fp16 or bf16; both widen exactly.
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
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
        gather_params(store, &self.path, "does not fit the model", |spec| {
            let name = if prefix.is_empty() {
                spec.name.clone()
            } else {
                format!("{prefix}.{}", spec.name)
            };
            match self.get(&name) {
                Ok((shape, v)) if shape == spec.shape => Ok(v),
                Ok((shape, _)) => Err(format!(
                    "`{name}` has shape {shape:?}, the model expects {:?}",
                    spec.shape
                )),
                Err(_) => Err(format!("`{name}` is missing")),
            }
        })
    }
}

/// One tensor per parameter of `store`, in its flat layout: `lookup` gives a parameter's values
/// or what is wrong with them, and every problem of the file at `path` is named in one error
/// (`{path} {mismatch}:` and a line each).
pub fn gather_params(
    store: &ParamStore,
    path: &Path,
    mismatch: &str,
    mut lookup: impl FnMut(&ParamSpec) -> Result<Vec<f32>, String>,
) -> Result<Vec<f32>> {
    let mut problems = Vec::new();
    let flat = store
        .flatten(|spec| {
            Ok(lookup(spec).unwrap_or_else(|problem| {
                problems.push(problem);
                vec![0.0; spec.numel()]
            }))
        })
        .map_err(|e| anyhow!(e))?;
    if !problems.is_empty() {
        bail!(
            "{} {mismatch}:\n  {}",
            path.display(),
            problems.join("\n  ")
        );
    }
    Ok(flat)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_floats() {
        let dir = std::env::temp_dir().join(format!("wgpu-diffusion-f16-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("h.safetensors");
        // 1.0, -2.0, the smallest subnormal and +inf in IEEE half.
        let h: Vec<u8> = [0x3c00u16, 0xc000, 0x0001, 0x7c00]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let bytes = safetensors::serialize(
            [("h", TensorView::new(Dtype::F16, vec![4], &h).unwrap())],
            None,
        )
        .unwrap();
        std::fs::write(&path, bytes).unwrap();
        let t = LoadedTensors::read(&path).unwrap();
        assert_eq!(
            t.get("h").unwrap().1,
            vec![1.0, -2.0, 2f32.powi(-24), f32::INFINITY]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn metadata_from_the_header_only() {
        let dir = std::env::temp_dir().join(format!("wgpu-diffusion-meta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ck.safetensors");
        let values = [1.0f32; 64];
        let meta = HashMap::from([("step".to_string(), "7".to_string())]);
        let bytes = safetensors::serialize(
            [(
                "w",
                TensorView::new(Dtype::F32, vec![64], bytemuck::cast_slice(&values)).unwrap(),
            )],
            Some(meta.clone()),
        )
        .unwrap();
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_metadata(&path).unwrap(), meta);
        // The tensors cut off: the header is still whole, the metadata still readable (the full
        // reader refuses the file).
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        std::fs::write(&path, &bytes[..header_end + 10]).unwrap();
        assert_eq!(read_metadata(&path).unwrap(), meta);
        assert!(LoadedTensors::read(&path).is_err());
        // The header cut off, or not even its length: errors naming the file.
        for cut in [header_end - 5, 5, 0] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let e = format!("{:#}", read_metadata(&path).unwrap_err());
            assert!(
                e.contains("ck.safetensors") && e.contains("truncated"),
                "{cut}: {e}"
            );
        }
        // A huge announced header is refused before anything is allocated.
        std::fs::write(&path, u64::MAX.to_le_bytes()).unwrap();
        assert!(read_metadata(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
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
