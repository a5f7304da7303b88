//! `shaders/loss.wgsl`: mean squared error (torch `mse_loss`, reduction "mean") with optional
//! per-sample weights, the VAE's L1 and L2 reconstruction losses (summed per image, averaged
//! over the batch), and their gradients.
//!
//! loss = (1/N) Σ_i w_b(i) (pred_i − target_i)², N = numel, w = 1 without weights. The sum is a
//! deterministic two-stage reduction: fixed chunks of [`CHUNK`] elements per workgroup, a fixed
//! tree inside each, then one workgroup over the partials, so the result's bits depend only on
//! the inputs (never on scheduling). No float atomics.

use super::{OpResult, expect_distinct, expect_numel, invalid, u32_of};
use crate::gpu::{KernelKey, Recorder, Tensor, grid_1d};

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct LossParams {
    pub n: u32,
    pub per_sample: u32,
    pub count: f32,
    pub factor: f32,
}

const WG: usize = 256;
/// Elements per stage-1 workgroup (`WG * ITEMS` in the shader).
pub const CHUNK: usize = 256 * 8;

fn key(entry: &'static str) -> KernelKey {
    KernelKey::new("loss", entry)
}

/// Number of stage-1 partial sums for `n` elements.
pub fn partials_len(n: usize) -> usize {
    n.div_ceil(CHUNK).max(1)
}

/// Checks pred/target/weights and returns (N, elements per sample).
fn check(
    op: &str,
    pred: &Tensor,
    target: &Tensor,
    weights: Option<&Tensor>,
) -> OpResult<(usize, usize)> {
    let n = pred.numel();
    if n == 0 || pred.shape().is_empty() {
        return Err(invalid(format!(
            "{op}: `pred` (`{}`) is empty, shape {:?}",
            pred.label(),
            pred.shape()
        )));
    }
    expect_numel(op, "target", target, n)?;
    let b = pred.shape()[0];
    if let Some(w) = weights {
        expect_numel(op, "weights", w, b)?;
    }
    Ok((n, n / b))
}

/// Records loss[0] = mean_i w_b (pred_i − target_i)² (`loss`: 1 element; `weights`: [B] with
/// B = pred.shape()[0], or None for w = 1). Allocates its partial-sum scratch tensor now.
pub fn mse_loss(
    rec: &mut Recorder,
    pred: &Tensor,
    target: &Tensor,
    weights: Option<&Tensor>,
    loss: &Tensor,
) -> OpResult {
    squared_error_sum(rec, "mse_loss", pred, target, weights, loss, None)
}

/// Records loss[0] = (1/B) Σ_i (pred_i − target_i)² (B = pred.shape()[0]): the squared error
/// summed over each image and averaged over the batch (the VAE's `--rec-loss l2`).
pub fn l2_loss(rec: &mut Recorder, pred: &Tensor, target: &Tensor, loss: &Tensor) -> OpResult {
    let batch = pred.shape().first().copied().unwrap_or(0);
    squared_error_sum(rec, "l2_loss", pred, target, None, loss, Some(batch))
}

/// Σ_i w_b (pred_i − target_i)² divided by N (`per_batch` None, torch's mean) or by B.
fn squared_error_sum(
    rec: &mut Recorder,
    op: &str,
    pred: &Tensor,
    target: &Tensor,
    weights: Option<&Tensor>,
    loss: &Tensor,
    per_batch: Option<usize>,
) -> OpResult {
    let (n, per_sample) = check(op, pred, target, weights)?;
    expect_numel(op, "loss", loss, 1)?;
    for t in [Some(pred), Some(target), weights].into_iter().flatten() {
        expect_distinct(op, t, loss)?;
    }
    let groups = partials_len(n);
    let partials = rec.gpu.tensor(&[groups], "squared error partials");
    let count = per_batch.unwrap_or(n) as f32;
    let p = LossParams {
        n: u32_of(op, "n", n)?,
        per_sample: u32_of(op, "per_sample", per_sample)?,
        count,
        factor: 0.0,
    };
    let mut bindings = vec![
        (1, pred.into()),
        (2, target.into()),
        (4, (&partials).into()),
    ];
    let entry = match weights {
        Some(w) => {
            bindings.push((3, w.into()));
            "mse_partial_weighted"
        }
        None => "mse_partial",
    };
    rec.dispatch(key(entry), &p, &bindings, grid_1d(groups));
    sum_partials(rec, &partials, count, loss);
    Ok(())
}

/// Stage 2 of a two-stage sum: result[0] = (Σ partials) / count, one workgroup, a fixed tree.
pub fn sum_partials(rec: &mut Recorder, partials: &Tensor, count: f32, result: &Tensor) {
    let p = LossParams {
        n: partials.numel() as u32,
        count,
        ..Default::default()
    };
    rec.dispatch(
        key("sum_finish"),
        &p,
        &[(5, partials.into()), (6, result.into())],
        [1, 1, 1],
    );
}

/// Records loss[0] = (1/B) Σ_i |pred_i − target_i| (B = pred.shape()[0]): the L1 distance summed
/// over each image and averaged over the batch.
pub fn l1_loss(rec: &mut Recorder, pred: &Tensor, target: &Tensor, loss: &Tensor) -> OpResult {
    const OP: &str = "l1_loss";
    let (n, _) = check(OP, pred, target, None)?;
    expect_numel(OP, "loss", loss, 1)?;
    for t in [pred, target] {
        expect_distinct(OP, t, loss)?;
    }
    let groups = partials_len(n);
    let partials = rec.gpu.tensor(&[groups], "l1 partials");
    let p = LossParams {
        n: u32_of(OP, "n", n)?,
        ..Default::default()
    };
    rec.dispatch(
        key("l1_partial"),
        &p,
        &[
            (1, pred.into()),
            (2, target.into()),
            (4, (&partials).into()),
        ],
        grid_1d(groups),
    );
    sum_partials(rec, &partials, pred.shape()[0] as f32, loss);
    Ok(())
}

/// dpred_i = scale · sign(pred_i − target_i) / B (sign(0) = 0). Overwrites `dpred`.
pub fn l1_backward(
    rec: &mut Recorder,
    pred: &Tensor,
    target: &Tensor,
    scale: f32,
    dpred: &Tensor,
) -> OpResult {
    const OP: &str = "l1_backward";
    let (n, _) = check(OP, pred, target, None)?;
    expect_numel(OP, "dpred", dpred, n)?;
    for t in [pred, target] {
        expect_distinct(OP, t, dpred)?;
    }
    let p = LossParams {
        n: u32_of(OP, "n", n)?,
        factor: (scale as f64 / pred.shape()[0] as f64) as f32,
        ..Default::default()
    };
    rec.dispatch(
        key("l1_backward"),
        &p,
        &[(1, pred.into()), (2, target.into()), (7, dpred.into())],
        grid_1d(n.div_ceil(WG)),
    );
    Ok(())
}

/// dpred_i = scale · 2 w_b (pred_i − target_i) / N (torch `mse_loss` backward with
/// grad_output = `scale`; `scale` = 1 for the plain gradient). Overwrites `dpred`.
pub fn mse_backward(
    rec: &mut Recorder,
    pred: &Tensor,
    target: &Tensor,
    weights: Option<&Tensor>,
    scale: f32,
    dpred: &Tensor,
) -> OpResult {
    squared_error_backward(
        rec,
        "mse_backward",
        pred,
        target,
        weights,
        scale,
        dpred,
        None,
    )
}

/// dpred_i = scale · 2 (pred_i − target_i) / B (B = pred.shape()[0]): the gradient of
/// [`l2_loss`]. Overwrites `dpred`.
pub fn l2_backward(
    rec: &mut Recorder,
    pred: &Tensor,
    target: &Tensor,
    scale: f32,
    dpred: &Tensor,
) -> OpResult {
    let batch = pred.shape().first().copied().unwrap_or(0);
    squared_error_backward(
        rec,
        "l2_backward",
        pred,
        target,
        None,
        scale,
        dpred,
        Some(batch),
    )
}

/// dpred_i = scale · 2 w_b (pred_i − target_i) / D, D = N (`per_batch` None) or B.
#[allow(clippy::too_many_arguments)]
fn squared_error_backward(
    rec: &mut Recorder,
    op: &str,
    pred: &Tensor,
    target: &Tensor,
    weights: Option<&Tensor>,
    scale: f32,
    dpred: &Tensor,
    per_batch: Option<usize>,
) -> OpResult {
    let (n, per_sample) = check(op, pred, target, weights)?;
    expect_numel(op, "dpred", dpred, n)?;
    for t in [Some(pred), Some(target), weights].into_iter().flatten() {
        expect_distinct(op, t, dpred)?;
    }
    let divisor = per_batch.unwrap_or(n);
    let p = LossParams {
        n: u32_of(op, "n", n)?,
        per_sample: u32_of(op, "per_sample", per_sample)?,
        count: divisor as f32,
        // torch: norm = 2. / numel in double, then one multiply by grad_output.
        factor: (2.0 / divisor as f64 * scale as f64) as f32,
    };
    let mut bindings = vec![(1, pred.into()), (2, target.into()), (7, dpred.into())];
    let entry = match weights {
        Some(w) => {
            bindings.push((3, w.into()));
            "mse_backward_weighted"
        }
        None => "mse_backward",
    };
    rec.dispatch(key(entry), &p, &bindings, grid_1d(n.div_ceil(WG)));
    Ok(())
}
