//! The loaders a user's file goes through, one entry point per kind of file, for the fuzz
//! harness (`examples/fuzz_loaders.rs`) and the regression cases it found
//! (`tests/fixtures/fuzz/`, run by the GPU tests): whatever the bytes, every loader returns a
//! value or an error, never panics, hangs or allocates from an unchecked size field.

use std::path::Path;
use std::sync::Arc;

use crate::diffusion::scheduler::{SamplerKind, SamplingSchedule, SchedulerConfig};
use crate::gpu::{Gpu, GpuError};
use crate::io::model_dir::model_weights;
use crate::io::tensors::LoadedTensors;
use crate::nn::{ParamStore, UNet, UNetConfig};
use crate::sample::ModelSource;
use crate::train::TrainConfig;

/// The kinds of file a user hands the tool.
pub const TARGETS: [&str; 7] = [
    "weights",
    "checkpoint",
    "config",
    "vae_config",
    "scheduler",
    "toml",
    "image",
];

/// What the loaders need besides the input: parameter layouts to load weights into.
pub struct LoaderFixture {
    /// The layout of the diffusers-written model in tests/fixtures/samplers/eps.
    pub fixture_store: ParamStore,
    /// The layout of [`small_config`]'s model (checkpoint seeds).
    pub small_store: ParamStore,
}

impl LoaderFixture {
    pub fn new(gpu: &Arc<Gpu>, fixture_config: &UNetConfig) -> Result<LoaderFixture, GpuError> {
        Ok(LoaderFixture {
            fixture_store: UNet::new(gpu, fixture_config, 1)?.params,
            small_store: UNet::new(gpu, &small_config(), 1)?.params,
        })
    }
}

/// A small model (a few thousand parameters) whose checkpoints seed the checkpoint target.
pub fn small_config() -> UNetConfig {
    let mut c = UNetConfig::preset("tiny16").expect("preset");
    c.sample_size = 8;
    c.block_out_channels = vec![8, 8];
    c.norm_num_groups = 4;
    c
}

/// Runs `input` as a file of kind `target` through every loader that reads such a file.
/// Errors are the expected outcome for a damaged file and are dropped.
pub fn exercise(target: &str, input: &[u8], fx: &LoaderFixture) {
    let path = Path::new("fuzz-input");
    let text = || String::from_utf8_lossy(input).into_owned();
    match target {
        "weights" => {
            if let Ok(t) = LoadedTensors::from_bytes(path, input.to_vec()) {
                let _ = model_weights(&t, &fx.fixture_store);
                for name in t.names() {
                    let _ = t.get(&name);
                }
            }
        }
        "checkpoint" => {
            if let Ok(t) = LoadedTensors::from_bytes(path, input.to_vec()) {
                for prefix in ["param", "ema", "exp_avg", "exp_avg_sq"] {
                    let _ = t.flat(&fx.small_store, prefix);
                }
                let meta = t.metadata();
                for k in ["step", "data_position"] {
                    let _ = meta.get(k).map(|v| v.parse::<u64>());
                }
                if let Ok(source) = ModelSource::from_checkpoint_tensors(t, false)
                    && source.config == small_config()
                {
                    let _ = source.weights(&fx.small_store);
                    let _ = source.class_index("all");
                    let _ = source.class_index("3");
                }
            }
        }
        "config" => {
            if let Ok(c) = UNetConfig::from_json(&text()) {
                let _ = UNetConfig::from_json(&c.to_json());
            }
        }
        "vae_config" => {
            if let Ok(c) = crate::nn::VaeConfig::from_json(&text()) {
                let _ = c.latent_size();
                let _ = crate::nn::VaeConfig::from_json(&c.to_json());
            }
        }
        "scheduler" => {
            if let Ok(c) = SchedulerConfig::from_json(&text()) {
                for kind in [
                    SamplerKind::Ddpm,
                    SamplerKind::Ddim,
                    SamplerKind::DpmSolverPp2m,
                    SamplerKind::Euler,
                    SamplerKind::Heun,
                ] {
                    for steps in [1, 7, 50, 1000] {
                        let _ = SamplingSchedule::new(&c, kind, steps, None, 0.0);
                    }
                }
                let _ = SamplingSchedule::repaint(&c, SamplerKind::Ddim, 25, 0.0, 5, 3);
            }
        }
        "toml" => {
            if let Ok(c) = toml::from_str::<TrainConfig>(&text())
                && c.validate().is_ok()
            {
                let _ = c.validate_rng_range(28 * 28);
                for s in [0, 1, c.lr_warmup_steps, c.steps / 2, c.steps] {
                    let _ = c.lr_at(s);
                }
                let _ = crate::diffusion::NoiseSchedule::new(
                    c.beta_schedule,
                    c.num_train_timesteps,
                    c.beta_start,
                    c.beta_end,
                );
            }
        }
        "image" => {
            if let Ok(img) = crate::data::decode_image(input) {
                let _ = crate::data::to_model_input(img, 16, 1);
            }
        }
        other => panic!("unknown loader target `{other}` (one of {TARGETS:?})"),
    }
}
