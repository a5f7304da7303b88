// Portable GEMM and implicit-GEMM conv2d on storage buffers with workgroup-memory tiles.
//
// C = alpha * op(A) * op(B) + beta * C (+ bias[n]), batched, for the linear layers and the
// attention matmuls; conv2d forward, backward-input and backward-weight are the same tiled
// product with A or B gathered on the fly from NHWC activations and torch-layout weights
// [Co, Ci, KH, KW] (an implicit GEMM: no im2col buffer). One tile core, four entry points.
// Deterministic: every output element is one invocation's fixed-order sum over K (and split-K
// partials are summed in a fixed order by reduce.wgsl).
//
// Tile sizes are `override` constants (BM x BN outputs per workgroup, BK deep, TM x TN per
// invocation); real GPUs want larger tiles than lavapipe, whose fast path is gemm_subgroup.wgsl.

//#include gemm_params

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<Elem1>;
@group(0) @binding(2) var<storage, read> b: array<Elem2>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<Elem4>;

override BM: u32 = 64u;
override BN: u32 = 64u;
override BK: u32 = 16u;
override TM: u32 = 4u;
override TN: u32 = 4u;
override WG: u32 = 256u; // must equal (BM / TM) * (BN / TN)
// Half-precision operands (Precision::F16): each A and B value rounded to f16 as it is loaded
// (torch.autocast's f16 GEMM inputs); accumulation stays f32.
override HALF: bool = false;

var<workgroup> a_tile: array<f32, BK * BM>; // [k][m]
var<workgroup> b_tile: array<f32, BK * BN>; // [k][n]

const MODE_GEMM: u32 = 0u;
const MODE_CONV_FORWARD: u32 = 1u;
const MODE_CONV_BACKWARD_INPUT: u32 = 2u;
const MODE_CONV_BACKWARD_WEIGHT: u32 = 3u;

// A[m, k] of this batch (a_base) in the given mode; 0 outside the matrix.
fn load_a(mode: u32, a_base: u32, m: u32, k: u32) -> f32 {
    if (m >= p.m || k >= p.k) { return 0.0; }
    switch mode {
        case 1u: { // conv forward: m = output pixel (n, oy, ox), k = (ky, kx, ci)
            let ci = k % p.in_c;
            let kk = k / p.in_c;
            let kx = kk % p.kernel_w;
            let ky = kk / p.kernel_w;
            let ox = m % p.out_w;
            let oy = (m / p.out_w) % p.out_h;
            let nn = m / (p.out_w * p.out_h);
            let iy = i32(oy * p.stride + ky) - i32(p.pad_top);
            let ix = i32(ox * p.stride + kx) - i32(p.pad_left);
            if (iy < 0 || ix < 0 || iy >= i32(p.in_h) || ix >= i32(p.in_w)) { return 0.0; }
            return f32(a[((nn * p.in_h + u32(iy)) * p.in_w + u32(ix)) * p.in_c + ci]);
        }
        case 2u: { // conv backward-input: m = input pixel (n, iy, ix), k = (ky, kx, co), A = dY
            let co = k % p.out_c;
            let kk = k / p.out_c;
            let kx = kk % p.kernel_w;
            let ky = kk / p.kernel_w;
            let ix = m % p.in_w;
            let iy = (m / p.in_w) % p.in_h;
            let nn = m / (p.in_w * p.in_h);
            let ty = i32(iy + p.pad_top) - i32(ky);
            let tx = i32(ix + p.pad_left) - i32(kx);
            if (ty < 0 || tx < 0) { return 0.0; }
            let oy = u32(ty) / p.stride;
            let ox = u32(tx) / p.stride;
            if (u32(ty) % p.stride != 0u || u32(tx) % p.stride != 0u || oy >= p.out_h || ox >= p.out_w) { return 0.0; }
            return f32(a[((nn * p.out_h + oy) * p.out_w + ox) * p.out_c + co]);
        }
        case 3u: { // conv backward-weight: m = co, k = output pixel, A = dY (NHWC)
            return f32(a[k * p.out_c + m]);
        }
        default: {
            if (p.trans_a != 0u) { return f32(a[a_base + k * p.a_ld + m]); }
            return f32(a[a_base + m * p.a_ld + k]);
        }
    }
}

// B[k, n] of this batch (b_base) in the given mode; 0 outside the matrix.
fn load_b(mode: u32, b_base: u32, k: u32, n: u32) -> f32 {
    if (k >= p.k || n >= p.n) { return 0.0; }
    let taps = p.kernel_h * p.kernel_w;
    switch mode {
        case 1u: { // conv forward: B[(ky, kx, ci), co] = W[co, ci, ky, kx]
            let ci = k % p.in_c;
            let tap = k / p.in_c;
            return f32(b[(n * p.in_c + ci) * taps + tap]);
        }
        case 2u: { // conv backward-input: B[(ky, kx, co), ci] = W[co, ci, ky, kx]
            let co = k % p.out_c;
            let tap = k / p.out_c;
            return f32(b[(co * p.in_c + n) * taps + tap]);
        }
        case 3u: { // conv backward-weight: B[pixel, (ky, kx, ci)] = X[n, oy*s + ky - pt, ox*s + kx - pl, ci]
            let ci = n % p.in_c;
            let tap = n / p.in_c;
            let kx = tap % p.kernel_w;
            let ky = tap / p.kernel_w;
            let ox = k % p.out_w;
            let oy = (k / p.out_w) % p.out_h;
            let nn = k / (p.out_w * p.out_h);
            let iy = i32(oy * p.stride + ky) - i32(p.pad_top);
            let ix = i32(ox * p.stride + kx) - i32(p.pad_left);
            if (iy < 0 || ix < 0 || iy >= i32(p.in_h) || ix >= i32(p.in_w)) { return 0.0; }
            return f32(b[((nn * p.in_h + u32(iy)) * p.in_w + u32(ix)) * p.in_c + ci]);
        }
        default: {
            if (p.trans_b != 0u) { return f32(b[b_base + n * p.b_ld + k]); }
            return f32(b[b_base + k * p.b_ld + n]);
        }
    }
}

// Where C[m, n] of this batch lives. Conv backward-weight writes the torch weight layout
// [Co, Ci, KH, KW]; its split-K slice z goes to c_offset + z * c_batch_outer.
fn c_index(mode: u32, c_base: u32, m: u32, n: u32) -> u32 {
    if (mode == MODE_CONV_BACKWARD_WEIGHT) {
        let ci = n % p.in_c;
        let tap = n / p.in_c;
        return c_base + (m * p.in_c + ci) * p.kernel_h * p.kernel_w + tap;
    }
    return c_base + m * p.c_ld + n;
}

//#include half_round

fn operand(x: f32) -> f32 {
    if (HALF) { return half_round4(vec4<f32>(x)).x; }
    return x;
}

fn tiled(mode: u32, wid: vec3<u32>, tid: u32) {
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;
    var a_base = p.a_offset;
    var b_base = p.b_offset;
    var c_base = p.c_offset;
    var k_begin = 0u;
    var k_end = p.k;
    if (mode == MODE_GEMM) {
        let outer = wid.z / p.batch_inner;
        let inner = wid.z % p.batch_inner;
        a_base += outer * p.a_batch_outer + inner * p.a_batch_inner;
        b_base += outer * p.b_batch_outer + inner * p.b_batch_inner;
        c_base += outer * p.c_batch_outer + inner * p.c_batch_inner;
    } else if (mode == MODE_CONV_BACKWARD_WEIGHT) {
        // split-K: slice z sums pixels [z * k_chunk, (z + 1) * k_chunk)
        k_begin = wid.z * p.k_chunk;
        k_end = min(p.k, k_begin + p.k_chunk);
        c_base += wid.z * p.c_batch_outer;
    }
    let cols = BN / TN;
    let tm = tid / cols;
    let tn = tid % cols;
    var acc: array<f32, 16>; // TM * TN <= 16
    for (var i = 0u; i < TM * TN; i++) { acc[i] = 0.0; }

    for (var k0 = k_begin; k0 < k_end; k0 += BK) {
        for (var i = tid; i < BM * BK; i += WG) {
            let mm = i % BM;
            let kk = i / BM;
            let k = k0 + kk;
            a_tile[kk * BM + mm] = select(0.0, operand(load_a(mode, a_base, m0 + mm, k)), k < k_end);
        }
        for (var i = tid; i < BN * BK; i += WG) {
            let nn = i % BN;
            let kk = i / BN;
            let k = k0 + kk;
            b_tile[kk * BN + nn] = select(0.0, operand(load_b(mode, b_base, k, n0 + nn)), k < k_end);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            for (var i = 0u; i < TM; i++) {
                let av = a_tile[kk * BM + tm + i * (BM / TM)];
                for (var j = 0u; j < TN; j++) {
                    acc[i * TN + j] = fma(av, b_tile[kk * BN + tn + j * cols], acc[i * TN + j]);
                }
            }
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < TM; i++) {
        let m = m0 + tm + i * (BM / TM);
        if (m >= p.m) { continue; }
        for (var j = 0u; j < TN; j++) {
            let n = n0 + tn + j * cols;
            if (n >= p.n) { continue; }
            let ci = c_index(mode, c_base, m, n);
            var v = p.alpha * acc[i * TN + j];
            if (p.has_bias != 0u) { v += bias[n]; }
            if (p.beta != 0.0) { v += p.beta * f32(c[ci]); }
            c[ci] = to_elem4(v);
        }
    }
}

@compute @workgroup_size(WG)
fn gemm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    tiled(MODE_GEMM, wid, tid);
}

@compute @workgroup_size(WG)
fn conv2d_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    tiled(MODE_CONV_FORWARD, wid, tid);
}

@compute @workgroup_size(WG)
fn conv2d_backward_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    tiled(MODE_CONV_BACKWARD_INPUT, wid, tid);
}

@compute @workgroup_size(WG)
fn conv2d_backward_weight(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
    tiled(MODE_CONV_BACKWARD_WEIGHT, wid, tid);
}
