//! Where a model comes from — one way for `sample` and `train --init`: a diffusers model
//! directory (`config.json` + `diffusion_pytorch_model.safetensors`, with a
//! `scheduler_config.json` beside it or none), a diffusers pipeline directory (`unet/` +
//! `scheduler/`), one of our run folders (its `model/`), or one of our checkpoints.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};

use crate::diffusion::scheduler::SchedulerConfig;
use crate::diffusion::{BetaSchedule, NoiseSchedule, PredictionType};
use crate::io::model_dir::{CLASS_NAMES, MODEL_WEIGHTS, read_model_weights, weights_file};
use crate::io::tensors::LoadedTensors;
use crate::nn::{ParamStore, UNetConfig};
use crate::sample::{LatentVae, TextConditioning};

enum Weights {
    /// A diffusers directory holding `diffusion_pytorch_model.safetensors`.
    Dir(PathBuf),
    /// A checkpoint's tensors under `prefix.` (`ema` or `param`).
    Checkpoint(Arc<LoadedTensors>, &'static str),
}

/// A model's architecture, its scheduler settings, and where its weights are.
pub struct ModelSource {
    pub config: UNetConfig,
    pub scheduler: SchedulerConfig,
    /// Where the scheduler settings came from (a path, or the DDPMScheduler defaults).
    pub scheduler_origin: String,
    /// What was loaded, for messages: the directory or checkpoint and which weights.
    pub description: String,
    /// Notes for the user (e.g. "trained without EMA: using the raw weights").
    pub notes: Vec<String>,
    /// Class names by index (`class_names.json` of a class-conditional model; may be empty).
    pub class_names: Vec<String>,
    /// Latent diffusion: the VAE that decodes the U-Net's samples (`vae/` beside the U-Net, the
    /// run folder's `vae/` of a checkpoint, or `sample --vae`).
    pub vae: Option<LatentVae>,
    /// The U-Net was trained on a VAE's latents (a checkpoint's metadata says so): sampling
    /// needs a VAE, found or given.
    pub latent: bool,
    /// A Stable Diffusion pipeline's text encoder and tokenizer (beside its `unet/`).
    pub text: Option<TextConditioning>,
    weights: Weights,
}

/// Reads `class_names.json` (a JSON list of names, by class index), if there is one.
fn read_class_names(path: &Path) -> Result<Option<Vec<String>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let names: Vec<String> = serde_json::from_str(&text).map_err(|e| {
        anyhow!(
            "{}: expected a JSON list of class names: {e}",
            path.display()
        )
    })?;
    Ok(Some(names))
}

/// The scheduler and whether the run kept an EMA, from a checkpoint's metadata: the
/// `scheduler_config` and `ema` it records, or, in checkpoints written before those keys, the
/// schedule fields of its `train_config` (read here field by field, so sampling needs nothing of
/// `train`).
fn checkpoint_scheduler(
    meta: &std::collections::HashMap<String, String>,
) -> Result<(SchedulerConfig, bool)> {
    if let Some(json) = meta.get("scheduler_config") {
        let scheduler =
            SchedulerConfig::from_json(json).map_err(|e| anyhow!("scheduler_config: {e}"))?;
        let ema = match meta.get("ema").map(String::as_str) {
            Some("true") | None => true,
            Some("false") => false,
            Some(other) => bail!("metadata `ema` is `{other}`, true or false expected"),
        };
        return Ok((scheduler, ema));
    }
    #[derive(serde::Deserialize)]
    struct ScheduleFields {
        beta_schedule: BetaSchedule,
        num_train_timesteps: usize,
        beta_start: f64,
        beta_end: f64,
        prediction_type: PredictionType,
        ema: bool,
    }
    let text = meta
        .get("train_config")
        .ok_or_else(|| anyhow!("no `scheduler_config` nor `train_config` in its metadata"))?;
    let f: ScheduleFields = toml::from_str(text).map_err(|e| anyhow!("train_config: {e}"))?;
    let schedule = NoiseSchedule::new(
        f.beta_schedule,
        f.num_train_timesteps,
        f.beta_start,
        f.beta_end,
    )
    .map_err(|e| anyhow!(e))?;
    let scheduler =
        SchedulerConfig::from_json(&schedule.scheduler_config_json(f.prediction_type, true))
            .map_err(|e| anyhow!(e))?;
    Ok((scheduler, f.ema))
}

/// Whether a checkpoint is of a latent diffusion model (its metadata says
/// `latent_diffusion`), and the `vae/` of its run folder
/// (`<run>/checkpoints/step-….safetensors` → `<run>/vae`) when it is there.
fn checkpoint_vae(
    path: &Path,
    meta: &std::collections::HashMap<String, String>,
) -> Result<(bool, Option<LatentVae>)> {
    if meta.get("latent_diffusion").map(String::as_str) != Some("true") {
        return Ok((false, None));
    }
    let run = path
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    Ok((true, LatentVae::beside(run)?))
}

fn read_scheduler(path: &Path) -> Result<SchedulerConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    SchedulerConfig::from_json(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

fn read_config(path: &Path) -> Result<UNetConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    UNetConfig::from_json(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

impl ModelSource {
    /// A model directory in any of the layouts above (a run folder's `model/` included).
    pub fn from_dir(dir: &Path) -> Result<ModelSource> {
        if !dir.is_dir() {
            bail!(
                "{} is not a directory (expected a diffusers model or pipeline directory, or a run folder)",
                dir.display()
            );
        }
        let flat_config = dir.join("config.json");
        if flat_config.is_file() {
            let mut source = Self::from_unet_dir(
                dir,
                &[
                    dir.join("scheduler_config.json"),
                    dir.join("scheduler").join("scheduler_config.json"),
                ],
            )?;
            // The unet/ of a latent pipeline directory decodes with the vae/ beside it.
            let pipeline = dir.parent().filter(|_| dir.ends_with("unet"));
            source.vae = match LatentVae::beside(dir)? {
                Some(v) => Some(v),
                None => pipeline.map(LatentVae::beside).transpose()?.flatten(),
            };
            source.latent = source.vae.is_some();
            // Our exports keep the text encoder beside the flat U-Net files; a pipeline's unet/
            // finds it one level up.
            source.text = match TextConditioning::from_pipeline(dir)? {
                Some(t) => Some(t),
                None => pipeline
                    .map(TextConditioning::from_pipeline)
                    .transpose()?
                    .flatten(),
            };
            source.amend_for_pipeline()?;
            return Ok(source);
        }
        if dir.join("unet").join("config.json").is_file() {
            let mut source = Self::from_unet_dir(
                &dir.join("unet"),
                &[dir.join("scheduler").join("scheduler_config.json")],
            )?;
            source.vae = LatentVae::beside(dir)?;
            source.latent = source.vae.is_some();
            source.text = TextConditioning::from_pipeline(dir)?;
            source.amend_for_pipeline()?;
            return Ok(source);
        }
        if dir.join("model").is_dir() {
            return Self::from_dir(&dir.join("model"));
        }
        if dir.join("checkpoints").is_dir() {
            bail!(
                "{} is a run folder without an exported model/ yet (it is written with the first checkpoint); use --checkpoint with a file from {}",
                dir.display(),
                dir.join("checkpoints").display()
            );
        }
        bail!(
            "{} holds no model: expected config.json + {MODEL_WEIGHTS} (a diffusers model directory), unet/ + scheduler/ (a pipeline directory), or a run folder with model/",
            dir.display()
        )
    }

    /// A StableDiffusionPipeline directory samples with the scheduler settings that pipeline
    /// amends an outdated config to ([`SchedulerConfig::stable_diffusion_amendments`]).
    fn amend_for_pipeline(&mut self) -> Result<()> {
        let stable_diffusion = self
            .text
            .as_ref()
            .and_then(|t| t.pipeline.as_deref())
            .is_some_and(|c| c.starts_with("StableDiffusion"));
        if stable_diffusion {
            let origin = &self.scheduler_origin;
            let notes = self
                .scheduler
                .stable_diffusion_amendments()
                .map_err(|e| anyhow!("{origin}: {e}"))?;
            self.notes
                .extend(notes.into_iter().map(|n| format!("{origin}: {n}")));
        }
        Ok(())
    }

    fn from_unet_dir(dir: &Path, scheduler_paths: &[PathBuf]) -> Result<ModelSource> {
        let config = read_config(&dir.join("config.json"))?;
        let mut notes = Vec::new();
        let found = weights_file(dir);
        if let Some((path, Some(variant))) = &found {
            notes.push(format!(
                "{} has no {MODEL_WEIGHTS}: loading its {variant} variant {} (widened to f32)",
                dir.display(),
                path.display()
            ));
        }
        if found.is_none() {
            let bin = dir.join("diffusion_pytorch_model.bin");
            if bin.is_file() {
                bail!(
                    "{} holds PyTorch pickle weights ({}); only safetensors are read. Convert with diffusers: UNet2DModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)",
                    dir.display(),
                    bin.display()
                );
            }
            bail!(
                "{}: {MODEL_WEIGHTS} is missing (config.json is there)",
                dir.display()
            );
        }
        let (scheduler, scheduler_origin) = match scheduler_paths.iter().find(|p| p.is_file()) {
            Some(p) => (read_scheduler(p)?, p.display().to_string()),
            None => (
                SchedulerConfig::ddpm_default(),
                "DDPMScheduler() defaults (no scheduler_config.json found)".to_string(),
            ),
        };
        let class_names = read_class_names(&dir.join(CLASS_NAMES))?
            .or(read_class_names(
                &dir.parent().unwrap_or(dir).join(CLASS_NAMES),
            )?)
            .unwrap_or_default();
        Ok(ModelSource {
            config,
            scheduler,
            scheduler_origin,
            description: dir.display().to_string(),
            notes,
            class_names,
            vae: None,
            latent: false,
            text: None,
            weights: Weights::Dir(dir.to_path_buf()),
        })
    }

    /// One of our checkpoints: the EMA weights unless `raw`, or when the run had no EMA.
    pub fn from_checkpoint(path: &Path, raw: bool) -> Result<ModelSource> {
        Self::from_checkpoint_tensors(LoadedTensors::read(path)?, raw)
    }

    /// [`ModelSource::from_checkpoint`] of a file already read.
    pub fn from_checkpoint_tensors(ck: LoadedTensors, raw: bool) -> Result<ModelSource> {
        let path = ck.path.clone();
        let path = path.as_path();
        let meta = ck.metadata();
        let unet = meta.get("unet_config").ok_or_else(|| {
            anyhow!(
                "{}: no `unet_config` in its metadata; not a wgpu-diffusion checkpoint (for a diffusers directory use --model)",
                path.display()
            )
        })?;
        let config = UNetConfig::from_json(unet).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let (scheduler, ema) =
            checkpoint_scheduler(&meta).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let mut notes = Vec::new();
        let prefix = if raw {
            "param"
        } else if ema {
            "ema"
        } else {
            notes.push("this run was trained without EMA: using its raw weights".to_string());
            "param"
        };
        let step = meta.get("step").cloned().unwrap_or_else(|| "?".into());
        let (latent, vae) = checkpoint_vae(path, &meta)?;
        let ck = Arc::new(ck);
        // A text run's checkpoint sits in RUN/checkpoints/, beside the run's tokenizer and
        // text encoder config; the encoder's weights are in the checkpoint.
        let text = match path.parent().and_then(Path::parent) {
            Some(root) if config.cross_attention.is_some() => {
                TextConditioning::from_run_checkpoint(root, &ck, prefix)?
            }
            _ => None,
        };
        Ok(ModelSource {
            config,
            scheduler,
            scheduler_origin: format!("the training settings of {}", path.display()),
            description: format!(
                "{} (step {step}, {} weights)",
                path.display(),
                if prefix == "ema" { "EMA" } else { "raw" }
            ),
            notes,
            class_names: meta
                .get("class_names")
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or_default(),
            vae,
            latent,
            text,
            weights: Weights::Checkpoint(ck, prefix),
        })
    }

    /// Classes a user can ask for (all but the null class of a guidance-trained model).
    pub fn real_classes(&self) -> usize {
        let k = self.config.num_class_embeds.unwrap_or(0);
        match self.config.null_class {
            Some(n) if n + 1 == k => n,
            _ => k,
        }
    }

    /// `--class` as an index: a number, or a name from class_names.json.
    pub fn class_index(&self, spec: &str) -> Result<u32> {
        let k = self.real_classes();
        let index = match spec.parse::<usize>() {
            Ok(i) => i,
            Err(_) => self
                .class_names
                .iter()
                .position(|n| n == spec)
                .ok_or_else(|| {
                    anyhow!(
                        "--class {spec}: not a class index{}",
                        if self.class_names.is_empty() {
                            String::new()
                        } else {
                            format!(" or name ({})", self.class_names.join(", "))
                        }
                    )
                })?,
        };
        if index >= k {
            bail!(
                "--class {index} is out of range: the model has classes 0..{}",
                k.saturating_sub(1)
            );
        }
        Ok(index as u32)
    }

    /// A class for messages: its index and, when known, its name.
    pub fn class_label(&self, index: u32) -> String {
        match self.class_names.get(index as usize) {
            Some(n) if n != &index.to_string() => format!("{index} ({n})"),
            _ => index.to_string(),
        }
    }

    /// The weights in `store`'s flat layout; every missing, mis-shaped or non-finite tensor is
    /// an error naming it.
    pub fn weights(&self, store: &ParamStore) -> Result<Vec<f32>> {
        let flat = match &self.weights {
            Weights::Dir(dir) => read_model_weights(dir, store)?,
            Weights::Checkpoint(ck, prefix) => ck.flat(store, prefix)?,
        };
        let bad: Vec<String> = store
            .unflatten(&flat)
            .filter(|(_, v)| v.iter().any(|x| !x.is_finite()))
            .map(|(spec, _)| format!("`{}`", spec.name))
            .collect();
        if !bad.is_empty() {
            bail!(
                "{}: non-finite (NaN or infinite) values in {}",
                self.description,
                bad.join(", ")
            );
        }
        Ok(flat)
    }
}
