// Subgroup-broadcast register-tile GEMM and implicit-GEMM conv2d, for adapters with a fixed
// subgroup size L of 8 or 16 (lavapipe). docs/ARCHITECTURE.md, "Fast GEMM on lavapipe": operands are read
// from rgba32float storage textures (vectorised loads on llvmpipe), each lane owns 4 output
// columns and keeps its accumulators in separate variables, and the A values of a lane block
// are shared with subgroupBroadcast, dividing the A loads by L. This file is a template:
// `//#for` blocks and double-brace expressions are expanded by src/gpu/kernels.rs for L (lanes), RB (row blocks
// per subgroup) and SG (subgroups per workgroup), among others. Each output is one lane's
// fixed-order sum: deterministic. Subgroup operations stay in uniform control flow (no early
// returns).
//
// Template CV: how the GEMM and conv tiles store C. llvmpipe executes every branch under an
// execution mask (a uniform `if` still runs both sides) and scatters each storage-buffer store
// lane by lane, so the epilogue of a 4-column-per-lane tile cost as much as 60 k-steps of its
// main loop (sgemm 6272x64x4: 1.4 ms with scalar stores, 0.5 ms with vec4 stores). CV = 4 or 2
// types C as vec4 / vec2 and stores whole vectors; the host picks it when every row of C starts
// at a multiple of CV elements and n is one (src/ops/gemm.rs, `store_width`). CV = 0 stores
// element by element (any layout; the backward-weight pass, whose 4 values per texel are
// strided in dW, always uses it).

//#include gemm_params

@group(0) @binding(0) var<uniform> p: Params;
//#if HALF == 0
@group(0) @binding(1) var a_tex: texture_storage_2d<rgba32float, read>;
@group(0) @binding(2) var b_tex: texture_storage_2d<rgba32float, read>;
//#end
// Template HALF = 1: half-precision operands, as torch.autocast gives a GEMM or conv on a GPU:
// rgba16float textures (widened to f32 on load; accumulation stays f32), and an A read from its
// buffer rounded to f16 first.
//#if HALF
@group(0) @binding(1) var a_tex: texture_storage_2d<rgba16float, read>;
@group(0) @binding(2) var b_tex: texture_storage_2d<rgba16float, read>;
//#end
@group(0) @binding(3) var<storage, read> bias: array<f32>;
//#if CV == 0
@group(0) @binding(4) var<storage, read_write> c: array<Elem4>;
//#end
//#if CV == 2
@group(0) @binding(4) var<storage, read_write> c: array<Elem4x2>;
//#end
//#if CV == 4
@group(0) @binding(4) var<storage, read_write> c: array<Elem4x4>;
//#end
// Template ABUF = 1: the GEMM reads A straight from its row-major buffer (K, ld, offsets and
// batch strides multiples of 4), one vec4 per lane and k-step: A's loads are shared across the
// subgroup by the broadcasts, so reading them from a buffer costs little, and A needs no pack.
@group(0) @binding(5) var<storage, read> a_buf: array<Elem5x4>;
// Template ABUF = 2: A is the transpose of a stored matrix S (A[m, k] = S[k, m]): each lane reads
// its 4 k values as 4 scalar loads of one column of S, so a transposed A needs no pack either.
@group(0) @binding(6) var<storage, read> a_scalar: array<Elem6>;

//#include half_round

// An operand read from a buffer as the GEMM uses it: itself, or rounded to f16 (HALF).
fn operand4(v: vec4<f32>) -> vec4<f32> {
//#if HALF
    return half_round4(v);
//#end
//#if HALF == 0
    return v;
//#end
}

// Element idx of C, whatever its vector type.
fn c_load(idx: u32) -> f32 {
//#if CV == 0
    return f32(c[idx]);
//#end
//#if CV != 0
    return f32(c[idx / {{CV}}u][idx % {{CV}}u]);
//#end
}

fn c_store(idx: u32, r: f32) {
//#if CV == 0
    c[idx] = to_elem4(r);
//#end
//#if CV != 0
    c[idx / {{CV}}u][idx % {{CV}}u] = to_elem4(r);
//#end
}

// The bias of a lane's 4 columns from n0 (indices clamped to the bias; unused past n), read
// once per tile rather than once per output row.
fn lane_bias4(n0: u32) -> vec4<f32> {
    var b = vec4<f32>(0.0);
    if (p.has_bias != 0u) {
        let last = p.n - 1u;
        b = vec4<f32>(bias[min(n0, last)], bias[min(n0 + 1u, last)], bias[min(n0 + 2u, last)],
                      bias[min(n0 + 3u, last)]);
    }
    return b;
}

// Writes 4 columns (from column n0) of output row m: alpha * v + bias (+ beta * old).
fn store_row(m: u32, n0: u32, v: vec4<f32>, c_base: u32, b: vec4<f32>) {
    if (m >= p.m) { return; }
    let row = c_base + m * p.c_ld;
//#if CV == 4
    if (n0 < p.n) {
        let i = (row + n0) / 4u;
        var r = p.alpha * v + b;
        if (p.beta != 0.0) { r += p.beta * vec4<f32>(c[i]); }
        c[i] = to_elem4x4(r);
    }
//#end
//#if CV == 2
    for (var h = 0u; h < 2u; h++) {
        if (n0 + 2u * h < p.n) {
            let i = (row + n0) / 2u + h;
            var r = p.alpha * select(v.xy, v.zw, h == 1u) + select(b.xy, b.zw, h == 1u);
            if (p.beta != 0.0) { r += p.beta * vec2<f32>(c[i]); }
            c[i] = to_elem4x2(r);
        }
    }
//#end
//#if CV == 0
    for (var e = 0u; e < 4u; e++) {
        if (n0 + e < p.n) {
            var r = p.alpha * v[e] + b[e];
            if (p.beta != 0.0) { r += p.beta * f32(c[row + n0 + e]); }
            c[row + n0 + e] = to_elem4(r);
        }
    }
//#end
}

// C = alpha A B (+ bias) (+ beta C). A: rows = batch * m + row, 4 k per texel (or a buffer, ABUF).
// B: rows = batch * k_pad + k, 4 n per texel; or (template TB = 1, B the transpose of a stored
// matrix S [n x k]) S packed as it is stored: rows = batch * n_pad + n, 4 k per texel, and the
// 4 x 4 block of texels (n..n+3, k..k+3) is transposed in registers, which costs nothing on
// lavapipe (a vec4's components are separate SIMD registers). Tile per subgroup:
// (L * RB) rows x (4 * L) columns.
@compute @workgroup_size({{L*SG}})
fn gemm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32,
        @builtin(subgroup_invocation_id) lane: u32) {
    let m0 = (wid.y * {{SG}}u + tid / {{L}}u) * {{L*RB}}u;
    let n4 = wid.x * {{L}}u + lane;
    let n4_load = i32(min(n4, (p.n + 3u) / 4u - 1u));
    let outer = wid.z / p.batch_inner;
    let inner = wid.z % p.batch_inner;
    let c_base = p.c_offset + outer * p.c_batch_outer + inner * p.c_batch_inner;
    let k4n = (p.k + 3u) / 4u;
    let a_row0 = wid.z * p.m;
//#if TB == 0
    let b_row0 = wid.z * k4n * 4u;
//#end
//#if TB == 1
    let b_row = i32(wid.z * ((p.n + 3u) / 4u) * 4u + u32(n4_load) * 4u);
//#end
//#if ABUF == 0
//#for rb in 0..RB
    let arow{{rb}} = i32(a_row0 + min(m0 + {{rb*L}}u + lane, p.m - 1u));
//#end
//#end
//#if ABUF == 1
    let a_base = p.a_offset + outer * p.a_batch_outer + inner * p.a_batch_inner;
//#for rb in 0..RB
    let arow{{rb}} = (a_base + min(m0 + {{rb*L}}u + lane, p.m - 1u) * p.a_ld) / 4u;
//#end
//#end
//#if ABUF == 2
    let a_base = p.a_offset + outer * p.a_batch_outer + inner * p.a_batch_inner;
//#for rb in 0..RB
    let acol{{rb}} = a_base + min(m0 + {{rb*L}}u + lane, p.m - 1u);
//#end
//#end
//#for i in 0..L*RB
    var acc{{i}} = vec4<f32>(0.0);
//#end
    for (var k4 = 0u; k4 < k4n; k4++) {
//#for rb in 0..RB
//#if ABUF == 0
        let a{{rb}} = textureLoad(a_tex, vec2<i32>(i32(k4), arow{{rb}}));
//#end
//#if ABUF == 1
        let a{{rb}} = operand4(vec4<f32>(a_buf[arow{{rb}} + k4]));
//#end
//#if ABUF == 2
        var a{{rb}} = vec4<f32>(0.0);
        for (var kk = 0u; kk < 4u; kk++) {
            let k = k4 * 4u + kk;
            if (k < p.k) { a{{rb}}[kk] = f32(a_scalar[acol{{rb}} + k * p.a_ld]); }
        }
        a{{rb}} = operand4(a{{rb}});
//#end
//#end
//#if TB == 0
        let kr = i32(b_row0 + k4 * 4u);
        let b0 = textureLoad(b_tex, vec2<i32>(n4_load, kr));
        let b1 = textureLoad(b_tex, vec2<i32>(n4_load, kr + 1));
        let b2 = textureLoad(b_tex, vec2<i32>(n4_load, kr + 2));
        let b3 = textureLoad(b_tex, vec2<i32>(n4_load, kr + 3));
//#end
//#if TB == 1
        let t0 = textureLoad(b_tex, vec2<i32>(i32(k4), b_row));
        let t1 = textureLoad(b_tex, vec2<i32>(i32(k4), b_row + 1));
        let t2 = textureLoad(b_tex, vec2<i32>(i32(k4), b_row + 2));
        let t3 = textureLoad(b_tex, vec2<i32>(i32(k4), b_row + 3));
        let b0 = vec4<f32>(t0.x, t1.x, t2.x, t3.x);
        let b1 = vec4<f32>(t0.y, t1.y, t2.y, t3.y);
        let b2 = vec4<f32>(t0.z, t1.z, t2.z, t3.z);
        let b3 = vec4<f32>(t0.w, t1.w, t2.w, t3.w);
//#end
//#for rb in 0..RB
//#for r in 0..L
        let s{{rb}}_{{r}} = subgroupBroadcast(a{{rb}}, {{r}}u);
        acc{{rb*L+r}} = fma(vec4<f32>(s{{rb}}_{{r}}.x), b0, acc{{rb*L+r}});
        acc{{rb*L+r}} = fma(vec4<f32>(s{{rb}}_{{r}}.y), b1, acc{{rb*L+r}});
        acc{{rb*L+r}} = fma(vec4<f32>(s{{rb}}_{{r}}.z), b2, acc{{rb*L+r}});
        acc{{rb*L+r}} = fma(vec4<f32>(s{{rb}}_{{r}}.w), b3, acc{{rb*L+r}});
//#end
//#end
    }
    let b = lane_bias4(n4 * 4u);
//#for i in 0..L*RB
    store_row(m0 + {{i}}u, n4 * 4u, acc{{i}}, c_base, b);
//#end
}

// Writes W columns (from column n0) of output row m: v + bias (+ beta * old); alpha is 1 for
// convs. With CV = W the lane's columns are one vector; CV = 2 < W = 4 stores two halves.
fn store_conv_row(m: u32, n0: u32, v: vec{{W}}<f32>, b: vec{{W}}<f32>) {
    if (m >= p.m) { return; }
    let row = p.c_offset + m * p.c_ld;
//#if CV == W
    if (n0 < p.n) {
        let i = (row + n0) / {{W}}u;
        var r = v + b;
        if (p.beta != 0.0) { r += p.beta * vec{{W}}<f32>(c[i]); }
        c[i] = to_elem4x{{W}}(r);
    }
//#end
//#if CV * 10 + W == 24
    // (CV = 2, W = 4: the template language has no `&&`.)
    for (var h = 0u; h < 2u; h++) {
        if (n0 + 2u * h < p.n) {
            let i = (row + n0) / 2u + h;
            var r = select(v.xy, v.zw, h == 1u) + select(b.xy, b.zw, h == 1u);
            if (p.beta != 0.0) { r += p.beta * vec2<f32>(c[i]); }
            c[i] = to_elem4x2(r);
        }
    }
//#end
//#if CV == 0
    for (var e = 0u; e < {{W}}u; e++) {
        if (n0 + e < p.n) {
            var r = v[e] + b[e];
            if (p.beta != 0.0) { r += p.beta * f32(c[row + n0 + e]); }
            c[row + n0 + e] = to_elem4(r);
        }
    }
//#end
}

// The W columns of a B texel this lane owns: all 4, or (W = 2, for layers of at most 2L output
// channels, where a 4L-wide tile would leave half the lanes computing clamped copies) one half.
fn lane_columns(b: vec4<f32>, upper_half: bool) -> vec{{W}}<f32> {
//#if W == 4
    return b;
//#end
//#if W == 2
    return select(b.xy, b.zw, upper_half);
//#end
}

// Implicit-GEMM conv tile. Forward: rows = output pixels, A = input X (NHWC texture,
// ceil(Ci/4) texels per pixel), B = weights packed [(tap, ci), co]. Backward-input
// (`transposed`): rows = input pixels, A = dY, B = weights packed [(tap, co), ci], and an
// input pixel receives from output pixel (iy + pad - ky) / stride when that divides exactly.
// Tile per subgroup: (L * RB) rows x (W * L) columns; lane l owns columns W l .. W l + W - 1.
fn conv_tile(transposed: bool, wid: vec3<u32>, tid: u32, lane: u32) {
    var oh = p.out_h;
    var ow = p.out_w;
    var ah = p.in_h;
    var aw = p.in_w;
    var ac = p.in_c;
    if (transposed) {
        oh = p.in_h;
        ow = p.in_w;
        ah = p.out_h;
        aw = p.out_w;
        ac = p.out_c;
    }
    let ac4 = (ac + 3u) / 4u;
    let m0 = (wid.y * {{SG}}u + tid / {{L}}u) * {{L*RB}}u;
    let n_first = (wid.x * {{L}}u + lane) * {{W}}u;
    let n4_load = i32(min(n_first / 4u, (p.n + 3u) / 4u - 1u));
    let upper_half = n_first % 4u != 0u;
    // A folded A texture (pack.wgsl): pixel x of an image row sits in texture row part
    // x >> shift, texel column (x & mask) * ac4. Unfolded, shift 31 leaves x as it is.
    let a_parts = max(p.a_fold_parts, 1u);
    let a_shift = select(31u, p.a_fold_shift, a_parts > 1u);
    let a_mask = (1u << a_shift) - 1u;
//#for rb in 0..RB
    let pix{{rb}} = min(m0 + {{rb*L}}u + lane, p.m - 1u);
    let px{{rb}} = pix{{rb}} % ow;
    let py{{rb}} = (pix{{rb}} / ow) % oh;
    let pn{{rb}} = pix{{rb}} / (ow * oh);
//#end
//#for i in 0..L*RB
    var acc{{i}} = vec{{W}}<f32>(0.0);
//#end
    for (var ky = 0u; ky < p.kernel_h; ky++) {
        for (var kx = 0u; kx < p.kernel_w; kx++) {
            let tap = ky * p.kernel_w + kx;
            // The weight texture may be folded into column blocks of whole taps (pack.wgsl).
            let tap_row = (tap % p.b_fold_taps) * ac4;
            let tap_n4 = n4_load + i32((tap / p.b_fold_taps) * ((p.n + 3u) / 4u));
//#for rb in 0..RB
            var ay{{rb}} = i32(py{{rb}} * p.stride + ky) - i32(p.pad_top);
            var ax{{rb}} = i32(px{{rb}} * p.stride + kx) - i32(p.pad_left);
            var ok{{rb}} = true;
            if (transposed) {
                let ty = i32(py{{rb}} + p.pad_top) - i32(ky);
                let tx = i32(px{{rb}} + p.pad_left) - i32(kx);
                ay{{rb}} = ty;
                ax{{rb}} = tx;
                ok{{rb}} = ty >= 0 && tx >= 0;
                // Per-lane integer division is a scalar loop on lavapipe: only strided convs pay it.
                if (p.stride != 1u) {
                    ok{{rb}} = ok{{rb}} && (u32(ty) % p.stride) == 0u && (u32(tx) % p.stride) == 0u;
                    ay{{rb}} = ty / i32(p.stride);
                    ax{{rb}} = tx / i32(p.stride);
                }
            }
            ok{{rb}} = ok{{rb}} && ay{{rb}} >= 0 && ax{{rb}} >= 0 && ay{{rb}} < i32(ah) && ax{{rb}} < i32(aw);
            let axu{{rb}} = u32(select(0, ax{{rb}}, ok{{rb}}));
            let tx{{rb}} = i32((axu{{rb}} & a_mask) * ac4);
            let ty{{rb}} = select(0, (i32(pn{{rb}} * ah) + ay{{rb}}) * i32(a_parts) + i32(axu{{rb}} >> a_shift), ok{{rb}});
//#end
            for (var c4 = 0u; c4 < ac4; c4++) {
//#for rb in 0..RB
                let a{{rb}} = select(vec4<f32>(0.0), textureLoad(a_tex, vec2<i32>(tx{{rb}} + i32(c4), ty{{rb}})), ok{{rb}});
//#end
                let kr = i32((tap_row + c4) * 4u);
                let b0 = lane_columns(textureLoad(b_tex, vec2<i32>(tap_n4, kr)), upper_half);
                let b1 = lane_columns(textureLoad(b_tex, vec2<i32>(tap_n4, kr + 1)), upper_half);
                let b2 = lane_columns(textureLoad(b_tex, vec2<i32>(tap_n4, kr + 2)), upper_half);
                let b3 = lane_columns(textureLoad(b_tex, vec2<i32>(tap_n4, kr + 3)), upper_half);
//#for rb in 0..RB
//#for r in 0..L
                let s{{rb}}_{{r}} = subgroupBroadcast(a{{rb}}, {{r}}u);
                acc{{rb*L+r}} = fma(vec{{W}}<f32>(s{{rb}}_{{r}}.x), b0, acc{{rb*L+r}});
                acc{{rb*L+r}} = fma(vec{{W}}<f32>(s{{rb}}_{{r}}.y), b1, acc{{rb*L+r}});
                acc{{rb*L+r}} = fma(vec{{W}}<f32>(s{{rb}}_{{r}}.z), b2, acc{{rb*L+r}});
                acc{{rb*L+r}} = fma(vec{{W}}<f32>(s{{rb}}_{{r}}.w), b3, acc{{rb*L+r}});
//#end
//#end
            }
        }
    }
    let lane_b = lane_bias4(n_first);
//#if W == 4
    let b = lane_b;
//#end
//#if W == 2
    let b = lane_b.xy;
//#end
//#for i in 0..L*RB
    store_conv_row(m0 + {{i}}u, n_first, acc{{i}}, b);
//#end
}

// Forward and backward-input are one pipeline, the direction a uniform (`p.trans_a` = 1:
// backward-input): llvmpipe JIT-compiles every pipeline at its first dispatch (~7 s for the wide
// tile), and the direction only costs a few integer selects per tap, outside the channel loop.
@compute @workgroup_size({{L*SG}})
fn conv2d_implicit(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32,
                   @builtin(subgroup_invocation_id) lane: u32) {
    conv_tile(p.trans_a != 0u, wid, tid, lane);
}

// dW[co, ci, ky, kx] over output pixels [z * k_chunk, (z + 1) * k_chunk) into split-K slice z.
// Rows = 4 BL output channels (lane l < BL loads the dY texel of channels 4l..4l+3 at each pixel
// and broadcasts it; BL < L for layers with fewer than 4L output channels), columns = CT texels
// (tap, 4 input channels) per lane, read from X (NHWC texture) at the pixel shifted by the
// column's tap. Tile per subgroup: 4 BL rows x CT L texel columns. With `has_bias`, the first
// column tile also sums the dY texels it loads (the bias gradient, Σ dy over the slice's pixels)
// into c[slice + bias_at + co]: no separate pass over dY for it.
fn store_dw(co: u32, tap: u32, ci4: u32, v: vec4<f32>, c_base: u32) {
    if (co >= p.out_c) { return; }
    let taps = p.kernel_h * p.kernel_w;
    for (var e = 0u; e < 4u; e++) {
        let ci = ci4 * 4u + e;
        if (ci < p.in_c) {
            // beta = 1 accumulates into dw (one slice written directly, no split-K sum pass).
            let idx = c_base + (co * p.in_c + ci) * taps + tap;
            var r = v[e];
            if (p.beta != 0.0) { r += p.beta * c_load(idx); }
            c_store(idx, r);
        }
    }
}

// One subgroup per workgroup: the texel columns (taps x Ci / 4, e.g. 72) rarely fill several
// subgroups' worth, and the idle lanes of a part-filled tile still run the whole loop.
@compute @workgroup_size({{L}})
fn conv2d_backward_weight(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32,
                          @builtin(subgroup_invocation_id) lane: u32) {
    let ci4n = (p.in_c + 3u) / 4u;
    let co4n = (p.out_c + 3u) / 4u;
    let taps = p.kernel_h * p.kernel_w;
    let cols = taps * ci4n;
    let j_base = wid.x * {{L*CT}}u + lane;
//#for t in 0..CT
    let j{{t}} = j_base + {{t*L}}u;
    let jl{{t}} = min(j{{t}}, cols - 1u);
    let tap{{t}} = jl{{t}} / ci4n;
    let ci4_{{t}} = jl{{t}} % ci4n;
    let ky{{t}} = tap{{t}} / p.kernel_w;
    let kx{{t}} = tap{{t}} % p.kernel_w;
//#end
    let co4 = min(wid.y * {{BL}}u + lane, co4n - 1u);
//#for i in 0..4*BL*CT
    var acc{{i}} = vec4<f32>(0.0);
//#end
    let k_begin = wid.z * p.k_chunk;
    let k_end = min(p.k, k_begin + p.k_chunk);
    var ox = k_begin % p.out_w;
    var oy = (k_begin / p.out_w) % p.out_h;
    var nn = k_begin / (p.out_w * p.out_h);
    var dy_sum = vec4<f32>(0.0);
    for (var k = k_begin; k < k_end; k++) {
        let a = textureLoad(a_tex, vec2<i32>(i32(ox * co4n + co4), i32(nn * p.out_h + oy)));
        dy_sum += a;
//#for t in 0..CT
        let iy{{t}} = i32(oy * p.stride + ky{{t}}) - i32(p.pad_top);
        let ix{{t}} = i32(ox * p.stride + kx{{t}}) - i32(p.pad_left);
        let ok{{t}} = iy{{t}} >= 0 && ix{{t}} >= 0 && iy{{t}} < i32(p.in_h) && ix{{t}} < i32(p.in_w);
        let bx{{t}} = select(0, ix{{t}} * i32(ci4n) + i32(ci4_{{t}}), ok{{t}});
        let by{{t}} = select(0, i32(nn * p.in_h) + iy{{t}}, ok{{t}});
        let b{{t}} = select(vec4<f32>(0.0), textureLoad(b_tex, vec2<i32>(bx{{t}}, by{{t}})), ok{{t}});
//#end
//#for s in 0..BL
        let s{{s}} = subgroupBroadcast(a, {{s}}u);
//#for t in 0..CT
        acc{{(4*s)*CT+t}} = fma(vec4<f32>(s{{s}}.x), b{{t}}, acc{{(4*s)*CT+t}});
        acc{{(4*s+1)*CT+t}} = fma(vec4<f32>(s{{s}}.y), b{{t}}, acc{{(4*s+1)*CT+t}});
        acc{{(4*s+2)*CT+t}} = fma(vec4<f32>(s{{s}}.z), b{{t}}, acc{{(4*s+2)*CT+t}});
        acc{{(4*s+3)*CT+t}} = fma(vec4<f32>(s{{s}}.w), b{{t}}, acc{{(4*s+3)*CT+t}});
//#end
//#end
        ox += 1u;
        if (ox == p.out_w) {
            ox = 0u;
            oy += 1u;
            if (oy == p.out_h) {
                oy = 0u;
                nn += 1u;
            }
        }
    }
    let c_base = p.c_offset + wid.z * p.c_batch_outer;
    if (p.has_bias != 0u && wid.x == 0u && lane < {{BL}}u && wid.y * {{BL}}u + lane < co4n) {
        for (var e = 0u; e < 4u; e++) {
            let co = co4 * 4u + e;
            if (co < p.out_c) {
                let idx = c_base + p.bias_at + co;
                var r = dy_sum[e];
                if (p.beta != 0.0) { r += p.beta * c_load(idx); }
                c_store(idx, r);
            }
        }
    }
//#for t in 0..CT
    if (j{{t}} < cols) {
//#for i in 0..4*BL
        store_dw(wid.y * {{4*BL}}u + {{i}}u, tap{{t}}, ci4_{{t}}, acc{{i*CT+t}}, c_base);
//#end
    }
//#end
}
