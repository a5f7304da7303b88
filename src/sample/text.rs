//! Text conditioning of a Stable Diffusion pipeline directory: `model_index.json`, the CLIP text
//! encoder (`text_encoder/`) and its tokenizer (`tokenizer/`), read and checked against the U-Net
//! before the GPU starts ([`TextConditioning`]), then on the GPU ([`PromptEncoder`]): prompts to
//! the `last_hidden_state` rows the U-Net's cross-attention reads, as StableDiffusionPipeline's
//! `encode_prompt` makes them (padded to `model_max_length`, truncated with a warning).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::gpu::{Gpu, Tensor};
use crate::io::tensors::LoadedTensors;
use crate::nn::UNetConfig;
use crate::nn::clip_text::{ClipTextConfig, ClipTextModel};
use crate::text::ClipTokenizer;

/// transformers' weight file names of a text encoder, plain then half-precision variants.
const TEXT_WEIGHTS: [&str; 3] = [
    "model.safetensors",
    "model.fp16.safetensors",
    "model.bf16.safetensors",
];

/// The pipeline classes whose components we load (SD 1.x and 2.x layouts, and the pixel-space
/// text-to-image models `train --text-conditional` exports).
const PIPELINES: [&str; 3] = [
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    crate::io::model_dir::TEXT_PIPELINE,
];

/// A pipeline's text encoder and tokenizer, read and checked; weights not yet loaded.
#[derive(Clone)]
pub struct TextConditioning {
    pub encoder_dir: PathBuf,
    pub config: ClipTextConfig,
    pub tokenizer: ClipTokenizer,
    /// Notes for the user (ignored pipeline components).
    pub notes: Vec<String>,
    /// The pipeline class `model_index.json` names (None: a run's checkpoint, or no index).
    pub pipeline: Option<String>,
    /// The weights of a run's checkpoint (its joint store's tensors under this prefix, e.g.
    /// `ema.text_encoder.`) instead of `encoder_dir`'s model.safetensors.
    checkpoint: Option<(Arc<LoadedTensors>, String)>,
}

/// Reads `model_index.json` when there is one: refuses SDXL's second text encoder by name,
/// notes the components we ignore, and returns the pipeline's class.
fn read_model_index(dir: &Path, notes: &mut Vec<String>) -> Result<Option<String>> {
    let path = dir.join("model_index.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let index: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))?;
    let present = |k: &str| {
        index
            .get(k)
            .is_some_and(|v| v.get(0).is_some_and(|c| !c.is_null()))
    };
    for second in ["text_encoder_2", "tokenizer_2"] {
        if present(second) {
            bail!(
                "{}: the pipeline has a second text encoder (`{second}`, SDXL-style), which wgpu-diffusion does not build; SD 1.x and 2.x pipelines have one",
                path.display()
            );
        }
    }
    for ignored in ["safety_checker", "feature_extractor", "image_encoder"] {
        if present(ignored) {
            notes.push(format!(
                "{}: `{ignored}` is ignored (images are not filtered)",
                path.display()
            ));
        }
    }
    Ok(index
        .get("_class_name")
        .and_then(Value::as_str)
        .map(String::from))
}

impl TextConditioning {
    /// The `text_encoder/` and `tokenizer/` of pipeline directory `dir` (after its
    /// `model_index.json`), or None when it has neither.
    pub fn from_pipeline(dir: &Path) -> Result<Option<TextConditioning>> {
        let mut notes = Vec::new();
        let class = read_model_index(dir, &mut notes)?;
        let (encoder_dir, tokenizer_dir) = (dir.join("text_encoder"), dir.join("tokenizer"));
        match (encoder_dir.is_dir(), tokenizer_dir.is_dir()) {
            (false, false) => return Ok(None),
            (true, false) => bail!(
                "{} has a text_encoder/ but no tokenizer/: the pipeline is incomplete",
                dir.display()
            ),
            (false, true) => bail!(
                "{} has a tokenizer/ but no text_encoder/: the pipeline is incomplete",
                dir.display()
            ),
            (true, true) => {}
        }
        // A text-conditional pipeline of another kind (its loop differs from this one's).
        if let Some(class) = class.as_ref().filter(|c| !PIPELINES.contains(&c.as_str())) {
            bail!(
                "{}: a `{class}` is not supported ({})",
                dir.join("model_index.json").display(),
                PIPELINES.join(", ")
            );
        }
        let config_path = encoder_dir.join("config.json");
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?;
        let config = ClipTextConfig::from_json(&text)
            .map_err(|e| anyhow!("{}: {e}", config_path.display()))?;
        let tokenizer = ClipTokenizer::from_dir(&tokenizer_dir)?;
        let conditioning = TextConditioning {
            encoder_dir,
            config,
            tokenizer,
            notes,
            pipeline: class,
            checkpoint: None,
        };
        conditioning.weights_path()?;
        conditioning.check_tokenizer()?;
        Ok(Some(conditioning))
    }

    /// A text-conditional run's text side for sampling one of its checkpoints: the run folder
    /// `root` keeps the tokenizer and the text encoder's config, the checkpoint `ck` its weights
    /// (under `{prefix}.text_encoder.`, `prefix` `ema` or `param`, as the joint store names
    /// them). None when `root` is not such a run folder.
    pub fn from_run_checkpoint(
        root: &Path,
        ck: &Arc<LoadedTensors>,
        prefix: &str,
    ) -> Result<Option<TextConditioning>> {
        let (encoder_dir, tokenizer_dir) = (root.join("text_encoder"), root.join("tokenizer"));
        let config_path = encoder_dir.join("config.json");
        if !config_path.is_file() || !tokenizer_dir.is_dir() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&config_path)
            .with_context(|| format!("reading {}", config_path.display()))?;
        let config = ClipTextConfig::from_json(&text)
            .map_err(|e| anyhow!("{}: {e}", config_path.display()))?;
        let conditioning = TextConditioning {
            encoder_dir,
            config,
            tokenizer: ClipTokenizer::from_dir(&tokenizer_dir)?,
            notes: Vec::new(),
            pipeline: None,
            checkpoint: Some((ck.clone(), format!("{prefix}.text_encoder."))),
        };
        conditioning.check_tokenizer()?;
        Ok(Some(conditioning))
    }

    fn weights_path(&self) -> Result<PathBuf> {
        TEXT_WEIGHTS
            .iter()
            .map(|n| self.encoder_dir.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                anyhow!(
                    "{}: model.safetensors is missing (config.json is there); a pytorch_model.bin must be converted to safetensors first",
                    self.encoder_dir.display()
                )
            })
    }

    /// Every id the tokenizer can produce must be a row of the encoder's embedding table, and
    /// every prompt must fit its positions.
    fn check_tokenizer(&self) -> Result<()> {
        let (t, c) = (&self.tokenizer, &self.config);
        let largest = t.largest_id();
        if largest as usize >= c.vocab_size {
            bail!(
                "the tokenizer's ids reach {largest}, but the text encoder {} has vocab_size {}: the tokenizer does not fit it",
                self.encoder_dir.display(),
                c.vocab_size
            );
        }
        if t.model_max_length > c.max_position_embeddings {
            bail!(
                "the tokenizer pads prompts to {} tokens, but the text encoder {} has {} positions",
                t.model_max_length,
                self.encoder_dir.display(),
                c.max_position_embeddings
            );
        }
        Ok(())
    }

    /// Refuses a U-Net whose cross-attention reads rows of another width.
    pub fn check_fits(&self, unet: &UNetConfig) -> Result<()> {
        let Some(x) = &unet.cross_attention else {
            bail!("the U-Net has no cross-attention: it does not take a prompt");
        };
        if x.cross_attention_dim != self.config.hidden_size {
            bail!(
                "the U-Net's cross_attention_dim is {}, but the text encoder {} has hidden_size {}: they do not belong together",
                x.cross_attention_dim,
                self.encoder_dir.display(),
                self.config.hidden_size
            );
        }
        Ok(())
    }

    /// Tokens per prompt: the rows of context each image's U-Net input attends to.
    pub fn context_tokens(&self) -> usize {
        self.tokenizer.model_max_length
    }

    /// The encoder on the GPU for `prompts` prompts at a time, with its weights.
    pub fn load(&self, gpu: &Arc<Gpu>, prompts: usize) -> Result<PromptEncoder> {
        let mut config = self.config.clone();
        config.max_position_embeddings = self.context_tokens();
        let model = {
            let _no_grad = crate::gpu::no_grad();
            ClipTextModel::new(gpu, &config, prompts)?
        };
        let (loaded, prefix) = match &self.checkpoint {
            Some((ck, prefix)) => (ck.clone(), prefix.as_str()),
            None => (Arc::new(LoadedTensors::read(&self.weights_path()?)?), ""),
        };
        let path = loaded.path.clone();
        let flat = model
            .weights(|name| {
                let found = loaded.get(&format!("{prefix}{name}")).ok()?;
                // A table with more positions than the tokenizer pads to: its first rows.
                Some(if name.ends_with("position_embedding.weight") {
                    let (rows, width) = (config.max_position_embeddings, found.0[1]);
                    (vec![rows, width], found.1[..rows * width].to_vec())
                } else {
                    found
                })
            })
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        model.params.write_values(gpu, &flat)?;
        Ok(PromptEncoder {
            gpu: gpu.clone(),
            model,
            tokenizer: self.tokenizer.clone(),
        })
    }
}

/// The text encoder on the GPU.
pub struct PromptEncoder {
    gpu: Arc<Gpu>,
    model: ClipTextModel,
    tokenizer: ClipTokenizer,
}

impl PromptEncoder {
    /// Encodes `prompts` (as many as the encoder was built for) into
    /// [`output`](Self::output); returns a warning per prompt cut to the context length.
    pub fn encode(&self, prompts: &[&str]) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        let mut warnings = Vec::new();
        for p in prompts {
            let e = self.tokenizer.encode_for_model(p);
            if e.dropped > 0 {
                warnings.push(format!(
                    "the prompt \"{p}\" is {} tokens over the text encoder's {} and was truncated (as transformers does)",
                    e.dropped, self.tokenizer.model_max_length
                ));
            }
            ids.extend(e.ids);
        }
        self.model.set_input_ids(&self.gpu, &ids)?;
        let mut rec = self.gpu.recorder();
        self.model.forward(&mut rec)?;
        self.gpu.run(&[&rec.finish()])?;
        Ok(warnings)
    }

    /// `last_hidden_state` [prompts, tokens, hidden].
    pub fn output(&self) -> &Tensor {
        &self.model.last_hidden_state
    }
}
