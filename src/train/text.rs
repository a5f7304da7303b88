//! Text-conditional training (issue 23): the captions of each step (a template per MNIST digit,
//! or each image's metadata.jsonl text), dropped to the empty prompt with `caption_drop`, the
//! tokenizer (given, or learned from the captions with BPE), the CLIP text encoder (given and
//! frozen or fine-tuned, or a small one trained from scratch), and the files a run folder and an
//! exported pipeline hold for them.
//!
//! Every random choice (a caption's template, its dropout) is a Philox draw keyed by (seed,
//! step, sample), so a resumed run continues bit for bit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};

use super::config::TrainConfig;
use crate::data::Dataset;
use crate::data::captions::{Captions, DIGIT_WORDS};
use crate::gpu::{Gpu, Recorder, Tensor};
use crate::io::tensors::{LoadedTensors, serialize_named};
use crate::nn::clip_text::{ClipTextConfig, ClipTextModel, HiddenAct};
use crate::nn::text_unet::{JointTextEncoder, TEXT_ENCODER_PREFIX};
use crate::nn::{ParamStore, UNet, UNetConfig};
use crate::ops::noise::purpose;
use crate::text::ClipTokenizer;
use crate::text::learn_bpe::{learn_merges, learned_tokenizer, tokenizer_files};

/// Where a run folder (and an exported pipeline) keeps the tokenizer and the text encoder.
pub const TOKENIZER_DIR: &str = "tokenizer";
pub const TEXT_ENCODER_DIR: &str = "text_encoder";
/// transformers' weight file of a text encoder.
pub const TEXT_WEIGHTS: &str = "model.safetensors";
/// The longest context a learned tokenizer pads to: CLIP's.
const MAX_CONTEXT: usize = 77;
/// The merges BPE may learn from the captions.
const MAX_MERGES: usize = 4000;
/// The files of a CLIPTokenizer directory we copy into the run folder.
const TOKENIZER_FILES: [&str; 5] = [
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
];

/// The text encoder trained from scratch with the U-Net: CLIP's architecture at MNIST's scale
/// (2 pre-LN layers of 4 heads, 64 wide, quick-GELU MLPs 4× wide).
pub fn scratch_text_config(vocab_size: usize, positions: usize) -> ClipTextConfig {
    ClipTextConfig {
        vocab_size,
        hidden_size: 64,
        intermediate_size: 256,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        max_position_embeddings: positions,
        hidden_act: HiddenAct::QuickGelu,
        layer_norm_eps: 1e-5,
    }
}

/// A run's text side, checked before the GPU starts.
pub struct TextTraining {
    pub config: ClipTextConfig,
    pub tokenizer: ClipTokenizer,
    pub captions: Captions,
    /// Trained with the U-Net (always, when trained from scratch).
    pub trainable: bool,
    /// The given text encoder's weights, loaded when a new run starts.
    pub weights: Option<PathBuf>,
    /// The tokenizer's files (relative to the run folder), written with the run's options.
    pub tokenizer_files: Files,
}

impl TextTraining {
    /// The text side of a text-conditional run (None for other runs): a resumed run's from its
    /// folder, a new run's from the options and the data. Sets a preset U-Net's
    /// `cross_attention_dim` to the text encoder's width; any other mismatch is an error.
    pub fn prepare(
        cfg: &TrainConfig,
        data: &Dataset,
        run_root: &Path,
        resuming: bool,
        model: &mut UNetConfig,
    ) -> Result<Option<TextTraining>> {
        let Some(cross) = model.cross_attention.as_mut() else {
            if cfg.text_conditional {
                bail!(
                    "--text-conditional needs a U-Net with cross-attention (UNet2DConditionModel, e.g. the mnist28-text preset)"
                );
            }
            return Ok(None);
        };
        if !cfg.text_conditional {
            bail!(
                "the model is a UNet2DConditionModel (cross-attention to text): train it with --text-conditional"
            );
        }
        let captions = captions_of(cfg, data)?;
        let mut text = if resuming {
            Self::from_run(run_root, captions)?
        } else {
            Self::new_run(cfg, captions)?
        };
        text.trainable = cfg.text_encoder.is_none() || cfg.train_text_encoder;
        let from_preset = cfg.model_config.is_none() && cfg.init.is_none();
        if from_preset && !resuming {
            cross.cross_attention_dim = text.config.hidden_size;
        }
        if cross.cross_attention_dim != text.config.hidden_size {
            bail!(
                "the U-Net's cross_attention_dim is {}, but the text encoder's hidden_size is {}: they do not fit",
                cross.cross_attention_dim,
                text.config.hidden_size
            );
        }
        Ok(Some(text))
    }

    /// MNIST's captions with a learned tokenizer and a text encoder trained from scratch of
    /// width `hidden` (what `train --text-conditional` builds; the benchmarks time it).
    pub fn mnist_scratch(hidden: usize) -> Result<TextTraining> {
        let mut text = Self::new_run(&TrainConfig::default(), Captions::MnistTemplates)?;
        text.config.hidden_size = hidden;
        Ok(text)
    }

    fn new_run(cfg: &TrainConfig, captions: Captions) -> Result<TextTraining> {
        let (tokenizer, files) = match &cfg.tokenizer {
            Some(dir) => {
                let t = ClipTokenizer::from_dir(dir)?;
                let files = TOKENIZER_FILES
                    .iter()
                    .map(|n| dir.join(n))
                    .filter(|p| p.is_file())
                    .map(|p| {
                        let bytes = std::fs::read(&p)
                            .with_context(|| format!("reading {}", p.display()))?;
                        let name = p.file_name().expect("a file").to_string_lossy();
                        Ok((format!("{TOKENIZER_DIR}/{name}"), bytes))
                    })
                    .collect::<Result<Vec<_>>>()?;
                (t, files)
            }
            None => learn_tokenizer(&captions)?,
        };
        let (config, weights) = match &cfg.text_encoder {
            Some(dir) => {
                let path = dir.join("config.json");
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let mut c = ClipTextConfig::from_json(&text)
                    .map_err(|e| anyhow!("{}: {e}", path.display()))?;
                let weights = dir.join(TEXT_WEIGHTS);
                if !weights.is_file() {
                    bail!(
                        "{}: {TEXT_WEIGHTS} is missing (a pytorch_model.bin must be converted to safetensors first)",
                        dir.display()
                    );
                }
                if tokenizer.model_max_length > c.max_position_embeddings {
                    bail!(
                        "the tokenizer pads captions to {} tokens, but the text encoder {} has {} positions",
                        tokenizer.model_max_length,
                        dir.display(),
                        c.max_position_embeddings
                    );
                }
                // Trained at the tokenizer's context: the first rows of the position table.
                c.max_position_embeddings = tokenizer.model_max_length;
                (c, Some(weights))
            }
            None => (
                scratch_text_config(tokenizer.vocab_size(), tokenizer.model_max_length),
                None,
            ),
        };
        let text = TextTraining {
            trainable: cfg.text_encoder.is_none() || cfg.train_text_encoder,
            config,
            tokenizer,
            captions,
            weights,
            tokenizer_files: files,
        };
        text.check_vocabulary()?;
        Ok(text)
    }

    /// A resumed run's tokenizer and text encoder config, from its folder.
    fn from_run(root: &Path, captions: Captions) -> Result<TextTraining> {
        let tokenizer = ClipTokenizer::from_dir(&root.join(TOKENIZER_DIR))
            .with_context(|| format!("the run folder {} lost its tokenizer", root.display()))?;
        let path = root.join(TEXT_ENCODER_DIR).join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let config =
            ClipTextConfig::from_json(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let text = TextTraining {
            config,
            tokenizer,
            captions,
            // A checkpoint holds the encoder either way; whether it trains is in config.toml,
            // set again by `prepare`'s caller from the run's options.
            trainable: true,
            weights: None,
            tokenizer_files: Vec::new(),
        };
        text.check_vocabulary()?;
        Ok(text)
    }

    /// Every id the tokenizer gives must be a row of the encoder's embedding.
    fn check_vocabulary(&self) -> Result<()> {
        let t = &self.tokenizer;
        let largest = t.largest_id();
        if largest as usize >= self.config.vocab_size {
            bail!(
                "the tokenizer's ids reach {largest}, but the text encoder has vocab_size {}: the tokenizer does not fit it",
                self.config.vocab_size
            );
        }
        Ok(())
    }

    /// Context rows per sample: the tokenizer's padded length.
    pub fn context_tokens(&self) -> usize {
        self.tokenizer.model_max_length
    }

    /// The run folder's files: the tokenizer's and the text encoder's config.json.
    pub fn run_files(&self) -> Files {
        let t = &self.tokenizer;
        let mut files = self.tokenizer_files.clone();
        files.push((
            format!("{TEXT_ENCODER_DIR}/config.json"),
            self.config
                .to_json((t.bos_id, t.eos_id, t.pad_id))
                .into_bytes(),
        ));
        files
    }

    /// The caption of each sample of a step's micro-batch `micro_batch` (global index over every
    /// rank) from the images' labels: template by the CAPTION stream, dropped to "" with
    /// probability `caption_drop` by the CLASS_DROP stream.
    pub fn captions_of_batch(
        &self,
        (seed, step, caption_drop): (u64, u64, f64),
        micro_batch: usize,
        labels: &[u32],
    ) -> Vec<String> {
        let b = labels.len();
        labels
            .iter()
            .enumerate()
            .map(|(k, &label)| {
                let index = (micro_batch * b + k) as u32;
                let draw = |p| crate::rng::random_u32(seed, p, step as u32, index);
                if caption_drop > 0.0
                    && (draw(purpose::CLASS_DROP) as f64) < caption_drop * 4_294_967_296.0
                {
                    return String::new();
                }
                let choice = draw(purpose::CAPTION) % self.captions.choices() as u32;
                self.captions.caption(label, choice)
            })
            .collect()
    }

    /// The prompts of a training sample grid: image i shows digit i mod 10 ("a handwritten
    /// …"), or the i-th caption of the data.
    pub fn grid_prompts(&self, n: usize) -> Vec<String> {
        match &self.captions {
            Captions::MnistTemplates => (0..n)
                .map(|i| format!("a handwritten {}", DIGIT_WORDS[i % 10]))
                .collect(),
            Captions::PerImage(texts) => (0..n).map(|i| texts[i % texts.len()].clone()).collect(),
        }
    }

    /// The starting weights of the text encoder's range of a new run: the given encoder's, or
    /// transformers' CLIP initialisation.
    pub fn initial_weights(&self, part: &ParamStore, seed: u64) -> Result<Vec<f32>> {
        let Some(path) = &self.weights else {
            let mut flat = vec![0.0; part.len];
            let c = &self.config;
            crate::nn::init::clip_text_init(
                part,
                &mut flat,
                c.hidden_size,
                c.num_hidden_layers,
                seed,
            );
            return Ok(flat);
        };
        let loaded = LoadedTensors::read(path)?;
        let positions = self.config.max_position_embeddings;
        crate::nn::clip_text::weights_in(part, |name| {
            let found = loaded.get(name).ok()?;
            Some(if name.ends_with("position_embedding.weight") {
                let width = found.0[1];
                let rows = positions.min(found.0[0]);
                (vec![rows, width], found.1[..rows * width].to_vec())
            } else {
                found
            })
        })
        .map_err(|e| anyhow!("{}: {e}", path.display()))
    }
}

/// The captions a run draws from: MNIST's templates, or the data's metadata.jsonl.
fn captions_of(cfg: &TrainConfig, data: &Dataset) -> Result<Captions> {
    match (&cfg.data, &data.captions) {
        (None, _) if data.labels.is_some() => Ok(Captions::MnistTemplates),
        (Some(_), Some(texts)) => Ok(Captions::PerImage(texts.clone())),
        _ => bail!(
            "--text-conditional needs captions: the embedded MNIST (described by templates), or --data with a metadata.jsonl giving each image's `text` ({} has none)",
            data.description
        ),
    }
}

/// A tokenizer learned from every caption the run can draw, padding to the longest (rounded
/// up to 8, at most CLIP's 77), and its files.
fn learn_tokenizer(captions: &Captions) -> Result<(ClipTokenizer, Files)> {
    let all = captions.all();
    let merges = learn_merges(all.iter().map(String::as_str), MAX_MERGES);
    let probe = learned_tokenizer(&merges, MAX_CONTEXT)?;
    let longest = all.iter().map(|c| probe.encode(c).len()).max().unwrap_or(2);
    let context = longest.next_multiple_of(8).min(MAX_CONTEXT);
    let tokenizer = learned_tokenizer(&merges, context)?;
    let files = tokenizer_files(&merges, context)?
        .into_iter()
        .map(|(name, text)| (format!("{TOKENIZER_DIR}/{name}"), text.into_bytes()))
        .collect();
    Ok((tokenizer, files))
}

/// Files by their path relative to a run folder or an exported model.
pub type Files = Vec<(String, Vec<u8>)>;

/// The trainer's text encoder: the jointly built model, each micro-batch's ids, and a cache of
/// tokenized captions.
pub struct TrainerText {
    pub joint: JointTextEncoder,
    pub setup: TextTraining,
    /// The ids of each micro-batch, copied into the encoder's input in the recorded step.
    pub ids: Vec<Tensor>,
    cache: HashMap<String, Vec<u32>>,
}

impl TrainerText {
    pub fn new(gpu: &Arc<Gpu>, joint: JointTextEncoder, setup: TextTraining, accum: usize) -> Self {
        let rows = joint.model.input_ids.numel();
        TrainerText {
            ids: (0..accum)
                .map(|i| gpu.tensor(&[rows], &format!("caption ids {i}")))
                .collect(),
            joint,
            setup,
            cache: HashMap::new(),
        }
    }

    /// Records micro-batch `local`'s text encoder forward into the U-Net's context.
    pub fn record_forward(&self, rec: &mut Recorder, unet: &UNet, local: usize) -> Result<()> {
        rec.copy(&self.ids[local], &self.joint.model.input_ids)?;
        Ok(self.joint.record_forward(rec, unet)?)
    }

    /// Tokenizes `captions` (cached) and uploads them as micro-batch `local`'s ids.
    pub fn write_ids(&mut self, gpu: &Gpu, local: usize, captions: &[String]) -> Result<()> {
        let mut ids = Vec::with_capacity(self.ids[local].numel());
        for c in captions {
            // Captions repeat (templates, the empty prompt): tokenized once each.
            if !self.cache.contains_key(c) {
                let e = self.setup.tokenizer.encode_for_model(c).ids;
                self.cache.insert(c.clone(), e);
            }
            ids.extend_from_slice(&self.cache[c]);
        }
        if ids.len() != self.ids[local].numel() {
            bail!(
                "micro-batch {local}: {} captions do not fill the batch",
                captions.len()
            );
        }
        gpu.write_u32(&self.ids[local], &ids)?;
        Ok(())
    }

    /// The text encoder's part of the joint store (its own layout and names).
    pub fn part(&self, unet: &UNet) -> ParamStore {
        unet.params
            .part(self.joint.range(unet), TEXT_ENCODER_PREFIX)
    }

    /// Encodes the grid's prompts with the text encoder weights of `weights` (a joint-layout
    /// buffer: parameters or EMA) into a context for the sampler.
    pub fn encode_prompts(
        &self,
        gpu: &Arc<Gpu>,
        unet: &UNet,
        weights: &Tensor,
        prompts: &[String],
    ) -> Result<ClipTextModel> {
        let model = {
            let _no_grad = crate::gpu::no_grad();
            ClipTextModel::new(gpu, &self.setup.config, prompts.len())?
        };
        let range = self.joint.range(unet);
        let source = weights.view(range.start, &[range.len()], "text encoder weights");
        let mut rec = gpu.recorder();
        rec.copy(&source, model.params.params())?;
        let ids: Vec<u32> = prompts
            .iter()
            .flat_map(|p| self.setup.tokenizer.encode_for_model(p).ids)
            .collect();
        model.set_input_ids(gpu, &ids)?;
        model.forward(&mut rec)?;
        gpu.run(&[&rec.finish()])?;
        Ok(model)
    }

    /// The exported pipeline's text files: the run folder's tokenizer and text encoder config,
    /// and the encoder's weights (`weights`: a joint-layout vector) as transformers names them.
    pub fn export_files(&self, unet: &UNet, weights: &[f32], run_root: &Path) -> Result<Files> {
        let part = self.part(unet);
        let range = self.joint.range(unet);
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        let bytes = serialize_named(&part, &[("text_model", &weights[range])], meta)?;
        let mut files = Vec::new();
        for name in TOKENIZER_FILES {
            let path = run_root.join(TOKENIZER_DIR).join(name);
            if path.is_file() {
                let bytes =
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                files.push((format!("{TOKENIZER_DIR}/{name}"), bytes));
            }
        }
        let config = run_root.join(TEXT_ENCODER_DIR).join("config.json");
        let text =
            std::fs::read(&config).with_context(|| format!("reading {}", config.display()))?;
        files.push((format!("{TEXT_ENCODER_DIR}/config.json"), text));
        files.push((format!("{TEXT_ENCODER_DIR}/{TEXT_WEIGHTS}"), bytes));
        Ok(files)
    }
}
