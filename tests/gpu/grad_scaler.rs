//! The training step's GradScaler (ops::grad_scaler, train::loss_scaling) on tiny16: a step
//! whose loss overflows is skipped with nothing but the scale, the skip counts and the position
//! changed; clean steps with a scale are bit for bit the steps without one (unscaling by a power
//! of two is exact, clipping sees the unscaled norm, AdamW's t counts only the steps taken); the
//! scale follows torch's GradScaler (reference::grad_scaler).

use std::sync::Arc;

use wgpu_diffusion::gpu::Gpu;
use wgpu_diffusion::nn::UNetConfig;
use wgpu_diffusion::nn::init::default_init;
use wgpu_diffusion::ops::grad_scaler::ScalerState;
use wgpu_diffusion::reference::grad_scaler::GradScaler;
use wgpu_diffusion::train::{LrSchedule, TrainConfig, Trainer};

use crate::common::*;

fn trainer(g: &Arc<Gpu>, grad_scaler: bool) -> Trainer {
    let model = UNetConfig::preset("tiny16").unwrap();
    let cfg = TrainConfig {
        model: "tiny16".into(),
        batch_size: 4,
        lr: 2e-3,
        lr_warmup_steps: 2,
        lr_schedule: LrSchedule::Cosine,
        // Small enough that the clip factor is below 1: clipping must see the unscaled norm.
        max_grad_norm: 0.05,
        log_every: 1,
        grad_scaler,
        grad_scaler_growth_interval: 2,
        ..Default::default()
    };
    let t = Trainer::new(g.clone(), cfg, &model).unwrap();
    t.set_weights(&default_init(&t.unet.params, 0)).unwrap();
    t
}

/// Parameters, AdamW moments and EMA, as read back.
fn optimizer_state(g: &Arc<Gpu>, t: &Trainer) -> [Vec<f32>; 4] {
    [
        read(g, t.unet.params.params()),
        read(g, &t.exp_avg),
        read(g, &t.exp_avg_sq),
        read(g, &t.ema),
    ]
}

fn assert_same_bits(what: &str, a: &[Vec<f32>; 4], b: &[Vec<f32>; 4]) {
    for (name, (x, y)) in ["params", "exp_avg", "exp_avg_sq", "ema"]
        .iter()
        .zip(a.iter().zip(b))
    {
        let differing = x
            .iter()
            .zip(y)
            .filter(|(p, q)| p.to_bits() != q.to_bits())
            .count();
        let max = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert_eq!(
            differing,
            0,
            "{what}: {name} differs in {differing} of {} values (max |diff| {max:e}; first {:?} vs {:?})",
            x.len(),
            &x[..4],
            &y[..4]
        );
    }
}

fn scaler_state(g: &Arc<Gpu>, t: &Trainer) -> ScalerState {
    t.scaler.as_ref().expect("a scaler").read(g).unwrap()
}

fn expect_state(what: &str, got: ScalerState, want: &GradScaler) {
    assert_eq!(
        (
            got.scale as f64,
            got.growth_tracker,
            got.optimizer_steps,
            got.skipped_total,
            got.skipped_in_row,
            got.table_miss
        ),
        (
            want.scale,
            want.growth_tracker,
            want.optimizer_steps,
            want.skipped_total,
            want.skipped_in_row,
            0
        ),
        "{what}: the GPU scaler's state (scale, growth tracker, t, skipped, in a row, table miss)"
    );
}

#[test]
fn an_overflowing_step_is_skipped_and_clean_steps_match_the_unscaled_run() {
    let g = gpu();
    let mut scaled = trainer(&g, true);
    let mut plain = trainer(&g, false);
    let n: usize = scaled.unet.output.shape().iter().product();
    let batch = |seed: u64| -> Vec<f32> {
        random(n, seed)
            .iter()
            .map(|&v| (2.0 * v - 1.0) as f32)
            .collect()
    };
    let mut reference = GradScaler::new(65536.0, 2);
    let before = optimizer_state(&g, &scaled);

    // Step 1: images near f32's largest value overflow the forward pass, so the loss and every
    // gradient are inf or NaN.
    scaled.submit_step(&[vec![3.0e38; n]], &[]).unwrap();
    reference.step(false);
    expect_state("after the overflow", scaler_state(&g, &scaled), &reference);
    assert_same_bits(
        "a skipped step changes nothing",
        &optimizer_state(&g, &scaled),
        &before,
    );
    assert_eq!(scaled.step, 1, "the step (data, RNG, schedule) advances");
    let (ready, submission) = scaled.request_losses();
    g.device
        .poll(wgpu::PollType::Wait {
            submission_index: Some(submission),
            timeout: None,
        })
        .unwrap();
    g.device
        .poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: None,
        })
        .unwrap();
    assert!(ready.load(std::sync::atomic::Ordering::Acquire));
    let logged = scaled.read_losses().unwrap()[0];
    assert!(
        !logged.loss.is_finite(),
        "the overflowing loss: {}",
        logged.loss
    );
    assert_eq!(logged.scaler.unwrap().skipped_total, 1);

    // The run without a scaler that never took step 1: same data and RNG position, AdamW at t 0.
    plain.step = 1;
    for step in 2..=4u64 {
        let data = batch(step);
        scaled
            .submit_step(std::slice::from_ref(&data), &[])
            .unwrap();
        plain.submit_step(&[data], &[]).unwrap();
        reference.step(true);
        assert_same_bits(
            &format!("step {step}"),
            &optimizer_state(&g, &scaled),
            &optimizer_state(&g, &plain),
        );
        expect_state(
            &format!("step {step}"),
            scaler_state(&g, &scaled),
            &reference,
        );
    }
    assert_eq!(plain.optimizer_steps, 3);
    assert_eq!(reference.scale, 65536.0, "grew back after two clean steps");
}
