//! The training step's GradScaler, host side (`train.grad_scaler`): the GPU state
//! (`ops::grad_scaler`) allocated once, the per-step table of AdamW's and the EMA's t-dependent
//! values, what the host knows of t (read back with every loss window), the run's stop rules,
//! and the state's place in checkpoints.

use anyhow::{Result, anyhow, bail};

use super::config::TrainConfig;
use crate::gpu::{Gpu, Tensor};
use crate::ops::adamw::{AdamwConfig, EmaConfig, HYPER_LEN};
use crate::ops::grad_scaler::{
    GradScalerConfig, MAX_TABLE_ROWS, STATE_LEN, ScalerState, TABLE_LEN, scaler_table,
};

/// The run stops when this many steps in a row were skipped.
pub const MAX_SKIPPED_IN_ROW: u32 = 100;

/// The run stops when the scale falls below this (2^-24, f16's smallest subnormal).
pub const MIN_SCALE: f32 = 1.0 / 16_777_216.0;

/// A step's GradScaler: its GPU tensors and the last state the host read.
pub struct StepScaler {
    pub cfg: GradScalerConfig,
    /// [`ScalerState`] on the GPU; element 0 (the scale) is what the gradient norm unscales by.
    pub state: Tensor,
    /// Written by the host each step ([`scaler_table`]).
    table: Tensor,
    /// What AdamW and the EMA read: the host's values with this step's t-dependent ones, or a
    /// skip (written by `grad_scaler_update`).
    pub hyper: Tensor,
    /// (step, the state after it): the last state read back.
    known: (u64, ScalerState),
}

impl StepScaler {
    /// The scaler of a run with `cfg.grad_scaler` (None without), fresh at step 0.
    pub fn new(gpu: &Gpu, cfg: &TrainConfig) -> Result<Option<StepScaler>> {
        if !cfg.grad_scaler {
            return Ok(None);
        }
        let scaler_cfg = GradScalerConfig {
            init_scale: cfg.grad_scaler_init_scale,
            growth_interval: cfg.grad_scaler_growth_interval as u32,
            ..Default::default()
        };
        StepScaler::with_config(gpu, scaler_cfg).map(Some)
    }

    /// A scaler with `cfg`, fresh at step 0.
    pub fn with_config(gpu: &Gpu, cfg: GradScalerConfig) -> Result<StepScaler> {
        let mut scaler = StepScaler {
            cfg,
            state: gpu.tensor(&[STATE_LEN], "grad scaler state"),
            table: gpu.tensor(&[TABLE_LEN], "grad scaler t table"),
            hyper: gpu.tensor(&[HYPER_LEN], "adamw hyper (grad scaler)"),
            known: (0, ScalerState::default()),
        };
        scaler.reset(gpu, 0, ScalerState::fresh(cfg.init_scale, 0))?;
        Ok(scaler)
    }

    /// Sets the state after `step` (a fresh run, a resumed one, or a test).
    pub fn reset(&mut self, gpu: &Gpu, step: u64, state: ScalerState) -> Result<()> {
        gpu.write_u32(&self.state, &state.words())?;
        self.known = (step, state);
        Ok(())
    }

    /// The state now (waits for everything submitted).
    pub fn read(&self, gpu: &Gpu) -> Result<ScalerState> {
        let words = gpu.read_u32(&self.state)?;
        ScalerState::from_words(&words).ok_or_else(|| anyhow!("grad scaler state: short read"))
    }

    /// The table tensor `grad_scaler_update` reads.
    pub fn table(&self) -> &Tensor {
        &self.table
    }

    /// The last state read back.
    pub fn last_read(&self) -> ScalerState {
        self.known.1
    }

    /// Optimizer steps (AdamW's t) as of the last state read.
    pub fn known_optimizer_steps(&self) -> u64 {
        self.known.1.optimizer_steps as u64
    }

    /// Writes the table for `step`, the step about to be submitted (steps before it are all
    /// submitted): its t is one past the last known t plus at most the clean steps since.
    pub fn write_table(
        &mut self,
        gpu: &Gpu,
        step: u64,
        (adam, ema): (&AdamwConfig, &EmaConfig),
        lr: f64,
    ) -> Result<()> {
        if step - self.known.0 > MAX_TABLE_ROWS as u64 {
            let now = self.read(gpu)?;
            self.note(step - 1, now)?;
        }
        let rows = (step - self.known.0) as usize;
        let first_t = self.known.1.optimizer_steps + 1;
        let table = scaler_table(adam, ema, lr, first_t, rows);
        gpu.write(
            &self.table.view(0, &[table.len()], "grad scaler t table"),
            &table,
        )?;
        Ok(())
    }

    /// Records the state read back after `step` (with a loss window, or synchronously).
    pub fn note(&mut self, step: u64, state: ScalerState) -> Result<()> {
        if state.table_miss != 0 {
            bail!(
                "internal error: the grad scaler's optimizer step count left the host's table by step {step}; please report it"
            );
        }
        if step >= self.known.0 {
            self.known = (step, state);
        }
        Ok(())
    }

    /// The checkpoint metadata value of `state`.
    pub fn to_metadata(state: &ScalerState) -> String {
        serde_json::json!({
            "scale": state.scale,
            "growth_tracker": state.growth_tracker,
            "optimizer_steps": state.optimizer_steps,
            "skipped_total": state.skipped_total,
            "skipped_in_row": state.skipped_in_row,
        })
        .to_string()
    }

    /// The state a checkpoint's `grad_scaler` metadata records.
    pub fn from_metadata(text: &str) -> Result<ScalerState> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| anyhow!("checkpoint metadata `grad_scaler`: {e}"))?;
        let word = |k: &str| -> Result<u32> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| anyhow!("checkpoint metadata `grad_scaler`: `{k}` missing"))
        };
        let scale = v
            .get("scale")
            .and_then(|x| x.as_f64())
            .ok_or_else(|| anyhow!("checkpoint metadata `grad_scaler`: `scale` missing"))?;
        Ok(ScalerState {
            scale: scale as f32,
            growth_tracker: word("growth_tracker")?,
            optimizer_steps: word("optimizer_steps")?,
            skipped_total: word("skipped_total")?,
            skipped_in_row: word("skipped_in_row")?,
            ..Default::default()
        })
    }
}

/// What a `train` run whose gradients keep overflowing can change.
pub const UNET_ADVICE: &str = "Lower --lr or set --max-grad-norm.";

/// The stop rules of a scaled run: too many skipped steps in a row (the error ends with
/// `advice`, the flags of the command that can help), or a scale too small for any gradient
/// to survive.
pub fn check_health(step: u64, state: &ScalerState, advice: &str) -> Result<()> {
    if state.skipped_in_row >= MAX_SKIPPED_IN_ROW {
        bail!(
            "{} steps in a row up to step {step} had inf/NaN gradients and were skipped (loss scale now {}); training stopped. {advice}",
            state.skipped_in_row,
            state.scale
        );
    }
    if state.scale < MIN_SCALE {
        bail!(
            "the loss scale fell to {} (below 2^-24) at step {step}: the gradients overflow at any scale; training stopped. Lower --lr.",
            state.scale
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_and_the_stop_rules_hold() {
        let mut s = ScalerState::fresh(1024.0, 40);
        s.skipped_total = 3;
        s.growth_tracker = 7;
        let back = StepScaler::from_metadata(&StepScaler::to_metadata(&s)).unwrap();
        assert_eq!(back, s);
        assert!(StepScaler::from_metadata("{\"scale\": 1}").is_err());
        assert!(check_health(5, &s, UNET_ADVICE).is_ok());
        s.skipped_in_row = MAX_SKIPPED_IN_ROW;
        let e = check_health(5, &s, UNET_ADVICE).unwrap_err().to_string();
        assert!(
            e.contains("100 steps in a row") && e.ends_with(UNET_ADVICE),
            "{e}"
        );
        let tiny = ScalerState::fresh(2f64.powi(-25), 0);
        let e = check_health(9, &tiny, UNET_ADVICE).unwrap_err().to_string();
        assert!(e.contains("below 2^-24"), "{e}");
    }
}
