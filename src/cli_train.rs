//! `wgpu-diffusion train`: flags, TOML config file merging, the set-up of a new or resumed run,
//! progress display.

use std::path::PathBuf;

use crate::diffusion::{BetaSchedule, PredictionType};
use crate::dist::World;
use crate::gpu::{GemmPathChoice, Gpu, GpuOptions, Precision};
use crate::nn::UNetConfig;
use crate::progress::ConsoleProgress;
use crate::train::config::Task;
use crate::train::{LrSchedule, Progress, ResumePoint, TrainConfig};

/// `true`/`false` after a switch, or the switch alone (`--ema` = `--ema true`).
const BOOL: &str = "BOOL";

/// diffusers' spellings (`scaled_linear`, `squaredcos_cap_v2`), the dashed ones accepted too.
fn beta_schedule_parser() -> impl clap::builder::TypedValueParser<Value = BetaSchedule> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    PossibleValuesParser::new([
        PossibleValue::new("linear"),
        PossibleValue::new("scaled_linear").alias("scaled-linear"),
        PossibleValue::new("squaredcos_cap_v2")
            .alias("squaredcos-cap-v2")
            .alias("cosine"),
        PossibleValue::new("sigmoid"),
    ])
    .map(|s| match s.as_str() {
        "linear" => BetaSchedule::Linear,
        "scaled_linear" | "scaled-linear" => BetaSchedule::ScaledLinear,
        "sigmoid" => BetaSchedule::Sigmoid,
        _ => BetaSchedule::SquaredcosCapV2,
    })
}

/// diffusers' spellings (`v_prediction`), the dashed one accepted too.
fn prediction_type_parser() -> impl clap::builder::TypedValueParser<Value = PredictionType> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    PossibleValuesParser::new([
        PossibleValue::new("epsilon"),
        PossibleValue::new("v_prediction").alias("v-prediction"),
        PossibleValue::new("sample"),
    ])
    .map(|s| match s.as_str() {
        "epsilon" => PredictionType::Epsilon,
        "sample" => PredictionType::Sample,
        _ => PredictionType::VPrediction,
    })
}

/// Training flags; each overrides the same key of `--config-file` (TOML), which overrides the
/// defaults shown (a resumed run's own options take their place).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TrainArgs {
    /// TOML file with any of the keys below (snake_case, e.g. `batch_size = 64`).
    #[arg(long)]
    pub config_file: Option<PathBuf>,
    /// Continue the run in this folder from its latest checkpoint (a finished run: raise
    /// --steps to train further).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Model preset: tiny16 (16x16 MNIST, fast), tiny28 (tiny16's network at 28x28), mnist28,
    /// cifar32 (google/ddpm-cifar10-32), mnist-ldm (4x8x8 latents, with --vae), mnist28-text
    /// (UNet2DConditionModel, with --text-conditional), mnist-sd (UNet2DConditionModel on 4x8x8
    /// latents, with --text-conditional --vae) [default: tiny16; tiny28 with --task sr;
    /// mnist-ldm with --vae; mnist28-text with --text-conditional; mnist-sd with both]. A model
    /// directory goes to --init, a run folder to --resume.
    #[arg(long)]
    pub model: Option<String>,
    /// A diffusers UNet2DModel config.json instead of a preset.
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// Latent diffusion: a diffusers AutoencoderKL directory (e.g. a train-vae run's vae/); the
    /// U-Net learns its latents × scaling_factor, the VAE frozen [default model: mnist-ldm].
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Fine-tune from a diffusers model directory (config.json + diffusion_pytorch_model.safetensors).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Optimizer steps of the whole run [default: 3000]
    #[arg(long)]
    pub steps: Option<u64>,
    /// Images per micro-batch [default: 32]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches accumulated per optimizer step [default: 1]
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Peak learning rate of AdamW [default: 0.001]
    #[arg(long)]
    pub lr: Option<f64>,
    /// Steps of linear learning-rate warmup from 0 [default: 100]
    #[arg(long)]
    pub lr_warmup_steps: Option<u64>,
    /// Learning rate after the warmup [default: cosine]
    #[arg(long, value_enum)]
    pub lr_schedule: Option<LrSchedule>,
    /// AdamW's decoupled weight decay [default: 0.000001]
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm (0 = off) [default: 1.0]
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// `edm`: EDM's preconditioning and noise distribution (Karras et al. 2022; sampled with
    /// --sampler euler or heun); `ve-sde`: denoising score matching of the variance-exploding
    /// SDE with a fourier U-Net (Song et al. 2021; sampled with --sampler pc or ode)
    /// [default: ddpm]
    #[arg(long, value_enum)]
    pub objective: Option<crate::diffusion::Objective>,
    /// EDM's σ_data, the data's standard deviation (--objective edm) [default: 0.5]
    #[arg(long)]
    pub sigma_data: Option<f64>,
    /// Noise schedule, diffusers' names (scaled-linear is accepted for scaled_linear) [default: linear]
    #[arg(long, value_parser = beta_schedule_parser())]
    pub beta_schedule: Option<BetaSchedule>,
    /// Diffusion timesteps T of the noise schedule [default: 1000]
    #[arg(long)]
    pub num_train_timesteps: Option<usize>,
    /// What the U-Net predicts, diffusers' names [default: epsilon]
    #[arg(long, value_parser = prediction_type_parser())]
    pub prediction_type: Option<PredictionType>,
    /// min-SNR-γ loss weighting (e.g. 5; 0 = off) [default: 0]
    #[arg(long)]
    pub snr_gamma: Option<f64>,
    /// Keep an EMA of the weights (samples and the exported model use it); `--ema false` turns
    /// it off [default: true]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = BOOL)]
    pub ema: Option<bool>,
    /// Largest EMA decay (the decay warms up to it) [default: 0.999]
    #[arg(long)]
    pub ema_decay: Option<f64>,
    /// Seed of the initial weights, the data order and every noise draw [default: 0]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Steps between sample grids (plus early grids at 100, 250, 500 and one at the end; 0 = no
    /// grids) [default: 1000]
    #[arg(long)]
    pub sample_every: Option<u64>,
    /// DDIM steps per sample grid (`sample --sample-steps`) [default: 50]
    #[arg(long)]
    pub sample_steps: Option<usize>,
    /// Steps between checkpoints (and model exports); one is also written at the end and on
    /// Ctrl-C [default: 500]
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Checkpoints kept (oldest deleted first) [default: 3]
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    /// Steps between loss readbacks and log lines [default: 10]
    #[arg(long)]
    pub log_every: Option<u64>,
    /// Under mpirun: megabytes of gradients per all-reduce bucket, each reduced as soon as the
    /// backward pass has finished it [default: 25]
    #[arg(long)]
    pub bucket_mb: Option<f64>,
    /// Run folder (default runs/run-<unix time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Train on a folder of PNG/JPEG images (recursive) instead of the embedded MNIST.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Random horizontal flips (image folders) [default: false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = BOOL)]
    pub hflip: Option<bool>,
    /// Stop at the first unreadable image instead of skipping it [default: false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = BOOL)]
    pub strict: Option<bool>,
    /// Train a class-conditional model: MNIST's digits, or with --data one sub-folder per class
    /// [default: false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = BOOL)]
    pub class_conditional: Option<bool>,
    /// `sr`: train a super-resolution model (input: noisy image + bicubic upsampling of its
    /// average-pooled low-resolution version) [default: generate]
    #[arg(long, value_enum)]
    pub task: Option<crate::train::config::Task>,
    /// Super-resolution factor for --task sr (2 or 4) [default: 2]
    #[arg(long)]
    pub scale: Option<usize>,
    /// With --class-conditional: probability of dropping a label to the null class, which trains
    /// the unconditional branch classifier-free guidance needs (0 = none) [default: 0.1]
    #[arg(long)]
    pub cond_drop: Option<f64>,
    /// Train a text-to-image model (UNet2DConditionModel + CLIP text encoder): MNIST's digits
    /// described by caption templates, or with --data the `text` of each image in its
    /// metadata.jsonl [default: false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = BOOL)]
    pub text_conditional: Option<bool>,
    /// With --text-conditional: probability of replacing a caption by the empty prompt, which
    /// trains the unconditional branch classifier-free guidance needs [default: 0.1]
    #[arg(long)]
    pub caption_drop: Option<f64>,
    /// With --text-conditional: a transformers CLIPTextModel directory to condition on, frozen
    /// unless --train-text-encoder (default: a small encoder trained from scratch)
    #[arg(long)]
    pub text_encoder: Option<PathBuf>,
    /// Train the --text-encoder with the U-Net [default: false]
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = BOOL)]
    pub train_text_encoder: Option<bool>,
    /// With --text-conditional: a CLIPTokenizer directory (default: BPE learned from the
    /// captions, saved in the run folder)
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// A text-conditional run fine-tuned from a pipeline directory (`--init DIR` with `unet/`, as
/// our text runs export and diffusers saves) takes that directory's `text_encoder/` and
/// `tokenizer/` unless `--text-encoder`/`--tokenizer` say otherwise: the U-Net was trained to
/// attend to that encoder's output. Recorded in the options, so a resumed run keeps them (the
/// encoder frozen unless `--train-text-encoder`, as any `--text-encoder`).
fn text_components_from_init(c: &mut TrainConfig) {
    let Some(dir) = c.init.clone().filter(|_| c.text_conditional) else {
        return;
    };
    let encoder = dir.join(crate::train::text::TEXT_ENCODER_DIR);
    if c.text_encoder.is_none() && encoder.join("config.json").is_file() {
        eprintln!(
            "note: --init {}: its text encoder {} comes with the U-Net (frozen unless --train-text-encoder)",
            dir.display(),
            encoder.display()
        );
        c.text_encoder = Some(encoder);
    }
    let tokenizer = dir.join(crate::train::text::TOKENIZER_DIR);
    let has_vocab = ["vocab.json", "tokenizer.json"]
        .iter()
        .any(|f| tokenizer.join(f).is_file());
    if c.tokenizer.is_none() && has_vocab {
        c.tokenizer = Some(tokenizer);
    }
}

/// Keys that fix a run's network: a resumed run takes them from its checkpoint, so a flag
/// changing them is refused rather than ignored.
const FIXED_ON_RESUME: [&str; 13] = [
    "model",
    "text_conditional",
    "text_encoder",
    "train_text_encoder",
    "tokenizer",
    "objective",
    "sigma_data",
    "model_config",
    "init",
    "vae",
    "task",
    "scale",
    "class_conditional",
];

impl TrainArgs {
    /// defaults ← config file ← flags.
    pub fn resolve(&self, base: Option<TrainConfig>) -> anyhow::Result<TrainConfig> {
        let resumed = base.is_some();
        let (mut c, file_sets_model) = match (&self.config_file, base) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("--config-file {}: {e}", path.display()))?;
                let c: TrainConfig = toml::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("--config-file {}: {e}", path.display()))?;
                let table: toml::Table = toml::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("--config-file {}: {e}", path.display()))?;
                (c, table.contains_key("model"))
            }
            (None, Some(b)) => (b, true),
            (None, None) => (TrainConfig::default(), false),
        };
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone(); } )* };
        }
        set!(
            model,
            steps,
            batch_size,
            grad_accum,
            lr,
            lr_warmup_steps,
            lr_schedule,
            weight_decay,
            max_grad_norm,
            beta_schedule
        );
        set!(
            num_train_timesteps,
            prediction_type,
            snr_gamma,
            ema,
            ema_decay,
            seed,
            sample_every,
            sample_steps,
            checkpoint_every
        );
        set!(
            keep_checkpoints,
            log_every,
            bucket_mb,
            cond_drop,
            task,
            scale
        );
        set!(objective, sigma_data);
        set!(hflip, strict, class_conditional);
        set!(text_conditional, caption_drop, train_text_encoder);
        if self.text_encoder.is_some() {
            c.text_encoder = self.text_encoder.clone();
        }
        if self.tokenizer.is_some() {
            c.tokenizer = self.tokenizer.clone();
        }
        if self.model_config.is_some() {
            c.model_config = self.model_config.clone();
        }
        if self.init.is_some() {
            c.init = self.init.clone();
        }
        if self.vae.is_some() {
            c.vae = self.vae.clone();
        }
        if self.out.is_some() && !resumed {
            c.out = self.out.clone();
        }
        if self.data.is_some() {
            c.data = self.data.clone();
        }
        let from_preset = c.model_config.is_none() && c.init.is_none();
        if from_preset
            && self.model.is_none()
            && !file_sets_model
            && let Some(preset) = default_preset(&c)
        {
            c.model = preset.into();
        }
        if from_preset && UNetConfig::preset(&c.model).is_none() {
            anyhow::bail!(
                "--model {}: not a model preset (choose {}); a diffusers model directory goes to --init DIR (fine-tune from it), a run folder to --resume DIR",
                c.model,
                UNetConfig::PRESETS.join(", ")
            );
        }
        if self.cond_drop.is_some() && !c.class_conditional {
            anyhow::bail!(
                "--cond-drop applies to class-conditional runs: add --class-conditional, or drop --cond-drop"
            );
        }
        let text_only = [
            ("--caption-drop", self.caption_drop.is_some()),
            ("--text-encoder", self.text_encoder.is_some()),
            ("--train-text-encoder", self.train_text_encoder.is_some()),
            ("--tokenizer", self.tokenizer.is_some()),
        ];
        if let Some((flag, _)) = text_only.iter().find(|(_, set)| *set)
            && !c.text_conditional
        {
            anyhow::bail!(
                "{flag} applies to text-conditional runs: add --text-conditional, or drop {flag}"
            );
        }
        if !resumed {
            text_components_from_init(&mut c);
        }
        c.validate()
            .map_err(|e| anyhow::anyhow!("invalid training options: {e}"))?;
        Ok(c)
    }

    /// The options of the run to start or resume, with notes for the user; None when a resumed
    /// run is already finished (said so; nothing is written).
    fn prepare(&self, opts: &mut GpuOptions) -> anyhow::Result<Option<TrainConfig>> {
        let Some(dir) = &self.resume else {
            return self.resolve(None).map(Some);
        };
        let point = ResumePoint::read(dir)?;
        // ... and its precision.
        let precision = match point.precision.as_deref() {
            Some("f16") => Precision::F16,
            _ => Precision::F32,
        };
        if point.checkpoint.is_some() && precision != opts.precision {
            eprintln!(
                "note: --resume {} continues in {precision}, the precision the run started with",
                dir.display()
            );
            opts.precision = precision;
        }
        if let Some(path) = &point.gemm_path {
            // A resumed run keeps the kernel path it started with (the same bits).
            opts.gemm_path = Some(if path == "portable" {
                GemmPathChoice::Portable
            } else {
                GemmPathChoice::Subgroup
            });
        }
        if let Some(out) = self.out.as_ref().filter(|o| *o != dir) {
            anyhow::bail!(
                "--resume {} continues the run in that folder: drop --out {} (or start a new run there without --resume)",
                dir.display(),
                out.display()
            );
        }
        let cfg = self.resolve(Some(point.config.clone()))?;
        let changed = changed_keys(&point.config, &cfg)?;
        if let Some((key, _, _)) = changed
            .iter()
            .find(|(k, _, _)| FIXED_ON_RESUME.contains(&k.as_str()))
        {
            anyhow::bail!(
                "--resume {}: `{key}` is fixed for a run (its checkpoint holds the model); drop --{} or start a new run with --out",
                dir.display(),
                key.replace('_', "-")
            );
        }
        let run = crate::train::RunDir { root: dir.clone() };
        if point.step == cfg.steps && !run.finished_at(point.step) {
            eprintln!(
                "note: the run in {} reached its last step ({}) but was stopped before writing its end (model export, samples, loss plot): writing it now",
                dir.display(),
                point.step
            );
        } else if point.step >= cfg.steps {
            eprintln!(
                "the run in {} is finished (step {} of {}): nothing to do; give --steps above {} to train further",
                dir.display(),
                point.step,
                cfg.steps,
                point.step
            );
            return Ok(None);
        }
        for (key, was, now) in &changed {
            eprintln!(
                "note: resuming with {key} = {now} (the run had {was}); config.toml will record it"
            );
        }
        Ok(Some(cfg))
    }
}

/// The keys whose values differ between two configs: (key, before, after).
fn changed_keys(
    before: &TrainConfig,
    after: &TrainConfig,
) -> anyhow::Result<Vec<(String, String, String)>> {
    let (a, b) = (
        toml::Table::try_from(before)?,
        toml::Table::try_from(after)?,
    );
    let show = |v: Option<&toml::Value>| v.map_or("(none)".to_string(), |v| v.to_string());
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    Ok(keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| (k.clone(), show(a.get(k)), show(b.get(k))))
        .collect())
}

/// The model preset of a run whose --model and config file name none, when its task or data
/// call for another than the default.
fn default_preset(c: &TrainConfig) -> Option<&'static str> {
    match (c.text_conditional, c.vae.is_some()) {
        // Text to image: a UNet2DConditionModel at MNIST's size, or on the VAE's latents
        // (Stable Diffusion's layout).
        (true, true) => Some("mnist-sd"),
        (true, false) => Some("mnist28-text"),
        // Latent diffusion: the U-Net on mnist-vae's 4×8×8 latents.
        (false, true) => Some("mnist-ldm"),
        // Super-resolution is measured on 28x28 digits (eval-sr).
        (false, false) => (c.task == Task::Sr).then_some("tiny28"),
    }
}

/// A flag raised by the first Ctrl-C or SIGTERM (the run then writes a checkpoint and stops);
/// a second one quits at once. For `train` and `train-vae`.
pub fn stop_on_interrupt() -> anyhow::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupted (Ctrl-C or SIGTERM): writing a checkpoint (again to quit at once)"
        );
    })?;
    Ok(stop)
}

/// `wgpu-diffusion train`: the options (a resumed run's from its folder, its checkpoint's header
/// only), then the GPU, then the run.
pub fn run(mut opts: GpuOptions, args: &TrainArgs) -> anyhow::Result<()> {
    let Some(mut cfg) = args.prepare(&mut opts)? else {
        return Ok(());
    };
    // Half precision trains as torch's autocast with a GradScaler does.
    cfg.grad_scaler |= opts.precision == Precision::F16;
    if args.resume.is_none() {
        // A U-Net that does not fit the objective or task, or a VAE that does not fit the
        // U-Net, is refused before the GPU starts.
        crate::train::check_new_run(&cfg)?;
    }
    let world = std::rc::Rc::new(World::from_environment()?);
    if !world.is_parallel() {
        let gpu = Gpu::new(&opts)?;
        eprintln!("adapter: {}", gpu.describe());
        let stop = stop_on_interrupt()?;
        let mut progress = TrainProgress::new();
        let summary = crate::train::run(gpu, cfg, args.resume.as_deref(), stop, &mut progress)?;
        return report_end(&summary);
    }
    // Data parallel under an MPI launcher: each rank takes its host's adapter by local rank;
    // rank 0 reports progress. An error on any rank ends the whole job (MPI_Abort), so no rank
    // waits forever in a collective.
    opts.local_rank = world.local_rank();
    let (rank, ranks) = (world.rank(), world.size());
    let result = Gpu::new(&opts)
        .map_err(anyhow::Error::from)
        .and_then(|gpu| {
            eprintln!(
                "rank {rank} of {ranks} (local rank {} of {}): adapter {}",
                world.local_rank(),
                world.local_size(),
                gpu.describe()
            );
            let stop = stop_on_interrupt()?;
            let mut progress = TrainProgress::new();
            progress.quiet = !world.is_root();
            crate::train::run_ranks(
                gpu,
                cfg,
                args.resume.as_deref(),
                stop,
                &mut progress,
                world.clone(),
            )
        });
    match result {
        Ok(summary) if world.is_root() => report_end(&summary),
        Ok(_) => Ok(()),
        Err(e) => world.abort_with(&format!("{e:#}")),
    }
}

/// The last line of a run: where it stopped or finished.
fn report_end(summary: &crate::train::RunSummary) -> anyhow::Result<()> {
    eprintln!(
        "{} at step {}: {}",
        if summary.interrupted {
            "stopped"
        } else {
            "done"
        },
        summary.steps,
        summary.run_dir.display()
    );
    Ok(())
}

/// Training's progress: the console bar (or log lines) with the loss, learning rate and speed.
pub struct TrainProgress {
    /// Data-parallel ranks other than 0 print nothing (rank 0 speaks for the job).
    pub quiet: bool,
    console: ConsoleProgress,
    last_loss: Option<f32>,
    last_ips: f64,
    /// GradScaler runs: the loss scale and the steps skipped so far.
    loss_scale: Option<(f32, u32)>,
}

impl TrainProgress {
    pub fn new() -> TrainProgress {
        TrainProgress {
            quiet: false,
            console: ConsoleProgress::new("step", ""),
            last_loss: None,
            last_ips: 0.0,
            loss_scale: None,
        }
    }
}

impl Default for TrainProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for TrainProgress {
    fn start(&mut self, first_step: u64, total: u64) {
        if self.quiet {
            return;
        }
        self.console.start(first_step, total);
        self.console
            .println(&format!("training steps {}..={total}", first_step + 1));
    }

    fn update(&mut self, step: u64, loss: Option<f32>, lr: f64, images_per_s: f64) {
        if self.quiet {
            return;
        }
        if loss.is_some() {
            self.last_loss = loss;
            self.last_ips = images_per_s;
        }
        let scale = self
            .loss_scale
            .map(|(s, skipped)| format!(" scale {s} ({skipped} skipped)"))
            .unwrap_or_default();
        self.console.set_message(format!(
            "loss {} lr {lr:.2e}{scale} {:.0} img/s",
            self.last_loss
                .map(|l| format!("{l:.4}"))
                .unwrap_or_else(|| "-".into()),
            self.last_ips
        ));
        // Log lines wait for a read-back loss.
        self.console.set(step, loss.is_some());
    }

    fn loss_scale(&mut self, scale: f32, skipped: u32) {
        self.loss_scale = Some((scale, skipped));
    }

    fn message(&mut self, text: &str) {
        if self.quiet {
            return;
        }
        self.console.println(text);
    }

    fn finish(&mut self) {
        if self.quiet {
            return;
        }
        self.console.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrainArgs,
    }

    fn parse(flags: &[&str]) -> Result<TrainArgs, clap::Error> {
        Cli::try_parse_from([&["train"], flags].concat()).map(|c| c.args)
    }

    #[test]
    fn diffusers_spellings_and_the_old_ones() {
        for (flag, want) in [
            ("scaled_linear", BetaSchedule::ScaledLinear),
            ("scaled-linear", BetaSchedule::ScaledLinear),
            ("squaredcos_cap_v2", BetaSchedule::SquaredcosCapV2),
            ("cosine", BetaSchedule::SquaredcosCapV2),
            ("linear", BetaSchedule::Linear),
        ] {
            let a = parse(&["--beta-schedule", flag]).unwrap();
            assert_eq!(a.beta_schedule, Some(want), "{flag}");
        }
        for flag in ["v_prediction", "v-prediction"] {
            let a = parse(&["--prediction-type", flag]).unwrap();
            assert_eq!(a.prediction_type, Some(PredictionType::VPrediction));
        }
        assert!(parse(&["--beta-schedule", "quadratic"]).is_err());
    }

    #[test]
    fn boolean_options_are_switches_that_take_true_or_false() {
        for (flags, want) in [
            (&["--ema"][..], Some(true)),
            (&["--ema", "true"][..], Some(true)),
            (&["--ema", "false"][..], Some(false)),
            (&[][..], None),
        ] {
            assert_eq!(parse(flags).unwrap().ema, want, "{flags:?}");
        }
        let a = parse(&[
            "--hflip",
            "--strict",
            "false",
            "--class-conditional",
            "true",
        ])
        .unwrap();
        assert_eq!(
            (a.hflip, a.strict, a.class_conditional),
            (Some(true), Some(false), Some(true))
        );
        // --hflip false overrides a config file's true.
        let base = TrainConfig {
            hflip: true,
            ..Default::default()
        };
        let c = parse(&["--hflip", "false"]).unwrap().resolve(Some(base));
        assert!(!c.unwrap().hflip);
    }

    /// Every training flag is described and shows the default it stands for, which is
    /// TrainConfig's.
    #[test]
    fn help_describes_every_flag_with_its_default() {
        use clap::CommandFactory;
        let defaults = toml::Table::try_from(TrainConfig::default()).unwrap();
        let cmd = Cli::command();
        let mut checked = 0;
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" {
                continue;
            }
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(!help.trim().is_empty(), "--{id} has no description");
            let Some(default) = defaults.get(id) else {
                continue;
            };
            let shown = help
                .split("[default: ")
                .nth(1)
                .and_then(|d| d.split([']', ';']).next())
                .unwrap_or_else(|| panic!("--{id} shows no default: {help}"));
            let fits = match default {
                toml::Value::Float(f) => shown.parse::<f64>().is_ok_and(|v| v == *f),
                toml::Value::Integer(i) => shown.parse::<i64>().is_ok_and(|v| v == *i),
                toml::Value::Boolean(b) => shown.parse::<bool>().is_ok_and(|v| v == *b),
                toml::Value::String(s) => shown == s,
                _ => false,
            };
            assert!(
                fits,
                "--{id} shows default {shown}, TrainConfig has {default}"
            );
            checked += 1;
        }
        assert!(checked >= 25, "{checked} defaults checked");
        let model = cmd.get_arguments().find(|a| a.get_id() == "model").unwrap();
        let help = model.get_help().unwrap().to_string();
        for preset in UNetConfig::PRESETS {
            assert!(help.contains(preset), "--model help lacks {preset}: {help}");
        }
    }

    #[test]
    fn flags_that_would_be_ignored_or_misread_are_errors() {
        let e = parse(&["--cond-drop", "0.2"]).unwrap().resolve(None);
        assert!(format!("{:#}", e.unwrap_err()).contains("--class-conditional"));
        parse(&["--cond-drop", "0.2", "--class-conditional"])
            .unwrap()
            .resolve(None)
            .unwrap();
        let e = parse(&["--model", "../run"]).unwrap().resolve(None);
        let e = format!("{:#}", e.unwrap_err());
        assert!(
            e.contains("not a model preset") && e.contains("--init") && e.contains("--resume"),
            "{e}"
        );
    }

    /// `--init PIPELINE_DIR` of a text run brings the directory's text encoder and tokenizer;
    /// flags naming others win, and a directory without them changes nothing.
    #[test]
    fn a_text_run_from_a_pipeline_takes_its_text_encoder_and_tokenizer() {
        let dir = std::env::temp_dir().join(format!("wgpu-diffusion-init-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("text_encoder")).unwrap();
        std::fs::create_dir_all(dir.join("tokenizer")).unwrap();
        std::fs::write(dir.join("text_encoder/config.json"), "{}").unwrap();
        std::fs::write(dir.join("tokenizer/vocab.json"), "{}").unwrap();
        let d = dir.to_str().unwrap();
        let c = parse(&["--text-conditional", "--init", d])
            .unwrap()
            .resolve(None)
            .unwrap();
        assert_eq!(c.text_encoder, Some(dir.join("text_encoder")));
        assert_eq!(c.tokenizer, Some(dir.join("tokenizer")));
        let c = parse(&["--text-conditional", "--init", d, "--tokenizer", "/other"])
            .unwrap()
            .resolve(None)
            .unwrap();
        assert_eq!(c.tokenizer, Some(PathBuf::from("/other")));
        let c = parse(&["--init", d]).unwrap().resolve(None).unwrap();
        assert_eq!((c.text_encoder, c.tokenizer), (None, None));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn super_resolution_defaults_to_the_28x28_preset() {
        let c = parse(&["--task", "sr"]).unwrap().resolve(None).unwrap();
        assert_eq!(c.model, "tiny28");
        let c = parse(&["--task", "sr", "--model", "mnist28"])
            .unwrap()
            .resolve(None)
            .unwrap();
        assert_eq!(c.model, "mnist28");
        let c = parse(&[]).unwrap().resolve(None).unwrap();
        assert_eq!(c.model, "tiny16");
    }
}
