// Softmax over the last axis of a row-major [R, L] tensor.
//   forward:  m = max_j x_j,  y_i = exp(x_i - m) / sum_j exp(x_j - m)   (max-subtracted, so no
//             exp overflows and the largest term is exactly 1)
//   backward: dx_i = y_i * (dy_i - sum_j dy_j * y_j)   (Jacobian diag(y) - y y^T applied to dy)
// A workgroup of 64 threads handles 64 / T rows with T = p.tpr threads per row (a power of two
// chosen on the host from L: short rows would otherwise leave most of a 64-wide workgroup idle).
// Lane t of a row takes columns t, t + T, ...; the T partial results are combined by a fixed
// binary tree in workgroup memory, so every reduction is deterministic. The grid is 2-D when it
// exceeds 65535 workgroups: workgroup index = wid.x + wid.y * nwg.x.

struct Params {
    rows: u32, // R
    len: u32,  // L
    tpr: u32,  // threads per row T: 1, 2, 4, ..., 64
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem1>;
@group(0) @binding(2) var<storage, read_write> y: array<Elem2>;
@group(0) @binding(3) var<storage, read> y_in: array<Elem3>;
@group(0) @binding(4) var<storage, read> dy: array<Elem4>;
@group(0) @binding(5) var<storage, read_write> dx: array<Elem5>;

const WG: u32 = 64u;

var<workgroup> red: array<f32, 64>;

// Sum (or max) of red[slot*T .. slot*T + T) by a fixed tree; every thread gets its row's result.
// The loop count depends only on the uniform p.tpr, so the barriers stay in uniform control flow.
fn row_sum(lid: u32, v: f32) -> f32 {
    let lane = lid % p.tpr;
    red[lid] = v;
    workgroupBarrier();
    for (var s = p.tpr / 2u; s > 0u; s = s >> 1u) {
        if (lane < s) { red[lid] = red[lid] + red[lid + s]; }
        workgroupBarrier();
    }
    let total = red[lid - lane];
    workgroupBarrier(); // all have read the result before red is reused
    return total;
}

fn row_max(lid: u32, v: f32) -> f32 {
    let lane = lid % p.tpr;
    red[lid] = v;
    workgroupBarrier();
    for (var s = p.tpr / 2u; s > 0u; s = s >> 1u) {
        if (lane < s) { red[lid] = max(red[lid], red[lid + s]); }
        workgroupBarrier();
    }
    let total = red[lid - lane];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(64)
fn softmax_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let first = (wid.y * nwg.x + wid.x) * (WG / p.tpr);
    // Uniform across the workgroup, so returning keeps the barriers in uniform control flow.
    if (first >= p.rows) { return; }
    let row = first + lid / p.tpr;
    let lane = lid % p.tpr;
    let live = row < p.rows; // the last workgroup may hold fewer rows: inactive lanes only join barriers
    let len = select(0u, p.len, live);
    let base = select(0u, row * p.len, live);
    // Start from the row's first element (len >= 1) rather than -FLT_MAX so rows holding -inf stay exact.
    var m = f32(x[base]);
    for (var j = lane; j < len; j = j + p.tpr) { m = max(m, f32(x[base + j])); }
    m = row_max(lid, m);
    var s = 0.0;
    for (var j = lane; j < len; j = j + p.tpr) { s = s + exp(f32(x[base + j]) - m); }
    s = row_sum(lid, s);
    for (var j = lane; j < len; j = j + p.tpr) { y[base + j] = to_elem2(exp(f32(x[base + j]) - m) / s); }
}

@compute @workgroup_size(64)
fn softmax_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let first = (wid.y * nwg.x + wid.x) * (WG / p.tpr);
    if (first >= p.rows) { return; }
    let row = first + lid / p.tpr;
    let lane = lid % p.tpr;
    let len = select(0u, p.len, row < p.rows);
    let base = row * p.len;
    var d = 0.0;
    for (var j = lane; j < len; j = j + p.tpr) { d = d + f32(dy[base + j]) * f32(y_in[base + j]); }
    d = row_sum(lid, d);
    for (var j = lane; j < len; j = j + p.tpr) {
        let yj = f32(y_in[base + j]);
        dx[base + j] = to_elem5(yj * (f32(dy[base + j]) - d));
    }
}
