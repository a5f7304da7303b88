//! `shaders/grad_scaler.wgsl`: dynamic loss scaling with `torch.amp.GradScaler`'s semantics,
//! decided on the GPU inside the training step (no readback).
//!
//! A step with a scaler runs: the loss gradient × scale ([`scale_loss_gradient`]); backward;
//! the norm of the unscaled gradients (`adamw::grad_norm_unscaled`, reading the scale from the
//! state); [`grad_scaler_update`], which decides found_inf from that norm, writes AdamW's and
//! the EMA's values for this step (or a skip) into the `hyper` they read, and updates the scale
//! for the next step; then AdamW and the EMA. On a skipped step the parameters, the AdamW moments,
//! AdamW's t and the EMA (values and update count) stay as they were.
//!
//! The state ([`ScalerState`], [`STATE_LEN`] words) lives on the GPU; the host reads it with
//! each loss window (metrics), at checkpoints and on resume. Because t only advances on clean
//! steps, the host writes each step a table ([`scaler_table`]) of the t-dependent AdamW and EMA
//! values for every t the step can have since the last t it read back.

use super::adamw::{AdamwConfig, AdamwHyper, EmaConfig, HYPER_LEN};
use super::{OpResult, expect_distinct, expect_numel, invalid, u32_of};
use crate::gpu::{KernelKey, Recorder, Tensor, grid_1d};

/// torch.amp.GradScaler's constructor arguments (defaults as there).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradScalerConfig {
    pub init_scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u32,
}

impl Default for GradScalerConfig {
    fn default() -> Self {
        GradScalerConfig {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// The GPU state (the WGSL `State` struct, same field order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ScalerState {
    pub scale: f32,
    /// Consecutive clean steps since the scale last changed.
    pub growth_tracker: u32,
    /// AdamW's step count t (and the EMA's update count): clean steps so far.
    pub optimizer_steps: u32,
    pub skipped_total: u32,
    /// Skipped steps since the last clean one.
    pub skipped_in_row: u32,
    /// 1 if a step's t fell outside the host's table (a bug; the run stops).
    pub table_miss: u32,
    pub _pad: [u32; 2],
}

/// Words of the state tensor.
pub const STATE_LEN: usize = std::mem::size_of::<ScalerState>() / 4;

/// Rows the table tensor holds: the t values a step may have since the host last read t back.
/// The training loop reads the state with every loss window; past this many steps without a
/// readback it reads the state synchronously (`train::Trainer`).
pub const MAX_TABLE_ROWS: usize = 1024;

/// Elements of the table tensor: first t, row count, then 3 values per row.
pub const TABLE_LEN: usize = 2 + 3 * MAX_TABLE_ROWS;

impl ScalerState {
    /// A scaler at `init_scale` after `optimizer_steps` optimizer steps.
    pub fn fresh(init_scale: f64, optimizer_steps: u32) -> ScalerState {
        ScalerState {
            scale: init_scale as f32,
            optimizer_steps,
            ..Default::default()
        }
    }

    pub fn words(&self) -> Vec<u32> {
        bytemuck::cast_slice(std::slice::from_ref(self)).to_vec()
    }

    /// The state from its words (as read back from the state tensor).
    pub fn from_words(words: &[u32]) -> Option<ScalerState> {
        (words.len() >= STATE_LEN)
            .then(|| bytemuck::pod_read_unaligned(bytemuck::cast_slice(&words[..STATE_LEN])))
    }
}

/// The table tensor's contents for a step at learning rate `lr` whose t is one of
/// `first_t .. first_t + rows`: per t, AdamW's step size lr / (1 − β1^t), sqrt(1 − β2^t) and
/// 1 − the EMA decay of update t, each formed in f64 and rounded once as [`AdamwHyper::new`]
/// does. `rows` is at most [`MAX_TABLE_ROWS`].
pub fn scaler_table(
    adam: &AdamwConfig,
    ema: &EmaConfig,
    lr: f64,
    first_t: u32,
    rows: usize,
) -> Vec<f32> {
    assert!(
        (1..=MAX_TABLE_ROWS).contains(&rows),
        "scaler table: {rows} rows"
    );
    let mut out = vec![f32::from_bits(first_t), f32::from_bits(rows as u32)];
    for t in first_t..first_t + rows as u32 {
        let h = AdamwHyper::new(adam, lr, t, ema.get_decay(t as u64));
        out.extend([h.step_size, h.bias_correction2_sqrt, h.ema_one_minus_decay]);
    }
    out
}

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct ScalerParams {
    n: u32,
    growth_interval: u32,
    growth_factor: f32,
    backoff_factor: f32,
}

const WG: usize = 256;

fn key(entry: &'static str) -> KernelKey {
    KernelKey::new("grad_scaler", entry)
}

fn expect_state(op: &str, state: &Tensor) -> OpResult {
    expect_numel(op, "state", state, STATE_LEN)
}

/// grads ×= the scaler's scale (torch: `scaler.scale(loss).backward()`, applied to the loss
/// gradient, which backward carries to every gradient).
pub fn scale_loss_gradient(rec: &mut Recorder, state: &Tensor, grads: &Tensor) -> OpResult {
    const OP: &str = "scale_loss_gradient";
    expect_state(OP, state)?;
    expect_distinct(OP, state, grads)?;
    let n = grads.numel();
    let p = ScalerParams {
        n: u32_of(OP, "n", n)?,
        ..Default::default()
    };
    rec.dispatch(
        key(OP),
        &p,
        &[(7, state.into()), (2, grads.into())],
        grid_1d(n.div_ceil(WG)),
    );
    Ok(())
}

/// After `adamw::grad_norm_unscaled` wrote `clip` = [clip factor, norm]: found_inf = the norm
/// is not finite; `hyper` = `host_hyper` with the table row of this step's t, or a skip; `clip[0]`
/// gains the unscaling (1/scale); the state advances as `scaler.step(opt); scaler.update()`.
pub fn grad_scaler_update(
    rec: &mut Recorder,
    cfg: &GradScalerConfig,
    state: &Tensor,
    clip: &Tensor,
    (host_hyper, table): (&Tensor, &Tensor),
    hyper: &Tensor,
) -> OpResult {
    const OP: &str = "grad_scaler_update";
    expect_state(OP, state)?;
    expect_numel(OP, "clip", clip, 2)?;
    expect_numel(OP, "host_hyper", host_hyper, HYPER_LEN)?;
    expect_numel(OP, "hyper", hyper, HYPER_LEN)?;
    expect_numel(OP, "table", table, TABLE_LEN)?;
    for out in [state, clip, hyper] {
        for input in [host_hyper, table] {
            expect_distinct(OP, input, out)?;
        }
    }
    expect_distinct(OP, state, clip)?;
    expect_distinct(OP, state, hyper)?;
    expect_distinct(OP, clip, hyper)?;
    if !(cfg.growth_factor > 1.0 && cfg.backoff_factor > 0.0 && cfg.backoff_factor < 1.0) {
        return Err(invalid(format!(
            "{OP}: growth factor {} must be > 1 and backoff factor {} in (0, 1)",
            cfg.growth_factor, cfg.backoff_factor
        )));
    }
    let p = ScalerParams {
        n: 1,
        growth_interval: cfg.growth_interval.max(1),
        growth_factor: cfg.growth_factor as f32,
        backoff_factor: cfg.backoff_factor as f32,
    };
    rec.dispatch(
        key(OP),
        &p,
        &[
            (1, state.into()),
            (3, clip.into()),
            (4, host_hyper.into()),
            (5, table.into()),
            (6, hyper.into()),
        ],
        [1, 1, 1],
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_are_adamw_hyper_values_of_each_t() {
        let (adam, ema) = (AdamwConfig::default(), EmaConfig::default());
        let table = scaler_table(&adam, &ema, 3e-4, 7, 3);
        assert_eq!(table.len(), 2 + 9);
        assert_eq!((table[0].to_bits(), table[1].to_bits()), (7, 3));
        for (row, t) in (7..10).enumerate() {
            let h = AdamwHyper::new(&adam, 3e-4, t, ema.get_decay(t as u64));
            let got = &table[2 + 3 * row..5 + 3 * row];
            assert_eq!(
                got,
                [h.step_size, h.bias_correction2_sqrt, h.ema_one_minus_decay]
            );
        }
    }

    #[test]
    fn state_words_round_trip() {
        let mut s = ScalerState::fresh(65536.0, 12);
        s.skipped_total = 3;
        let back = ScalerState::from_words(&s.words()).unwrap();
        assert_eq!(back, s);
        assert_eq!(s.words().len(), STATE_LEN);
        assert!(ScalerState::from_words(&[0; 3]).is_none());
    }
}
