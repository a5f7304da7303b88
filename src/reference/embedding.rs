//! f64 reference of `shaders/embedding.wgsl`.

/// out[b, :] + table[labels[b], :].
pub fn embedding_add_forward(labels: &[u32], table: &[f64], dim: usize, out: &[f64]) -> Vec<f64> {
    out.iter()
        .enumerate()
        .map(|(i, &v)| v + table[labels[i / dim] as usize * dim + i % dim])
        .collect()
}

/// d_table[k, :] + Σ_{b: labels[b] = k} d_out[b, :].
pub fn embedding_backward(labels: &[u32], d_out: &[f64], dim: usize, d_table: &[f64]) -> Vec<f64> {
    let mut g = d_table.to_vec();
    for (b, &k) in labels.iter().enumerate() {
        for j in 0..dim {
            g[k as usize * dim + j] += d_out[b * dim + j];
        }
    }
    g
}
