//! Reference for `shaders/loss.wgsl`: weighted mean squared error, the VAE's L1 and L2
//! reconstruction losses (summed per image, averaged over the batch), and their gradients.

/// loss = (1/N) Σ_i w_b(i) (pred_i − target_i)², b(i) = i / (N / B); `weights` = None means
/// w = 1 (torch `mse_loss`, reduction "mean").
pub fn mse_loss(pred: &[f64], target: &[f64], weights: Option<&[f64]>) -> f64 {
    let n = pred.len();
    let per_sample = n / weights.map_or(1, |w| w.len()).max(1);
    pred.iter()
        .zip(target)
        .enumerate()
        .map(|(i, (p, t))| weights.map_or(1.0, |w| w[i / per_sample]) * (p - t) * (p - t))
        .sum::<f64>()
        / n as f64
}

/// dloss/dpred_i · scale = scale · 2 w_b (pred_i − target_i) / N.
pub fn mse_backward(pred: &[f64], target: &[f64], weights: Option<&[f64]>, scale: f64) -> Vec<f64> {
    let n = pred.len();
    let per_sample = n / weights.map_or(1, |w| w.len()).max(1);
    pred.iter()
        .zip(target)
        .enumerate()
        .map(|(i, (p, t))| {
            scale * 2.0 * weights.map_or(1.0, |w| w[i / per_sample]) * (p - t) / n as f64
        })
        .collect()
}

/// (1/B) Σ_i |pred_i − target_i| with B = `batch`.
pub fn l1_loss(pred: &[f64], target: &[f64], batch: usize) -> f64 {
    pred.iter()
        .zip(target)
        .map(|(p, t)| (p - t).abs())
        .sum::<f64>()
        / batch as f64
}

/// dloss/dpred_i · scale = scale · sign(pred_i − target_i) / B (0 where they are equal).
pub fn l1_backward(pred: &[f64], target: &[f64], batch: usize, scale: f64) -> Vec<f64> {
    pred.iter()
        .zip(target)
        .map(|(p, t)| {
            let d = p - t;
            let sign = if d > 0.0 {
                1.0
            } else if d < 0.0 {
                -1.0
            } else {
                0.0
            };
            scale * sign / batch as f64
        })
        .collect()
}

/// (1/B) Σ_i (pred_i − target_i)² with B = `batch`.
pub fn l2_loss(pred: &[f64], target: &[f64], batch: usize) -> f64 {
    pred.iter()
        .zip(target)
        .map(|(p, t)| (p - t) * (p - t))
        .sum::<f64>()
        / batch as f64
}

/// dloss/dpred_i · scale = scale · 2 (pred_i − target_i) / B.
pub fn l2_backward(pred: &[f64], target: &[f64], batch: usize, scale: f64) -> Vec<f64> {
    pred.iter()
        .zip(target)
        .map(|(p, t)| scale * 2.0 * (p - t) / batch as f64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{assert_gradients_match, numeric_gradient, test_data};

    #[test]
    fn mse_backward_matches_finite_differences() {
        let (pred, target) = (test_data(3 * 11, 1), test_data(3 * 11, 2));
        let w: Vec<f64> = test_data(3, 3).iter().map(|v| v + 1.5).collect();
        for weights in [None, Some(&w[..])] {
            let analytic = mse_backward(&pred, &target, weights, 0.5);
            let numeric = numeric_gradient(&pred, 1e-6, |p| 0.5 * mse_loss(p, &target, weights));
            assert_gradients_match("mse", &analytic, &numeric, 1e-7);
        }
    }

    #[test]
    fn l2_backward_matches_finite_differences_and_sums_per_image() {
        let (pred, target) = (test_data(3 * 11, 6), test_data(3 * 11, 7));
        let analytic = l2_backward(&pred, &target, 3, 0.5);
        let numeric = numeric_gradient(&pred, 1e-6, |p| 0.5 * l2_loss(p, &target, 3));
        assert_gradients_match("l2", &analytic, &numeric, 1e-7);
        // Per image a sum, over the batch a mean: N / B times torch's mean.
        let mse = mse_loss(&pred, &target, None);
        assert!((l2_loss(&pred, &target, 3) - 11.0 * mse).abs() < 1e-12);
    }

    #[test]
    fn unit_weights_equal_unweighted() {
        let (pred, target) = (test_data(20, 4), test_data(20, 5));
        let a = mse_loss(&pred, &target, None);
        let b = mse_loss(&pred, &target, Some(&[1.0, 1.0, 1.0, 1.0]));
        assert!((a - b).abs() < 1e-15);
    }
}
