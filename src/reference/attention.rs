//! Reference for `shaders/attention_subgroup.wgsl`: the core of multi-head attention,
//! O = softmax(scale · Q Kᵀ) V per (sample, head), on activations laid out as diffusers' Attention
//! keeps them: `[N · T, C]` rows of tokens, head h in columns h·dh .. (h+1)·dh.
//!
//! Backward (Dao, "FlashAttention-2", 2023, Algorithm 2): with P the probabilities,
//! dV = Pᵀ dO, dP = dO Vᵀ, D_i = Σ_j P_ij dP_ij = dO_i · O_i, dS = P ∘ (dP − D),
//! dQ = scale · dS K, dK = scale · dSᵀ Q.

/// Shapes of one attention call: `n` samples of `tokens` tokens, `heads` heads of `head_dim`.
#[derive(Clone, Copy, Debug)]
pub struct AttentionDims {
    pub n: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttentionDims {
    pub fn channels(&self) -> usize {
        self.heads * self.head_dim
    }
    /// Index of element d of head h of token t of sample s in a `[N · T, C]` activation.
    fn at(&self, s: usize, t: usize, h: usize, d: usize) -> usize {
        (s * self.tokens + t) * self.channels() + h * self.head_dim + d
    }
    /// The probabilities P [T, T] of sample s, head h.
    fn probabilities(&self, q: &[f64], k: &[f64], scale: f64, s: usize, h: usize) -> Vec<f64> {
        let t = self.tokens;
        let mut p = vec![0.0; t * t];
        for i in 0..t {
            let row = &mut p[i * t..(i + 1) * t];
            for (j, v) in row.iter_mut().enumerate() {
                *v = scale
                    * (0..self.head_dim)
                        .map(|d| q[self.at(s, i, h, d)] * k[self.at(s, j, h, d)])
                        .sum::<f64>();
            }
            let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            let sum: f64 = row.iter().map(|v| (v - m).exp()).sum();
            for v in row.iter_mut() {
                *v = (*v - m).exp() / sum;
            }
        }
        p
    }
}

/// O = softmax(scale · Q Kᵀ) V for every sample and head.
pub fn attention_forward(
    dims: AttentionDims,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    scale: f64,
) -> Vec<f64> {
    let t = dims.tokens;
    let mut o = vec![0.0; q.len()];
    for s in 0..dims.n {
        for h in 0..dims.heads {
            let p = dims.probabilities(q, k, scale, s, h);
            for i in 0..t {
                for d in 0..dims.head_dim {
                    o[dims.at(s, i, h, d)] =
                        (0..t).map(|j| p[i * t + j] * v[dims.at(s, j, h, d)]).sum();
                }
            }
        }
    }
    o
}

/// (dQ, dK, dV) of `attention_forward` for the upstream gradient dO.
pub fn attention_backward(
    dims: AttentionDims,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    d_o: &[f64],
    scale: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let t = dims.tokens;
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; q.len()], vec![0.0; q.len()]);
    for s in 0..dims.n {
        for h in 0..dims.heads {
            let p = dims.probabilities(q, k, scale, s, h);
            let dot = |a: &[f64], i: usize, b: &[f64], j: usize| -> f64 {
                (0..dims.head_dim)
                    .map(|d| a[dims.at(s, i, h, d)] * b[dims.at(s, j, h, d)])
                    .sum()
            };
            // dS = P ∘ (dP − rowsum(P ∘ dP)), dP = dO Vᵀ.
            let mut ds = vec![0.0; t * t];
            for i in 0..t {
                let dp: Vec<f64> = (0..t).map(|j| dot(d_o, i, v, j)).collect();
                let delta: f64 = (0..t).map(|j| p[i * t + j] * dp[j]).sum();
                for j in 0..t {
                    ds[i * t + j] = p[i * t + j] * (dp[j] - delta);
                }
            }
            for i in 0..t {
                for d in 0..dims.head_dim {
                    dq[dims.at(s, i, h, d)] = scale
                        * (0..t)
                            .map(|j| ds[i * t + j] * k[dims.at(s, j, h, d)])
                            .sum::<f64>();
                    dk[dims.at(s, i, h, d)] = scale
                        * (0..t)
                            .map(|j| ds[j * t + i] * q[dims.at(s, j, h, d)])
                            .sum::<f64>();
                    dv[dims.at(s, i, h, d)] = (0..t)
                        .map(|j| p[j * t + i] * d_o[dims.at(s, j, h, d)])
                        .sum();
                }
            }
        }
    }
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{assert_gradients_match, numeric_gradient, test_data};

    #[test]
    fn backward_matches_finite_differences() {
        for (n, tokens, heads, head_dim) in [(1, 1, 1, 1), (2, 3, 2, 2), (1, 5, 1, 4)] {
            let dims = AttentionDims {
                n,
                tokens,
                heads,
                head_dim,
            };
            let len = n * tokens * dims.channels();
            let (q, k, v) = (test_data(len, 1), test_data(len, 2), test_data(len, 3));
            let d_o = test_data(len, 4);
            let scale = 0.7;
            let (dq, dk, dv) = attention_backward(dims, &q, &k, &v, &d_o, scale);
            let loss = |o: Vec<f64>| o.iter().zip(&d_o).map(|(a, b)| a * b).sum::<f64>();
            let what = format!("attention n{n} t{tokens} h{heads} d{head_dim}");
            let num_q = numeric_gradient(&q, 1e-6, |x| {
                loss(attention_forward(dims, x, &k, &v, scale))
            });
            assert_gradients_match(&format!("{what} dq"), &dq, &num_q, 1e-7);
            let num_k = numeric_gradient(&k, 1e-6, |x| {
                loss(attention_forward(dims, &q, x, &v, scale))
            });
            assert_gradients_match(&format!("{what} dk"), &dk, &num_k, 1e-7);
            let num_v = numeric_gradient(&v, 1e-6, |x| {
                loss(attention_forward(dims, &q, &k, x, scale))
            });
            assert_gradients_match(&format!("{what} dv"), &dv, &num_v, 1e-7);
        }
    }

    #[test]
    fn one_token_attends_to_itself() {
        let dims = AttentionDims {
            n: 2,
            tokens: 1,
            heads: 2,
            head_dim: 3,
        };
        let v = test_data(12, 9);
        let o = attention_forward(dims, &test_data(12, 7), &test_data(12, 8), &v, 0.5);
        assert_eq!(o, v);
    }
}
