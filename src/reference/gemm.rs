//! Reference batched GEMM and linear layer (f64).

/// C[m×n] = alpha·op(A)·op(B) + beta·C for one batch, with row-major storage, leading
/// dimensions and transposes as in `ops::gemm::MatRef`.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    alpha: f64,
    a: &[f64],
    lda: usize,
    trans_a: bool,
    b: &[f64],
    ldb: usize,
    trans_b: bool,
    beta: f64,
    c: &mut [f64],
    ldc: usize,
) {
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0;
            for l in 0..k {
                let av = if trans_a {
                    a[l * lda + i]
                } else {
                    a[i * lda + l]
                };
                let bv = if trans_b {
                    b[j * ldb + l]
                } else {
                    b[l * ldb + j]
                };
                acc += av * bv;
            }
            let old = if beta != 0.0 {
                beta * c[i * ldc + j]
            } else {
                0.0
            };
            c[i * ldc + j] = alpha * acc + old;
        }
    }
}

/// y[r, o] = Σ_i x[r, i]·W[o, i] + b[o]  (torch Linear, W [out, in]).
pub fn linear_forward(
    x: &[f64],
    w: &[f64],
    b: Option<&[f64]>,
    rows: usize,
    in_f: usize,
    out_f: usize,
) -> Vec<f64> {
    let mut y = vec![0.0; rows * out_f];
    gemm(
        rows, out_f, in_f, 1.0, x, in_f, false, w, in_f, true, 0.0, &mut y, out_f,
    );
    if let Some(b) = b {
        for (i, v) in y.iter_mut().enumerate() {
            *v += b[i % out_f];
        }
    }
    y
}

/// (dx, dW, db) of `linear_forward` for upstream gradient dy.
pub fn linear_backward(
    x: &[f64],
    w: &[f64],
    dy: &[f64],
    rows: usize,
    in_f: usize,
    out_f: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut dx = vec![0.0; rows * in_f];
    gemm(
        rows, in_f, out_f, 1.0, dy, out_f, false, w, in_f, false, 0.0, &mut dx, in_f,
    );
    let mut dw = vec![0.0; out_f * in_f];
    gemm(
        out_f, in_f, rows, 1.0, dy, out_f, true, x, in_f, false, 0.0, &mut dw, in_f,
    );
    let mut db = vec![0.0; out_f];
    for (i, g) in dy.iter().enumerate() {
        db[i % out_f] += g;
    }
    (dx, dw, db)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{assert_gradients_match, numeric_gradient, test_data};

    #[test]
    fn linear_backward_matches_finite_differences() {
        let (rows, in_f, out_f) = (3, 5, 4);
        let x = test_data(rows * in_f, 1);
        let w = test_data(out_f * in_f, 2);
        let b = test_data(out_f, 3);
        let dy = test_data(rows * out_f, 4);
        let loss = |x: &[f64], w: &[f64], b: &[f64]| -> f64 {
            linear_forward(x, w, Some(b), rows, in_f, out_f)
                .iter()
                .zip(&dy)
                .map(|(y, g)| y * g)
                .sum()
        };
        let (dx, dw, db) = linear_backward(&x, &w, &dy, rows, in_f, out_f);
        assert_gradients_match(
            "linear dx",
            &dx,
            &numeric_gradient(&x, 1e-6, |x| loss(x, &w, &b)),
            1e-7,
        );
        assert_gradients_match(
            "linear dW",
            &dw,
            &numeric_gradient(&w, 1e-6, |w| loss(&x, w, &b)),
            1e-7,
        );
        assert_gradients_match(
            "linear db",
            &db,
            &numeric_gradient(&b, 1e-6, |b| loss(&x, &w, b)),
            1e-7,
        );
    }
}
