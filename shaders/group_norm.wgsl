// GroupNorm on channels-last (NHWC) activations, torch.nn.GroupNorm semantics:
//   mean[n,g] = 1/M sum x,  var[n,g] = 1/M sum (x - mean)^2  (biased),  M = H*W*C/G,
//   rstd = 1 / sqrt(var + eps),  xhat = (x - mean) * rstd,  y = xhat * gamma[c] + beta[c].
// Backward (dxhat = dy * gamma[c]; sums over the M elements of group (n,g)):
//   dx = rstd * (dxhat - 1/M sum dxhat - xhat * 1/M sum dxhat*xhat)
//   dgamma[c] = sum_{n,pixels} dy * xhat,  dbeta[c] = sum_{n,pixels} dy.
//
// Every reduction is deterministic: each thread owns a fixed set of elements and sums them in
// a fixed order, then a fixed tree (or a fixed sequential loop) combines the threads. There are
// no atomics, so the same inputs always give the same bits.
//
// Dispatches: forward = group_norm_stats (one workgroup per (n,g), two passes over the group:
// mean, then the centred sum of squares, so var never suffers the E[x^2]-E[x]^2 cancellation)
// + group_norm_forward (one thread per element). Backward = group_norm_backward_partials
// (per-(n, pixel split, c) sums of dy*xhat and dy into a scratch buffer) + group_norm_backward_group_sums
// (per-(n,g) sums of dxhat, dxhat*xhat from those partials) + group_norm_backward_params
// (dgamma, dbeta: fixed-order sum over the partial rows) + group_norm_backward_dx (per element).

struct Params {
    batch: u32,      // N
    pixels: u32,     // H*W
    channels: u32,   // C
    groups: u32,     // G
    cpg: u32,        // channels per group, C/G
    splits: u32,     // S: pixel splits of the backward partial sums
    split_len: u32,  // pixels per split, ceil(pixels / S)
    numel: u32,      // N*H*W*C
    accumulate: u32, // backward_params: 1 = add into dgamma/dbeta, 0 = overwrite
    eps: f32,
    inv_count: f32,  // 1 / M
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> gamma: array<f32>;
@group(0) @binding(3) var<storage, read> beta: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read_write> mean_out: array<f32>;
@group(0) @binding(6) var<storage, read_write> rstd_out: array<f32>;
@group(0) @binding(7) var<storage, read> mean: array<f32>;
@group(0) @binding(8) var<storage, read> rstd: array<f32>;
@group(0) @binding(9) var<storage, read> dy: array<f32>;
// [2, N*S, C]: row-sums of dy*xhat (part 0) and of dy (part 1) per (n, split, c).
@group(0) @binding(10) var<storage, read_write> partials_out: array<f32>;
@group(0) @binding(11) var<storage, read> partials: array<f32>;
// [2, N*G]: sum of dxhat (part 0) and of dxhat*xhat (part 1) per (n, g).
@group(0) @binding(12) var<storage, read_write> gsums_out: array<f32>;
@group(0) @binding(13) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(14) var<storage, read_write> dbeta: array<f32>;
@group(0) @binding(15) var<storage, read> gsums: array<f32>;
@group(0) @binding(16) var<storage, read_write> dx: array<f32>;

const WG: u32 = 256u;

var<workgroup> red: array<f32, 256>;
var<workgroup> red2: array<f32, 256>;

fn linear_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid;
}

// Fixed binary tree over the 256 slots of `red`; the result is in red[0] for every thread.
fn tree_sum(lid: u32) -> f32 {
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) { red[lid] = red[lid] + red[lid + s]; }
        workgroupBarrier();
    }
    let total = red[0];
    // Everyone has read red[0] before the next reduction overwrites it.
    workgroupBarrier();
    return total;
}

// One workgroup per (n, g). Element e of the group (e < M) is pixel q = e / cpg, channel
// g*cpg + e % cpg; thread `lid` takes e = lid, lid + 256, ... (q and c stepped incrementally to
// avoid a division per element).
@compute @workgroup_size(256)
fn group_norm_stats(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let gi = wid.y * nwg.x + wid.x; // uniform across the workgroup, so the return keeps barriers uniform
    if (gi >= p.batch * p.groups) { return; }
    let n = gi / p.groups;
    let g = gi % p.groups;
    let base = n * p.pixels * p.channels + g * p.cpg;
    let step_q = WG / p.cpg;
    let step_c = WG % p.cpg;

    // Pass 1: mean.
    var acc = 0.0;
    var q = lid / p.cpg;
    var c = lid % p.cpg;
    while (q < p.pixels) {
        acc = acc + x[base + q * p.channels + c];
        c = c + step_c;
        q = q + step_q;
        if (c >= p.cpg) { c = c - p.cpg; q = q + 1u; }
    }
    red[lid] = acc;
    let mu = tree_sum(lid) * p.inv_count;

    // Pass 2: centred sum of squares (two-pass variance, accurate for large |mean|/std).
    acc = 0.0;
    q = lid / p.cpg;
    c = lid % p.cpg;
    while (q < p.pixels) {
        let d = x[base + q * p.channels + c] - mu;
        acc = acc + d * d;
        c = c + step_c;
        q = q + step_q;
        if (c >= p.cpg) { c = c - p.cpg; q = q + 1u; }
    }
    red[lid] = acc;
    let variance = tree_sum(lid) * p.inv_count;
    if (lid == 0u) {
        mean_out[gi] = mu;
        // 1/sqrt rather than inverseSqrt: WGSL allows inverseSqrt 2 ulp, sqrt + divide is tighter.
        rstd_out[gi] = 1.0 / sqrt(variance + p.eps);
    }
}

// y = (x - mean) * rstd * gamma + beta, one thread per element.
@compute @workgroup_size(256)
fn group_norm_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.numel) { return; }
    let c = i % p.channels;
    let n = i / (p.pixels * p.channels);
    let s = n * p.groups + c / p.cpg;
    y[i] = (x[i] - mean[s]) * rstd[s] * gamma[c] + beta[c];
}

// Grid (ceil(C/32), N*S). Thread lid = k*32 + cl handles channel cb*32 + cl and pixels
// q0 + k, q0 + k + 8, ... of split s; the 8 lanes of a channel are then summed in order k = 0..7.
@compute @workgroup_size(256)
fn group_norm_backward_partials(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let cl = lid % 32u;
    let k = lid / 32u;
    let c = wid.x * 32u + cl;
    let row = wid.y; // n * S + s
    let n = row / p.splits;
    let s = row % p.splits;
    let q0 = s * p.split_len;
    let q1 = min(q0 + p.split_len, p.pixels);
    var acc_g = 0.0;
    var acc_b = 0.0;
    if (c < p.channels) {
        let st = n * p.groups + c / p.cpg;
        let mu = mean[st];
        let rs = rstd[st];
        for (var q = q0 + k; q < q1; q = q + 8u) {
            let idx = (n * p.pixels + q) * p.channels + c;
            let g = dy[idx];
            acc_g = acc_g + g * ((x[idx] - mu) * rs);
            acc_b = acc_b + g;
        }
    }
    red[lid] = acc_g;
    red2[lid] = acc_b;
    workgroupBarrier();
    if (k == 0u && c < p.channels) {
        var sg = 0.0;
        var sb = 0.0;
        for (var j = 0u; j < 8u; j = j + 1u) {
            sg = sg + red[j * 32u + cl];
            sb = sb + red2[j * 32u + cl];
        }
        let rows = p.batch * p.splits;
        partials_out[row * p.channels + c] = sg;
        partials_out[(rows + row) * p.channels + c] = sb;
    }
}

// One thread per (n, g): sum dxhat = sum_c gamma[c] * sum dy, sum dxhat*xhat = sum_c gamma[c] *
// sum dy*xhat, over the splits s and the group's channels in a fixed order.
@compute @workgroup_size(256)
fn group_norm_backward_group_sums(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                                  @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    let ng = p.batch * p.groups;
    if (i >= ng) { return; }
    let n = i / p.groups;
    let g = i % p.groups;
    let rows = p.batch * p.splits;
    var s1 = 0.0;
    var s2 = 0.0;
    for (var s = 0u; s < p.splits; s = s + 1u) {
        let row = n * p.splits + s;
        for (var j = 0u; j < p.cpg; j = j + 1u) {
            let c = g * p.cpg + j;
            let ga = gamma[c];
            s2 = s2 + ga * partials[row * p.channels + c];
            s1 = s1 + ga * partials[(rows + row) * p.channels + c];
        }
    }
    gsums_out[i] = s1;
    gsums_out[ng + i] = s2;
}

// One thread per channel: dgamma/dbeta = fixed-order sum over the N*S partial rows.
@compute @workgroup_size(256)
fn group_norm_backward_params(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) lid: u32) {
    let c = linear_index(wid, nwg, lid);
    if (c >= p.channels) { return; }
    let rows = p.batch * p.splits;
    var sg = 0.0;
    var sb = 0.0;
    for (var r = 0u; r < rows; r = r + 1u) {
        sg = sg + partials[r * p.channels + c];
        sb = sb + partials[(rows + r) * p.channels + c];
    }
    if (p.accumulate != 0u) {
        sg = sg + dgamma[c];
        sb = sb + dbeta[c];
    }
    dgamma[c] = sg;
    dbeta[c] = sb;
}

// dx = rstd * (gamma*dy - sum(dxhat)/M - xhat * sum(dxhat*xhat)/M), one thread per element.
@compute @workgroup_size(256)
fn group_norm_backward_dx(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.numel) { return; }
    let c = i % p.channels;
    let n = i / (p.pixels * p.channels);
    let st = n * p.groups + c / p.cpg;
    let rs = rstd[st];
    let xhat = (x[i] - mean[st]) * rs;
    let ng = p.batch * p.groups;
    let m1 = gsums[st] * p.inv_count;
    let m2 = gsums[ng + st] * p.inv_count;
    dx[i] = rs * (gamma[c] * dy[i] - m1 - xhat * m2);
}
