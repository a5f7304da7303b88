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
// Fused SiLU (diffusers' norm → SiLU pairs): the forward writes silu(v) only, v = xhat*gamma +
// beta; the backward takes d silu(v) and forms dy = d silu(v) * silu'(v) on the fly, with
// silu'(v) = s (1 + v (1 - s)), s = sigmoid(v) exactly as the unfused silu_backward does, so a
// tensor pass is saved each way and the values equal the unfused pair's.
//
// Dispatches: forward = group_norm_stats_partial + group_norm_stats (per-column two-pass
// statistics merged per group with Chan's formula, so var never suffers the E[x^2]-E[x]^2
// cancellation) + group_norm_forward (per channel, looping over a pixel split). Backward = group_norm_backward_partials
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
    silu: u32,       // 1 = SiLU fused after the affine (forward: y = silu(v); backward: dy given
                     // for silu(v), the pre-activation v recomputed from x, mean, rstd, gamma, beta)
    add_dx: u32,     // backward dx: 1 = add into dx (a gradient that other paths also feed),
                     // 0 = overwrite; saves a scratch tensor and a pass over it
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem1>;
@group(0) @binding(2) var<storage, read> gamma: array<f32>;
@group(0) @binding(3) var<storage, read> beta: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<Elem4>;
@group(0) @binding(5) var<storage, read_write> mean_out: array<f32>;
@group(0) @binding(6) var<storage, read_write> rstd_out: array<f32>;
@group(0) @binding(7) var<storage, read> mean: array<f32>;
@group(0) @binding(8) var<storage, read> rstd: array<f32>;
@group(0) @binding(9) var<storage, read> dy: array<Elem9>;
// [2, N*S, C]: row-sums of dy*xhat (part 0) and of dy (part 1) per (n, split, c).
@group(0) @binding(10) var<storage, read_write> partials_out: array<f32>;
@group(0) @binding(11) var<storage, read> partials: array<f32>;
// [2, N*G]: sum of dxhat (part 0) and of dxhat*xhat (part 1) per (n, g).
@group(0) @binding(12) var<storage, read_write> gsums_out: array<f32>;
@group(0) @binding(13) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(14) var<storage, read_write> dbeta: array<f32>;
@group(0) @binding(15) var<storage, read> gsums: array<f32>;
@group(0) @binding(16) var<storage, read_write> dx: array<Elem16>;

const WG: u32 = 256u;

var<workgroup> red: array<f32, 256>;
var<workgroup> red2: array<f32, 256>;

//#include linear_index

//#include sigmoid

// The gradient reaching the normalised value: dy itself, or through the fused SiLU.
fn grad_of_norm(g: f32, xhat: f32, ga: f32, be: f32) -> f32 {
    if (p.silu == 0u) { return g; }
    let v = xhat * ga + be;
    let s = sigmoid(v);
    return g * s * (1.0 + v * (1.0 - s));
}

// Statistics in two barrier-free dispatches (lavapipe runs barriers as coroutines and turns
// per-element integer division into scalar code, so neither appears in a loop here):
// group_norm_stats_partial: one invocation per (n, pixel split s, channel c) computes the
// count, mean and centred sum of squares M2 of its column of the split (two passes over data
// that stays in cache); group_norm_stats: one invocation per (n, g) merges the (s, c) partials
// of its group in a fixed order with Chan et al.'s pairwise update
//   n = na + nb, d = mb - ma, m = ma + d nb / n, M2 = M2a + M2b + d^2 na nb / n,
// which is as accurate as a two-pass variance and deterministic.
@compute @workgroup_size(32)
fn group_norm_stats_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = wid.x * 32u + lid;
    let row = wid.y; // n * S + s
    if (c >= p.channels) { return; }
    let n = row / p.splits;
    let s = row % p.splits;
    let q0 = s * p.split_len;
    let q1 = min(q0 + p.split_len, p.pixels);
    let base = n * p.pixels * p.channels + c;
    var sum = 0.0;
    for (var q = q0; q < q1; q = q + 1u) {
        sum = sum + f32(x[base + q * p.channels]);
    }
    let cnt = f32(q1 - q0);
    let m = sum / cnt;
    var m2 = 0.0;
    for (var q = q0; q < q1; q = q + 1u) {
        let d = f32(x[base + q * p.channels]) - m;
        m2 = m2 + d * d;
    }
    let rows = p.batch * p.splits;
    partials_out[row * p.channels + c] = m;
    partials_out[(rows + row) * p.channels + c] = m2;
}

@compute @workgroup_size(64)
fn group_norm_stats(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    if (i >= p.batch * p.groups) { return; }
    let n = i / p.groups;
    let g = i % p.groups;
    let rows = p.batch * p.splits;
    var cnt = 0.0;
    var mu = 0.0;
    var m2 = 0.0;
    for (var s = 0u; s < p.splits; s = s + 1u) {
        let row = n * p.splits + s;
        let nb = f32(min((s + 1u) * p.split_len, p.pixels) - s * p.split_len);
        for (var j = 0u; j < p.cpg; j = j + 1u) {
            let c = g * p.cpg + j;
            let mb = partials[row * p.channels + c];
            let m2b = partials[(rows + row) * p.channels + c];
            let total = cnt + nb;
            let d = mb - mu;
            mu = mu + d * (nb / total);
            m2 = m2 + m2b + d * d * (cnt * nb / total);
            cnt = total;
        }
    }
    mean_out[i] = mu;
    // 1/sqrt rather than inverseSqrt: WGSL allows inverseSqrt 2 ulp, sqrt + divide is tighter.
    rstd_out[i] = 1.0 / sqrt(m2 * p.inv_count + p.eps);
}

// y = (x - mean) * rstd * gamma + beta. One invocation per (n, pixel split, channel): the
// per-channel values are loaded once and the pixel loop has no division.
@compute @workgroup_size(32)
fn group_norm_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = wid.x * 32u + lid;
    let row = wid.y;
    if (c >= p.channels) { return; }
    let n = row / p.splits;
    let s = row % p.splits;
    let q0 = s * p.split_len;
    let q1 = min(q0 + p.split_len, p.pixels);
    let st = n * p.groups + c / p.cpg;
    let mu = mean[st];
    let rs = rstd[st];
    let ga = gamma[c];
    let be = beta[c];
    let base = n * p.pixels * p.channels + c;
    for (var q = q0; q < q1; q = q + 1u) {
        let idx = base + q * p.channels;
        let v = (f32(x[idx]) - mu) * rs * ga + be;
        if (p.silu != 0u) { y[idx] = to_elem4(v * sigmoid(v)); } else { y[idx] = to_elem4(v); }
    }
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
        let ga = gamma[c];
        let be = beta[c];
        for (var q = q0 + k; q < q1; q = q + 8u) {
            let idx = (n * p.pixels + q) * p.channels + c;
            let xhat = (f32(x[idx]) - mu) * rs;
            let g = grad_of_norm(f32(dy[idx]), xhat, ga, be);
            acc_g = acc_g + g * xhat;
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

// dx = rstd * (gamma*dy - sum(dxhat)/M - xhat * sum(dxhat*xhat)/M), one invocation per
// (n, pixel split, channel) as in group_norm_forward.
@compute @workgroup_size(32)
fn group_norm_backward_dx(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = wid.x * 32u + lid;
    let row = wid.y;
    if (c >= p.channels) { return; }
    let n = row / p.splits;
    let s = row % p.splits;
    let q0 = s * p.split_len;
    let q1 = min(q0 + p.split_len, p.pixels);
    let st = n * p.groups + c / p.cpg;
    let rs = rstd[st];
    let mu = mean[st];
    let ng = p.batch * p.groups;
    let m1 = gsums[st] * p.inv_count;
    let m2 = gsums[ng + st] * p.inv_count;
    let ga = gamma[c];
    let be = beta[c];
    let base = n * p.pixels * p.channels + c;
    for (var q = q0; q < q1; q = q + 1u) {
        let idx = base + q * p.channels;
        let xhat = (f32(x[idx]) - mu) * rs;
        var v = rs * (ga * grad_of_norm(f32(dy[idx]), xhat, ga, be) - m1 - xhat * m2);
        if (p.add_dx != 0u) { v = v + f32(dx[idx]); }
        dx[idx] = to_elem16(v);
    }
}

// ---- Vectorised variants, used when C % 4 == 0: one invocation per (n, pixel split, 4-channel
// texel), reading and writing vec4 (storage-buffer loads are per-lane on lavapipe, so a vec4
// load moves 4 values for the cost of one). The flat index i = (n * S + s) * C/4 + c4 puts
// neighbouring texels of a pixel in neighbouring lanes even when C/4 is smaller than the
// workgroup. Each component follows the scalar kernel's formula; the partial rows keep its
// [2, N*S, C] layout, so group_norm_stats, _backward_group_sums and _backward_params serve both.

@group(0) @binding(17) var<storage, read> x4: array<Elem17x4>;
@group(0) @binding(18) var<storage, read_write> y4: array<Elem18x4>;
@group(0) @binding(19) var<storage, read> dy4: array<Elem19x4>;
@group(0) @binding(20) var<storage, read_write> dx4: array<Elem20x4>;
@group(0) @binding(21) var<storage, read_write> partials4_out: array<vec4<f32>>;

const WG4: u32 = 64u;

// The pixel run of flat invocation i: texel c4 of pixels [q0, q1) of sample n, split s
// (row = n * S + s); `base + q * c4n` indexes pixel q's texel. live is false past the end.
struct TexelRun {
    live: bool,
    row: u32,
    n: u32,
    c4: u32,
    c4n: u32,
    q0: u32,
    q1: u32,
    base: u32,
}

fn texel_run(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> TexelRun {
    let i = (wid.y * nwg.x + wid.x) * WG4 + lid;
    let c4n = p.channels / 4u;
    let row = i / c4n;
    let c4 = i % c4n;
    let n = row / p.splits;
    let q0 = (row % p.splits) * p.split_len;
    let q1 = min(q0 + p.split_len, p.pixels);
    return TexelRun(row < p.batch * p.splits, row, n, c4, c4n, q0, q1, n * p.pixels * c4n + c4);
}

// Group statistics (mean, rstd) of the 4 channels of texel c4 in sample n; channels of one
// texel may belong to different groups when C/G < 4.
fn group_stat4(n: u32, c4: u32, which: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        let st = n * p.groups + (c4 * 4u + e) / p.cpg;
        v[e] = select(rstd[st], mean[st], which == 0u);
    }
    return v;
}

fn gamma4(c4: u32) -> vec4<f32> {
    return vec4<f32>(gamma[c4 * 4u], gamma[c4 * 4u + 1u], gamma[c4 * 4u + 2u], gamma[c4 * 4u + 3u]);
}

// Read only when the SiLU is fused (otherwise a stand-in buffer is bound).
fn beta4(c4: u32) -> vec4<f32> {
    return vec4<f32>(beta[c4 * 4u], beta[c4 * 4u + 1u], beta[c4 * 4u + 2u], beta[c4 * 4u + 3u]);
}

fn sigmoid4(v: vec4<f32>) -> vec4<f32> {
    return 1.0 / (1.0 + exp(-v));
}

fn grad_of_norm4(g: vec4<f32>, xhat: vec4<f32>, ga: vec4<f32>, be: vec4<f32>) -> vec4<f32> {
    if (p.silu == 0u) { return g; }
    let v = xhat * ga + be;
    let s = sigmoid4(v);
    return g * s * (1.0 + v * (1.0 - s));
}

@compute @workgroup_size(64)
fn group_norm_stats_partial4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                             @builtin(local_invocation_index) lid: u32) {
    let r = texel_run(wid, nwg, lid);
    if (!r.live) { return; }
    let rows = p.batch * p.splits;
    var sum = vec4<f32>(0.0);
    for (var q = r.q0; q < r.q1; q = q + 1u) {
        sum = sum + vec4<f32>(x4[r.base + q * r.c4n]);
    }
    let m = sum / f32(r.q1 - r.q0);
    var m2 = vec4<f32>(0.0);
    for (var q = r.q0; q < r.q1; q = q + 1u) {
        let d = vec4<f32>(x4[r.base + q * r.c4n]) - m;
        m2 = m2 + d * d;
    }
    partials4_out[r.row * r.c4n + r.c4] = m;
    partials4_out[(rows + r.row) * r.c4n + r.c4] = m2;
}

@compute @workgroup_size(64)
fn group_norm_forward4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let r = texel_run(wid, nwg, lid);
    if (!r.live) { return; }
    let mu = group_stat4(r.n, r.c4, 0u);
    let rs = group_stat4(r.n, r.c4, 1u);
    let ga = gamma4(r.c4);
    let be = beta4(r.c4);
    for (var q = r.q0; q < r.q1; q = q + 1u) {
        let idx = r.base + q * r.c4n;
        let v = (vec4<f32>(x4[idx]) - mu) * rs * ga + be;
        if (p.silu != 0u) { y4[idx] = to_elem18x4(v * sigmoid4(v)); } else { y4[idx] = to_elem18x4(v); }
    }
}

// Per-(n, split, texel) sums of dy*xhat and dy over the split's pixels, in pixel order.
@compute @workgroup_size(64)
fn group_norm_backward_partials4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                                 @builtin(local_invocation_index) lid: u32) {
    let r = texel_run(wid, nwg, lid);
    if (!r.live) { return; }
    let rows = p.batch * p.splits;
    let mu = group_stat4(r.n, r.c4, 0u);
    let rs = group_stat4(r.n, r.c4, 1u);
    let ga = gamma4(r.c4);
    let be = beta4(r.c4);
    var acc_g = vec4<f32>(0.0);
    var acc_b = vec4<f32>(0.0);
    for (var q = r.q0; q < r.q1; q = q + 1u) {
        let idx = r.base + q * r.c4n;
        let xhat = (vec4<f32>(x4[idx]) - mu) * rs;
        let g = grad_of_norm4(vec4<f32>(dy4[idx]), xhat, ga, be);
        acc_g = acc_g + g * xhat;
        acc_b = acc_b + g;
    }
    partials4_out[r.row * r.c4n + r.c4] = acc_g;
    partials4_out[(rows + r.row) * r.c4n + r.c4] = acc_b;
}

@compute @workgroup_size(64)
fn group_norm_backward_dx4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) lid: u32) {
    let r = texel_run(wid, nwg, lid);
    if (!r.live) { return; }
    let mu = group_stat4(r.n, r.c4, 0u);
    let rs = group_stat4(r.n, r.c4, 1u);
    let ng = p.batch * p.groups;
    var m1 = vec4<f32>(0.0);
    var m2 = vec4<f32>(0.0);
    for (var e = 0u; e < 4u; e++) {
        let st = r.n * p.groups + (r.c4 * 4u + e) / p.cpg;
        m1[e] = gsums[st] * p.inv_count;
        m2[e] = gsums[ng + st] * p.inv_count;
    }
    let ga = gamma4(r.c4);
    let be = beta4(r.c4);
    for (var q = r.q0; q < r.q1; q = q + 1u) {
        let idx = r.base + q * r.c4n;
        let xhat = (vec4<f32>(x4[idx]) - mu) * rs;
        var v = rs * (ga * grad_of_norm4(vec4<f32>(dy4[idx]), xhat, ga, be) - m1 - xhat * m2);
        if (p.add_dx != 0u) { v = v + vec4<f32>(dx4[idx]); }
        dx4[idx] = to_elem20x4(v);
    }
}
