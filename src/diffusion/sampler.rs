//! DDPM sampling with diffusers' `DDPMScheduler.set_timesteps(n)` + `step` semantics
//! ("leading" spacing, steps_offset 0, variance "fixed_small", clip_sample to [-1, 1]).
//! The per-step coefficients are computed here in f32, in diffusers' order of operations; the
//! element-wise update runs on the GPU (`ops::diffusion::ddpm_step`).

use super::NoiseSchedule;

/// One reverse step: the model is evaluated at `timestep`, then
/// x_prev = c_x0·clip(x0_pred) + c_xt·x_t + sigma·z.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DdpmStep {
    pub timestep: usize,
    pub sqrt_alpha_prod: f32,
    pub sqrt_one_minus_alpha_prod: f32,
    pub c_x0: f32,
    pub c_xt: f32,
    pub sigma: f32,
}

impl DdpmStep {
    pub fn coefficients(&self) -> [f32; 5] {
        [
            self.sqrt_alpha_prod,
            self.sqrt_one_minus_alpha_prod,
            self.c_x0,
            self.c_xt,
            self.sigma,
        ]
    }
}

/// The steps of `DDPMScheduler.set_timesteps(num_inference_steps)` followed by `step` for each.
pub fn ddpm_steps(
    schedule: &NoiseSchedule,
    num_inference_steps: usize,
) -> Result<Vec<DdpmStep>, String> {
    let t_train = schedule.num_train_timesteps;
    if num_inference_steps == 0 || num_inference_steps > t_train {
        return Err(format!(
            "sampling steps must be in 1..={t_train}, is {num_inference_steps}"
        ));
    }
    let ratio = t_train / num_inference_steps;
    let acp = &schedule.alphas_cumprod;
    Ok((0..num_inference_steps)
        .rev()
        .map(|i| {
            let t = i * ratio;
            let prev = t as isize - ratio as isize;
            let a_t = acp[t];
            let a_prev = if prev >= 0 {
                acp[prev as usize]
            } else {
                1.0f32
            };
            let beta_prod_t = 1.0 - a_t;
            let beta_prod_prev = 1.0 - a_prev;
            let current_alpha = a_t / a_prev;
            let current_beta = 1.0 - current_alpha;
            let sigma = if t > 0 {
                ((beta_prod_prev / beta_prod_t * current_beta).max(1e-20)).sqrt()
            } else {
                0.0
            };
            DdpmStep {
                timestep: t,
                sqrt_alpha_prod: a_t.sqrt(),
                sqrt_one_minus_alpha_prod: beta_prod_t.sqrt(),
                c_x0: a_prev.sqrt() * current_beta / beta_prod_t,
                c_xt: current_alpha.sqrt() * beta_prod_prev / beta_prod_t,
                sigma,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::BetaSchedule;

    #[test]
    fn leading_spacing_and_final_step() {
        let s = NoiseSchedule::new(BetaSchedule::Linear, 1000, 1e-4, 0.02).unwrap();
        let steps = ddpm_steps(&s, 50).unwrap();
        assert_eq!(steps.len(), 50);
        assert_eq!(steps[0].timestep, 980);
        assert_eq!(steps[49].timestep, 0);
        // The last step returns the clipped x0 estimate exactly: c_x0 = 1, c_xt = 0, no noise.
        assert!(
            (steps[49].c_x0 - 1.0).abs() < 1e-6
                && steps[49].c_xt.abs() < 1e-6
                && steps[49].sigma == 0.0
        );
        // Full-length sampling is ancestral DDPM: c_x0 + c_xt·… reproduces the posterior mean.
        let full = ddpm_steps(&s, 1000).unwrap();
        assert_eq!(full[0].timestep, 999);
        assert!(ddpm_steps(&s, 0).is_err());
    }
}
