// AdamW's and the EMA's per-step values (src/ops/adamw.rs: AdamwHyper; same field order):
// written by the host each step, or by grad_scaler_update from the host's values and the GPU's
// own optimizer step count when a GradScaler may skip steps (src/ops/grad_scaler.rs).
struct Hyper {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    decay_mul: f32,             // 1 − lr·wd, rounded once from f64 as torch's Python scalar
    step_size: f32,             // lr / (1 − β1^t)
    bias_correction2_sqrt: f32, // sqrt(1 − β2^t)
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    ema_one_minus_decay: f32,   // 1 − diffusers EMAModel.get_decay(step)
    skip: f32,                  // 1: GradScaler found an inf/NaN gradient, leave everything as is
}

