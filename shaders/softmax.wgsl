// Softmax over the last axis of a row-major [R, L] tensor, one workgroup of 64 threads per row
// (the grid is 2-D when R exceeds 65535 rows: row = wid.x + wid.y * nwg.x).
//   forward:  m = max_j x_j,  y_i = exp(x_i - m) / sum_j exp(x_j - m)   (max-subtracted, so no
//             exp overflows and the largest term is exactly 1)
//   backward: dx_i = y_i * (dy_i - sum_j dy_j * y_j)   (Jacobian diag(y) - y y^T applied to dy)
// Thread t takes columns t, t + 64, ...; the 64 partial results are combined by a fixed binary
// tree in workgroup memory, so every reduction is deterministic.

struct Params {
    rows: u32, // R
    len: u32,  // L
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<storage, read> y_in: array<f32>;
@group(0) @binding(4) var<storage, read> dy: array<f32>;
@group(0) @binding(5) var<storage, read_write> dx: array<f32>;

const WG: u32 = 64u;

var<workgroup> red: array<f32, 64>;

fn tree_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) { red[lid] = red[lid] + red[lid + s]; }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier(); // all have read red[0] before it is reused
    return total;
}

fn tree_max(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) { red[lid] = max(red[lid], red[lid + s]); }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(64)
fn softmax_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let row = wid.y * nwg.x + wid.x; // uniform: the early return keeps barriers in uniform control flow
    if (row >= p.rows) { return; }
    let base = row * p.len;
    // Start from x[base] (len >= 1) rather than -FLT_MAX so rows holding -inf stay exact.
    var m = x[base];
    for (var j = lid; j < p.len; j = j + WG) { m = max(m, x[base + j]); }
    m = tree_max(lid, m);
    var s = 0.0;
    for (var j = lid; j < p.len; j = j + WG) { s = s + exp(x[base + j] - m); }
    s = tree_sum(lid, s);
    for (var j = lid; j < p.len; j = j + WG) { y[base + j] = exp(x[base + j] - m) / s; }
}

@compute @workgroup_size(64)
fn softmax_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let row = wid.y * nwg.x + wid.x;
    if (row >= p.rows) { return; }
    let base = row * p.len;
    var d = 0.0;
    for (var j = lid; j < p.len; j = j + WG) { d = d + dy[base + j] * y_in[base + j]; }
    d = tree_sum(lid, d);
    for (var j = lid; j < p.len; j = j + WG) {
        let yj = y_in[base + j];
        dx[base + j] = yj * (dy[base + j] - d);
    }
}
