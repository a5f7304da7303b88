//! Plain-Rust f64 references of every op, forward and backward. They define what the kernels
//! compute; their backward passes are checked against central finite differences in the unit
//! tests below each one, and the GPU kernels are checked against them in `tests/gpu/`.

pub mod adamw;
pub mod attention;
pub mod conv2d;
pub mod elementwise;
pub mod embedding;
pub mod gelu;
pub mod gemm;
pub mod grad_scaler;
pub mod group_norm;
pub mod layer_norm;
pub mod loss;
pub mod noise;
pub mod posterior;
pub mod reduce;
pub mod samplers;
pub mod softmax;
pub mod timestep_embedding;
pub mod upsample;

/// Central finite difference of `f` with respect to every element of `x`.
pub fn numeric_gradient(x: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + h;
            let up = f(&xp);
            xp[i] = orig - h;
            let down = f(&xp);
            xp[i] = orig;
            (up - down) / (2.0 * h)
        })
        .collect()
}

pub use crate::rng::test_data;

/// Asserts `analytic` matches `numeric` to `tol` relative to the largest magnitude.
#[cfg(test)]
pub fn assert_gradients_match(what: &str, analytic: &[f64], numeric: &[f64], tol: f64) {
    assert_eq!(analytic.len(), numeric.len());
    let scale = numeric.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
    let (i, err) = analytic
        .iter()
        .zip(numeric)
        .map(|(a, n)| (a - n).abs())
        .enumerate()
        .fold(
            (0, 0.0),
            |(bi, be), (i, e)| if e > be { (i, e) } else { (bi, be) },
        );
    assert!(
        err <= tol * scale,
        "{what}: analytic and numeric gradients differ by {err:e} at {i} (scale {scale:e}); analytic[..4] = {:?}, numeric[..4] = {:?}",
        &analytic[..analytic.len().min(4)],
        &numeric[..numeric.len().min(4)]
    );
}
