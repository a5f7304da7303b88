// Deterministic sums of slices: out[g, j] = beta * out[g, j] + sum over s in chunk g of
// src[s * stride + j]. Column sums of an [R, C] matrix (bias gradients) and the sum of split-K
// partials are both this. Each output is one invocation's sum in a fixed order, and the chunk
// partition depends only on the shape, so the result is bit-identical run to run (no atomics).
// With `round_half`, each term is rounded to f16 first: a bias gradient in a half-precision run
// sums the same f16 dY that the weight gradient's GEMM reads (the sum itself stays f32).

struct Params {
    n: u32,          // elements per slice (columns)
    slices: u32,     // total slices
    stride: u32,     // elements between consecutive slices
    chunk: u32,      // slices per output group
    out_stride: u32, // elements between output groups
    beta: f32,
    round_half: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<Elem1>;
@group(0) @binding(2) var<storage, read_write> dst: array<Elem2>;

//#include half_round

// A term of the sum: as stored, or rounded to f16 (`round_half`).
fn term4(v: vec4<f32>) -> vec4<f32> {
    if (p.round_half != 0u) {
        return half_round4(v);
    }
    return v;
}

@compute @workgroup_size(64)
fn sum_slices(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let g = gid.y;
    if (j >= p.n) { return; }
    let s0 = g * p.chunk;
    let s1 = min(p.slices, s0 + p.chunk);
    var acc = 0.0;
    for (var s = s0; s < s1; s++) {
        acc += term4(vec4<f32>(f32(src[s * p.stride + j]))).x;
    }
    let o = g * p.out_stride + j;
    if (p.beta != 0.0) { acc += p.beta * f32(dst[o]); }
    dst[o] = to_elem2(acc);
}

// The same sums 4 columns per invocation, when n, the strides and both bindings' offsets are
// whole texels (multiples of 4 elements): llvmpipe loads storage buffers lane by lane, and a
// vec4 per lane makes a quarter of those trips. Per element: the same slices in the same
// order, the same bits. 16 invocations per workgroup: one lavapipe SIMD row, so short rows
// (64 columns: 16 texels) leave no lanes idle.
@group(0) @binding(3) var<storage, read> src4: array<Elem3x4>;
@group(0) @binding(4) var<storage, read_write> dst4: array<Elem4x4>;

@compute @workgroup_size(16)
fn sum_slices4(@builtin(global_invocation_id) gid: vec3<u32>) {
    let j = gid.x;
    let g = gid.y;
    if (j >= p.n / 4u) { return; }
    let s0 = g * p.chunk;
    let s1 = min(p.slices, s0 + p.chunk);
    let stride4 = p.stride / 4u;
    var acc = vec4<f32>(0.0);
    for (var s = s0; s < s1; s++) {
        acc += term4(vec4<f32>(src4[s * stride4 + j]));
    }
    let o = g * (p.out_stride / 4u) + j;
    if (p.beta != 0.0) { acc += p.beta * vec4<f32>(dst4[o]); }
    dst4[o] = to_elem4x4(acc);
}
