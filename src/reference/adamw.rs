//! Reference for `shaders/adamw.wgsl`: torch.optim.AdamW, diffusers EMAModel and
//! torch.nn.utils.clip_grad_norm_, in f64. The EMA decay schedule itself is
//! [`crate::ops::adamw::EmaConfig::get_decay`] (host-side f64 either way).

/// One AdamW step (torch single-tensor path, in f64), `step` 1-based:
/// p *= 1 − lr·wd; m = β1 m + (1 − β1) g; v = β2 v + (1 − β2) g²;
/// p −= lr/(1 − β1^t) · m / (sqrt(v)/sqrt(1 − β2^t) + eps), with g = grad · grad_scale.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    params: &mut [f64],
    grads: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    step: u32,
    grad_scale: f64,
) {
    let bias_correction1 = 1.0 - beta1.powi(step as i32);
    let bias_correction2_sqrt = (1.0 - beta2.powi(step as i32)).sqrt();
    let step_size = lr / bias_correction1;
    for i in 0..params.len() {
        let g = grads[i] * grad_scale;
        params[i] *= 1.0 - lr * weight_decay;
        m[i] = beta1 * m[i] + (1.0 - beta1) * g;
        v[i] = beta2 * v[i] + (1.0 - beta2) * g * g;
        let denom = v[i].sqrt() / bias_correction2_sqrt + eps;
        params[i] -= step_size * m[i] / denom;
    }
}

/// ema −= (1 − decay)(ema − param) (diffusers EMAModel.step).
pub fn ema_update(ema: &mut [f64], params: &[f64], decay: f64) {
    for (e, p) in ema.iter_mut().zip(params) {
        *e -= (1.0 - decay) * (*e - p);
    }
}

/// (clip factor, total norm) of torch.nn.utils.clip_grad_norm_(max_norm): norm = ||g||₂,
/// factor = min(1, max_norm / (norm + 1e-6)); `max_norm` None gives factor 1.
pub fn grad_norm(grads: &[f64], max_norm: Option<f64>) -> (f64, f64) {
    let norm = grads.iter().map(|g| g * g).sum::<f64>().sqrt();
    (max_norm.map_or(1.0, |m| (m / (norm + 1e-6)).min(1.0)), norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::adamw::EmaConfig;
    use crate::reference::{numeric_gradient, test_data};

    #[test]
    fn first_adam_step_moves_by_lr_times_sign() {
        // At t = 1, m̂ = g and sqrt(v̂) = |g|, so the step is lr·g/(|g| + eps) ≈ lr·sign(g)
        // (Kingma & Ba 2015, section 2.1).
        let grads = [0.3, -2.0, 1e-3];
        let mut p = [1.0, 1.0, 1.0];
        let (mut m, mut v) = ([0.0; 3], [0.0; 3]);
        adamw_step(
            &mut p, &grads, &mut m, &mut v, 0.1, 0.9, 0.999, 1e-8, 0.0, 1, 1.0,
        );
        for (pi, g) in p.iter().zip(grads) {
            assert!(
                (pi - (1.0 - 0.1 * g.signum())).abs() < 1e-5,
                "{pi} for g = {g}"
            );
        }
    }

    #[test]
    fn weight_decay_is_decoupled() {
        // With zero gradient the Adam update vanishes and only p *= 1 − lr·wd remains.
        let mut p = [2.0, -4.0];
        let (mut m, mut v) = ([0.0; 2], [0.0; 2]);
        adamw_step(
            &mut p,
            &[0.0, 0.0],
            &mut m,
            &mut v,
            0.1,
            0.9,
            0.999,
            1e-8,
            0.5,
            3,
            1.0,
        );
        assert_eq!(p, [2.0 * 0.95, -4.0 * 0.95]);
    }

    #[test]
    fn grad_norm_and_clip() {
        let (c, n) = grad_norm(&[3.0, 4.0], Some(1.0));
        assert_eq!(n, 5.0);
        assert!((c - 1.0 / (5.0 + 1e-6)).abs() < 1e-15);
        assert_eq!(grad_norm(&[3.0, 4.0], Some(10.0)).0, 1.0);
        assert_eq!(grad_norm(&[3.0, 4.0], None).0, 1.0);
        // The norm's gradient g/||g|| by finite differences.
        let g = test_data(9, 1);
        let numeric = numeric_gradient(&g, 1e-6, |g| grad_norm(g, None).1);
        let (_, norm) = grad_norm(&g, None);
        for (a, b) in g.iter().map(|x| x / norm).zip(numeric) {
            assert!((a - b).abs() < 1e-8);
        }
    }

    #[test]
    fn ema_decay_schedule_matches_diffusers() {
        let d = EmaConfig::default();
        assert_eq!(d.get_decay(0), 0.0);
        assert_eq!(d.get_decay(1), 0.0);
        assert_eq!(d.get_decay(2), 2.0 / 11.0);
        assert_eq!(d.get_decay(1_000_000), 0.9999);
        let w = EmaConfig {
            use_ema_warmup: true,
            update_after_step: 5,
            min_decay: 0.1,
            ..d
        };
        assert_eq!(w.get_decay(6), 0.0);
        assert_eq!(w.get_decay(7), 0.1f64.max(1.0 - 2f64.powf(-2.0 / 3.0)));
        assert!((w.get_decay(5 + 1 + 999) - (1.0 - 1000f64.powf(-2.0 / 3.0))).abs() < 1e-15);
        let mut ema = [1.0, 2.0];
        ema_update(&mut ema, &[3.0, 0.0], 0.75);
        assert_eq!(ema, [1.5, 1.5]);
    }
}
