//! Reference for the fused attention kernels: the core of multi-head attention,
//! O = softmax(scale · Q Kᵀ) V per (sample, head), optionally causal, on activations laid out as
//! diffusers' Attention keeps them: `[N · T, C]` rows of tokens, head h in columns h·dh .. (h+1)·dh.
//!
//! Backward (Dao, "FlashAttention-2", 2023, Algorithm 2): with P the probabilities,
//! dV = Pᵀ dO, dP = dO Vᵀ, D_i = Σ_j P_ij dP_ij = dO_i · O_i, dS = P ∘ (dP − D),
//! dQ = scale · dS K, dK = scale · dSᵀ Q.

/// Shapes of one attention call: `n` samples of `query_tokens` queries attending to
/// `key_tokens` keys (cross-attention: a key length unlike the query length), `heads` heads of
/// `head_dim`; `causal`: query i sees keys j ≤ i only (CLIP's text encoder).
#[derive(Clone, Copy, Debug)]
pub struct AttentionDims {
    pub n: usize,
    pub query_tokens: usize,
    pub key_tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub causal: bool,
}

impl AttentionDims {
    /// Self-attention over `tokens` tokens, unmasked.
    pub fn self_attention(n: usize, tokens: usize, heads: usize, head_dim: usize) -> Self {
        AttentionDims {
            n,
            query_tokens: tokens,
            key_tokens: tokens,
            heads,
            head_dim,
            causal: false,
        }
    }
    pub fn channels(&self) -> usize {
        self.heads * self.head_dim
    }
    /// Index of element d of head h of token t of sample s in a `[N · tokens, C]` activation.
    fn at(&self, tokens: usize, s: usize, t: usize, h: usize, d: usize) -> usize {
        (s * tokens + t) * self.channels() + h * self.head_dim + d
    }
    fn at_q(&self, s: usize, t: usize, h: usize, d: usize) -> usize {
        self.at(self.query_tokens, s, t, h, d)
    }
    fn at_k(&self, s: usize, t: usize, h: usize, d: usize) -> usize {
        self.at(self.key_tokens, s, t, h, d)
    }
    /// The probabilities P [Tq, Tk] of sample s, head h (exactly zero where masked).
    fn probabilities(&self, q: &[f64], k: &[f64], scale: f64, s: usize, h: usize) -> Vec<f64> {
        let tk = self.key_tokens;
        let mut p = vec![0.0; self.query_tokens * tk];
        for i in 0..self.query_tokens {
            let row = &mut p[i * tk..(i + 1) * tk];
            let seen = if self.causal { (i + 1).min(tk) } else { tk };
            for (j, v) in row.iter_mut().enumerate().take(seen) {
                *v = scale
                    * (0..self.head_dim)
                        .map(|d| q[self.at_q(s, i, h, d)] * k[self.at_k(s, j, h, d)])
                        .sum::<f64>();
            }
            let m = row[..seen].iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            let sum: f64 = row[..seen].iter().map(|v| (v - m).exp()).sum();
            for (j, v) in row.iter_mut().enumerate() {
                *v = if j < seen { (*v - m).exp() / sum } else { 0.0 };
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
    let (tq, tk) = (dims.query_tokens, dims.key_tokens);
    let mut o = vec![0.0; q.len()];
    for s in 0..dims.n {
        for h in 0..dims.heads {
            let p = dims.probabilities(q, k, scale, s, h);
            for i in 0..tq {
                for d in 0..dims.head_dim {
                    o[dims.at_q(s, i, h, d)] = (0..tk)
                        .map(|j| p[i * tk + j] * v[dims.at_k(s, j, h, d)])
                        .sum();
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
    let (tq, tk) = (dims.query_tokens, dims.key_tokens);
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    for s in 0..dims.n {
        for h in 0..dims.heads {
            let p = dims.probabilities(q, k, scale, s, h);
            // dS = P ∘ (dP − rowsum(P ∘ dP)), dP = dO Vᵀ.
            let mut ds = vec![0.0; tq * tk];
            for i in 0..tq {
                let dp: Vec<f64> = (0..tk)
                    .map(|j| {
                        (0..dims.head_dim)
                            .map(|d| d_o[dims.at_q(s, i, h, d)] * v[dims.at_k(s, j, h, d)])
                            .sum()
                    })
                    .collect();
                let delta: f64 = (0..tk).map(|j| p[i * tk + j] * dp[j]).sum();
                for j in 0..tk {
                    ds[i * tk + j] = p[i * tk + j] * (dp[j] - delta);
                }
            }
            for d in 0..dims.head_dim {
                for i in 0..tq {
                    dq[dims.at_q(s, i, h, d)] = scale
                        * (0..tk)
                            .map(|j| ds[i * tk + j] * k[dims.at_k(s, j, h, d)])
                            .sum::<f64>();
                }
                for j in 0..tk {
                    dk[dims.at_k(s, j, h, d)] = scale
                        * (0..tq)
                            .map(|i| ds[i * tk + j] * q[dims.at_q(s, i, h, d)])
                            .sum::<f64>();
                    dv[dims.at_k(s, j, h, d)] = (0..tq)
                        .map(|i| p[i * tk + j] * d_o[dims.at_q(s, i, h, d)])
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
        // Self-attention, cross-attention (fewer and more keys than queries), causal.
        for (n, tq, tk, heads, head_dim, causal) in [
            (1, 1, 1, 1, 1, false),
            (2, 3, 3, 2, 2, false),
            (1, 5, 5, 1, 4, false),
            (2, 4, 2, 2, 3, false),
            (1, 2, 5, 3, 2, false),
            (2, 5, 5, 2, 3, true),
        ] {
            let dims = AttentionDims {
                n,
                query_tokens: tq,
                key_tokens: tk,
                heads,
                head_dim,
                causal,
            };
            let (len_q, len_k) = (n * tq * dims.channels(), n * tk * dims.channels());
            let (q, k, v) = (
                test_data(len_q, 1),
                test_data(len_k, 2),
                test_data(len_k, 3),
            );
            let d_o = test_data(len_q, 4);
            let scale = 0.7;
            let (dq, dk, dv) = attention_backward(dims, &q, &k, &v, &d_o, scale);
            let loss = |o: Vec<f64>| o.iter().zip(&d_o).map(|(a, b)| a * b).sum::<f64>();
            let what = format!("attention n{n} tq{tq} tk{tk} h{heads} d{head_dim} causal {causal}");
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
        let dims = AttentionDims::self_attention(2, 1, 2, 3);
        let v = test_data(12, 9);
        let o = attention_forward(dims, &test_data(12, 7), &test_data(12, 8), &v, 0.5);
        assert_eq!(o, v);
    }

    /// Under the causal mask the first query sees only the first key: its output is that
    /// key's value, whatever the scores.
    #[test]
    fn causal_first_query_sees_first_key() {
        let dims = AttentionDims {
            causal: true,
            ..AttentionDims::self_attention(1, 4, 1, 2)
        };
        let v = test_data(8, 3);
        let o = attention_forward(dims, &test_data(8, 1), &test_data(8, 2), &v, 1.0);
        assert_eq!(&o[..2], &v[..2]);
    }
}
