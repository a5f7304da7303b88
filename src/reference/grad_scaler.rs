//! torch.amp.GradScaler's bookkeeping (`_amp_update_scale_`), in plain Rust: what
//! `shaders/grad_scaler.wgsl` must do to its state step after step.

/// The scaler's state after some steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradScaler {
    pub scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    pub growth_interval: u32,
    pub growth_tracker: u32,
    /// Optimizer steps taken (AdamW's t).
    pub optimizer_steps: u32,
    pub skipped_total: u32,
    pub skipped_in_row: u32,
}

impl GradScaler {
    pub fn new(init_scale: f64, growth_interval: u32) -> GradScaler {
        GradScaler {
            scale: init_scale,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval,
            growth_tracker: 0,
            optimizer_steps: 0,
            skipped_total: 0,
            skipped_in_row: 0,
        }
    }

    /// `scaler.step(opt); scaler.update()` after a backward pass whose unscaled gradients were
    /// all finite or not. Returns whether the optimizer stepped.
    pub fn step(&mut self, grads_finite: bool) -> bool {
        if !grads_finite {
            self.scale *= self.backoff_factor;
            self.growth_tracker = 0;
            self.skipped_total += 1;
            self.skipped_in_row += 1;
            return false;
        }
        self.optimizer_steps += 1;
        self.skipped_in_row = 0;
        let clean = self.growth_tracker + 1;
        if clean == self.growth_interval {
            let grown = self.scale * self.growth_factor;
            if (grown as f32).is_finite() {
                self.scale = grown;
            }
            self.growth_tracker = 0;
        } else {
            self.growth_tracker = clean;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backs_off_on_overflow_and_grows_after_the_interval() {
        let mut s = GradScaler::new(65536.0, 2);
        assert!(!s.step(false));
        assert_eq!(
            (s.scale, s.optimizer_steps, s.skipped_in_row),
            (32768.0, 0, 1)
        );
        assert!(s.step(true));
        assert_eq!((s.scale, s.growth_tracker), (32768.0, 1));
        assert!(s.step(true));
        assert_eq!(
            (s.scale, s.growth_tracker, s.optimizer_steps),
            (65536.0, 0, 2)
        );
        assert_eq!((s.skipped_total, s.skipped_in_row), (1, 0));
        // Growth that would overflow f32 keeps the scale.
        let mut big = GradScaler::new(2f64.powi(127), 1);
        big.step(true);
        assert_eq!(big.scale, 2f64.powi(127));
    }
}
