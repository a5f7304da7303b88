//! `wgpu-diffusion train`: flags, TOML config file merging, progress display.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use crate::diffusion::{BetaSchedule, PredictionType};
use crate::train::{LrSchedule, Progress, TrainConfig};

/// Training flags; each overrides the same key of `--config-file` (TOML), which overrides the
/// defaults.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TrainArgs {
    /// TOML file with any of the keys below (snake_case, e.g. `batch_size = 64`).
    #[arg(long)]
    pub config_file: Option<PathBuf>,
    /// Continue the run in this folder from its latest checkpoint.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Model preset: tiny16 (16x16 MNIST, fast), mnist28, cifar32 (google/ddpm-cifar10-32).
    #[arg(long)]
    pub model: Option<String>,
    /// A diffusers UNet2DModel config.json instead of a preset.
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// Fine-tune from a diffusers model directory (config.json + diffusion_pytorch_model.safetensors).
    #[arg(long)]
    pub init: Option<PathBuf>,
    #[arg(long)]
    pub steps: Option<u64>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches accumulated per optimizer step.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub lr_warmup_steps: Option<u64>,
    #[arg(long, value_enum)]
    pub lr_schedule: Option<LrSchedule>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm (0 = off).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    #[arg(long, value_enum)]
    pub beta_schedule: Option<BetaSchedule>,
    #[arg(long)]
    pub num_train_timesteps: Option<usize>,
    #[arg(long, value_enum)]
    pub prediction_type: Option<PredictionType>,
    /// min-SNR-γ loss weighting (e.g. 5; 0 = off).
    #[arg(long)]
    pub snr_gamma: Option<f64>,
    /// Keep an EMA of the weights (samples and the exported model use it).
    #[arg(long)]
    pub ema: Option<bool>,
    #[arg(long)]
    pub ema_decay: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Steps between sample grids (plus early grids at 100, 250, 500 and one at the end; 0 = no grids).
    #[arg(long)]
    pub sample_every: Option<u64>,
    /// DDIM steps per sample grid.
    #[arg(long)]
    pub sample_steps: Option<usize>,
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Checkpoints kept (oldest deleted first).
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    /// Steps between loss readbacks and log lines.
    #[arg(long)]
    pub log_every: Option<u64>,
    /// Run folder (default runs/run-<unix time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Train on a folder of PNG/JPEG images (recursive) instead of the embedded MNIST.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Random horizontal flips (image folders).
    #[arg(long)]
    pub hflip: bool,
    /// Stop at the first unreadable image instead of skipping it.
    #[arg(long)]
    pub strict: bool,
    /// Train a class-conditional model: MNIST's digits, or with --data one sub-folder per class.
    #[arg(long)]
    pub class_conditional: bool,
    /// `sr`: train a super-resolution model (input: noisy image + bicubic upsampling of its
    /// average-pooled low-resolution version).
    #[arg(long, value_enum)]
    pub task: Option<crate::train::config::Task>,
    /// Super-resolution factor for --task sr (2 or 4).
    #[arg(long)]
    pub scale: Option<usize>,
    /// With --class-conditional: probability of dropping a label to the null class, which trains
    /// the unconditional branch classifier-free guidance needs (0 = none).
    #[arg(long)]
    pub cond_drop: Option<f64>,
}

impl TrainArgs {
    /// defaults ← config file ← flags.
    pub fn resolve(&self, base: Option<TrainConfig>) -> anyhow::Result<TrainConfig> {
        let mut c = match (&self.config_file, base) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("--config-file {}: {e}", path.display()))?;
                toml::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("--config-file {}: {e}", path.display()))?
            }
            (None, Some(b)) => b,
            (None, None) => TrainConfig::default(),
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
        set!(keep_checkpoints, log_every, cond_drop, task, scale);
        if self.model_config.is_some() {
            c.model_config = self.model_config.clone();
        }
        if self.init.is_some() {
            c.init = self.init.clone();
        }
        if self.out.is_some() {
            c.out = self.out.clone();
        }
        if self.data.is_some() {
            c.data = self.data.clone();
        }
        c.hflip |= self.hflip;
        c.strict |= self.strict;
        c.class_conditional |= self.class_conditional;
        c.validate()
            .map_err(|e| anyhow::anyhow!("invalid training options: {e}"))?;
        Ok(c)
    }
}

/// A progress bar on terminals; plain log lines otherwise (CI, pipes).
pub struct ConsoleProgress {
    bar: Option<indicatif::ProgressBar>,
    last_line: Instant,
    total: u64,
    last_loss: Option<f32>,
    last_ips: f64,
}

impl ConsoleProgress {
    pub fn new() -> ConsoleProgress {
        ConsoleProgress {
            bar: None,
            last_line: Instant::now(),
            total: 0,
            last_loss: None,
            last_ips: 0.0,
        }
    }
}

impl Default for ConsoleProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for ConsoleProgress {
    fn start(&mut self, first_step: u64, total: u64) {
        self.total = total;
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            bar.set_position(first_step);
            self.bar = Some(bar);
        } else {
            eprintln!("training steps {}..{total}", first_step + 1);
        }
    }

    fn update(&mut self, step: u64, loss: Option<f32>, lr: f64, images_per_s: f64) {
        if loss.is_some() {
            self.last_loss = loss;
            self.last_ips = images_per_s;
        }
        let msg = format!(
            "loss {} lr {lr:.2e} {:.0} img/s",
            self.last_loss
                .map(|l| format!("{l:.4}"))
                .unwrap_or_else(|| "-".into()),
            self.last_ips
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(msg);
            }
            None => {
                if loss.is_some()
                    && (self.last_line.elapsed().as_secs_f64() >= 5.0 || step == self.total)
                {
                    self.last_line = Instant::now();
                    eprintln!("step {step}/{} {msg}", self.total);
                }
            }
        }
    }

    fn message(&mut self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}
