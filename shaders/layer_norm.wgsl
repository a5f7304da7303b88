// LayerNorm over the last dimension: torch.nn.LayerNorm(C) with an elementwise affine, on
// x [rows, C] (any leading shape flattened to rows). Per row, biased variance:
//   mean = Σ x / C, var = Σ (x − mean)² / C, rstd = 1 / sqrt(var + eps),
//   y = (x − mean)·rstd·γ + β.
// Backward, x̂ = (x − mean)·rstd, dx̂ = dy·γ:
//   dx = rstd·(dx̂ − Σ dx̂ / C − x̂·Σ(dx̂·x̂) / C),  dγ = Σ_rows dy·x̂,  dβ = Σ_rows dy.
//
// Dispatch plan. Forward: `layer_norm_forward`, one 64-wide workgroup per row (two passes over
// the row: the mean, then the centred squares; fixed tree sums), writing y and (mean, rstd) per
// row for the backward. Backward: `layer_norm_backward_dx`, one workgroup per row; and
// `layer_norm_param_partials`, one invocation per (column, chunk of `chunk` rows) writing the
// chunk's Σ dy·x̂ and Σ dy, which `reduce.wgsl`'s sum_slices adds in chunk order into dγ and
// dβ. No atomics: the same bits every run.
// Narrow rows (C ≤ ROWS_MAX_COLS in layer_norm.rs: the U-Net's transformer blocks at small
// widths, CLIP text encoders) take `layer_norm_forward_rows` / `layer_norm_backward_dx_rows`
// instead: one invocation per row summing it in order, 64 rows per workgroup. A workgroup per
// row and its barrier-separated tree sums cost lavapipe ~12 µs per row, 100× the arithmetic.
// The choice depends only on C, so every adapter computes the same bits.

struct Params {
    rows: u32,
    cols: u32,
    eps: f32,
    add_dx: u32,  // backward_dx: add into dx instead of overwriting it
    chunk: u32,   // param_partials: rows per chunk
    chunks: u32,  // param_partials: number of chunks
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem1>;
@group(0) @binding(2) var<storage, read> gamma: array<f32>;
@group(0) @binding(3) var<storage, read> beta: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<Elem4>;
// (mean, rstd) of each row.
@group(0) @binding(5) var<storage, read_write> stats: array<f32>;
@group(0) @binding(6) var<storage, read> dy: array<Elem6>;
@group(0) @binding(7) var<storage, read_write> dx: array<Elem7>;
// [chunks, C] each: Σ dy·x̂ and Σ dy over each chunk of rows.
@group(0) @binding(8) var<storage, read_write> dgamma_partials: array<f32>;
@group(0) @binding(9) var<storage, read_write> dbeta_partials: array<f32>;

const WG: u32 = 64u;

//#include tree_sum

fn row_of(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

@compute @workgroup_size(64)
fn layer_norm_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let row = row_of(wid, nwg);
    if (row >= p.rows) { return; }
    let base = row * p.cols;
    var s = 0.0;
    for (var c = lid; c < p.cols; c += WG) { s += f32(x[base + c]); }
    let mean = tree_sum(lid, s) / f32(p.cols);
    workgroupBarrier();
    var q = 0.0;
    for (var c = lid; c < p.cols; c += WG) {
        let d = f32(x[base + c]) - mean;
        q += d * d;
    }
    let rstd = 1.0 / sqrt(tree_sum(lid, q) / f32(p.cols) + p.eps);
    for (var c = lid; c < p.cols; c += WG) {
        y[base + c] = to_elem4((f32(x[base + c]) - mean) * rstd * gamma[c] + beta[c]);
    }
    if (lid == 0u) {
        stats[2u * row] = mean;
        stats[2u * row + 1u] = rstd;
    }
}

@compute @workgroup_size(64)
fn layer_norm_backward_dx(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let row = row_of(wid, nwg);
    if (row >= p.rows) { return; }
    let base = row * p.cols;
    let mean = stats[2u * row];
    let rstd = stats[2u * row + 1u];
    var s1 = 0.0;
    var s2 = 0.0;
    for (var c = lid; c < p.cols; c += WG) {
        let g = f32(dy[base + c]) * gamma[c];
        s1 += g;
        s2 += g * (f32(x[base + c]) - mean) * rstd;
    }
    let m1 = tree_sum(lid, s1) / f32(p.cols);
    workgroupBarrier();
    let m2 = tree_sum(lid, s2) / f32(p.cols);
    for (var c = lid; c < p.cols; c += WG) {
        let xhat = (f32(x[base + c]) - mean) * rstd;
        var v = rstd * (f32(dy[base + c]) * gamma[c] - m1 - xhat * m2);
        if (p.add_dx != 0u) { v += f32(dx[base + c]); }
        dx[base + c] = to_elem7(v);
    }
}

@compute @workgroup_size(64)
fn layer_norm_param_partials(@builtin(global_invocation_id) gid: vec3<u32>) {
    let c = gid.x;
    let g = gid.y;
    if (c >= p.cols || g >= p.chunks) { return; }
    let r1 = min(p.rows, (g + 1u) * p.chunk);
    var dg = 0.0;
    var db = 0.0;
    for (var r = g * p.chunk; r < r1; r++) {
        let xhat = (f32(x[r * p.cols + c]) - stats[2u * r]) * stats[2u * r + 1u];
        let d = f32(dy[r * p.cols + c]);
        dg += d * xhat;
        db += d;
    }
    dgamma_partials[g * p.cols + c] = dg;
    dbeta_partials[g * p.cols + c] = db;
}

fn row_of_invocation(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

@compute @workgroup_size(64)
fn layer_norm_forward_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) lid: u32) {
    let row = row_of_invocation(wid, nwg, lid);
    if (row >= p.rows) { return; }
    let base = row * p.cols;
    var s = 0.0;
    for (var c = 0u; c < p.cols; c++) { s += f32(x[base + c]); }
    let mean = s / f32(p.cols);
    var q = 0.0;
    for (var c = 0u; c < p.cols; c++) {
        let d = f32(x[base + c]) - mean;
        q += d * d;
    }
    let rstd = 1.0 / sqrt(q / f32(p.cols) + p.eps);
    for (var c = 0u; c < p.cols; c++) {
        y[base + c] = to_elem4((f32(x[base + c]) - mean) * rstd * gamma[c] + beta[c]);
    }
    stats[2u * row] = mean;
    stats[2u * row + 1u] = rstd;
}

@compute @workgroup_size(64)
fn layer_norm_backward_dx_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                               @builtin(local_invocation_index) lid: u32) {
    let row = row_of_invocation(wid, nwg, lid);
    if (row >= p.rows) { return; }
    let base = row * p.cols;
    let mean = stats[2u * row];
    let rstd = stats[2u * row + 1u];
    var s1 = 0.0;
    var s2 = 0.0;
    for (var c = 0u; c < p.cols; c++) {
        let g = f32(dy[base + c]) * gamma[c];
        s1 += g;
        s2 += g * (f32(x[base + c]) - mean) * rstd;
    }
    let m1 = s1 / f32(p.cols);
    let m2 = s2 / f32(p.cols);
    for (var c = 0u; c < p.cols; c++) {
        let xhat = (f32(x[base + c]) - mean) * rstd;
        var v = rstd * (f32(dy[base + c]) * gamma[c] - m1 - xhat * m2);
        if (p.add_dx != 0u) { v += f32(dx[base + c]); }
        dx[base + c] = to_elem7(v);
    }
}
