// Packs GEMM operands from storage buffers into rgba32float (or, HALF, rgba16float) textures for
// the subgroup path (gemm_subgroup.wgsl). On lavapipe, texture loads are vectorised while non-uniform buffer loads
// become per-lane scalar loops (docs/ARCHITECTURE.md, "Fast GEMM on lavapipe"), so the GEMM reads textures.
// A texel holds 4 consecutive columns; columns and rows beyond the matrix are zero, so the
// GEMM needs no bounds checks along K.

struct Params {
    rows: u32,        // matrix rows per batch
    cols: u32,        // matrix columns
    rows_padded: u32, // texture rows per batch (>= rows)
    batch_inner: u32,
    offset: u32,
    ld: u32,
    batch_outer_stride: u32,
    batch_inner_stride: u32,
    trans: u32,       // element (r, c) is src[c * ld + r] instead of src[r * ld + c]
    width: u32,       // texture width in texels
    height: u32,      // texture height in rows
    channels: u32,    // pack_nhwc: channels per pixel in the buffer
    // pack_conv_weight: W is [Co, Ci, KH, KW]; rows = (tap, k-channel padded to 4), cols = channels
    k_channels: u32,
    n_channels: u32,
    taps: u32,
    io_swapped: u32,  // 0: rows over ci, columns over co (forward); 1: rows over co, columns over ci
    // pack_conv_weight: taps per column block. A matrix taller than a texture (SD's 2560-channel
    // 3x3 convs: 23040 rows) is folded at whole taps: taps [j*fold_taps, (j+1)*fold_taps) sit in
    // texel columns [j*n4, (j+1)*n4), n4 = ceil(n_channels / 4).
    fold_taps: u32,
    // pack_nhwc: pixels per image row, and texture rows per image row (1: not folded; see
    // `NhwcLayout` in src/ops/pack.rs).
    image_w: u32,
    fold_parts: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<Elem1>;
//#if HALF == 0
@group(0) @binding(2) var dst: texture_storage_2d<rgba32float, write>;
//#end
// Template HALF = 1: half-precision operands (the store rounds each value to f16).
//#if HALF
@group(0) @binding(2) var dst: texture_storage_2d<rgba16float, write>;
//#end
// The same source seen as vec4s (pack_matrix_vec4: rows of whole, aligned texels).
@group(0) @binding(3) var<storage, read> src4: array<Elem3x4>;

//#include half_round

// A texel as the texture keeps it: rounded to f16 by hand for rgba16float (HALF; see
// half_round), as is for rgba32float.
fn stored(v: vec4<f32>) -> vec4<f32> {
//#if HALF
    return half_round4(v);
//#end
//#if HALF == 0
    return v;
//#end
}

fn texel_coords(wid: vec3<u32>, lid: vec3<u32>) -> vec2<u32> {
    return vec2<u32>(wid.x * 16u + lid.x, wid.y * 4u + lid.y);
}

// Matrix packs run on a (texel column, row, batch) grid: workgroup (16, 4) covers 16 texels of 4
// rows of one batch, so no invocation divides (lavapipe has no vector integer division: each
// `/` or `%` of a per-lane value costs one scalar division per lane).
fn matrix_texel(wid: vec3<u32>, lid: vec3<u32>) -> vec2<u32> {
    return vec2<u32>(wid.x * 16u + lid.x, wid.y * 4u + lid.y);
}

// First source element of batch wid.z (batches = outer x inner).
fn batch_base(batch: u32) -> u32 {
    return p.offset + (batch / p.batch_inner) * p.batch_outer_stride + (batch % p.batch_inner) * p.batch_inner_stride;
}

// A (batched, optionally transposed) strided matrix, batches stacked along texture rows.
@compute @workgroup_size(16, 4)
fn pack_matrix(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = matrix_texel(wid, lid);
    let r = t.y;
    if (t.x >= p.width || r >= p.rows_padded) { return; }
    let base = batch_base(wid.z);
    var v = vec4<f32>(0.0);
    if (r < p.rows) {
        for (var e = 0u; e < 4u; e++) {
            let col = t.x * 4u + e;
            if (col < p.cols) {
                var idx = base + r * p.ld + col;
                if (p.trans != 0u) { idx = base + col * p.ld + r; }
                v[e] = f32(src[idx]);
            }
        }
    }
    textureStore(dst, vec2<u32>(t.x, wid.z * p.rows_padded + r), stored(v));
}

// pack_matrix for the common case of a non-transposed matrix whose rows are whole, 16-byte
// aligned texels (cols, ld, offset and batch strides multiples of 4): one vec4 load per texel
// instead of four scalar loads (non-uniform buffer loads are scalarised on lavapipe).
@compute @workgroup_size(16, 4)
fn pack_matrix_vec4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = matrix_texel(wid, lid);
    let r = t.y;
    if (t.x >= p.width || r >= p.rows_padded) { return; }
    var v = vec4<f32>(0.0);
    if (r < p.rows) {
        v = vec4<f32>(src4[(batch_base(wid.z) + r * p.ld) / 4u + t.x]);
    }
    textureStore(dst, vec2<u32>(t.x, wid.z * p.rows_padded + r), stored(v));
}

// An NHWC activation [N, H, W, C] as a texture of ceil(C/4) texels per pixel, channels
// zero-padded to a multiple of 4: one texture row per image row, or (fold_parts > 1, an image
// row wider than a texture) fold_parts rows of width / ceil(C/4) pixels each, the last part's
// pixels past the image zero.
@compute @workgroup_size(16, 4)
fn pack_nhwc(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = texel_coords(wid, lid);
    if (t.x >= p.width || t.y >= p.height) { return; }
    let c4 = (p.channels + 3u) / 4u;
    let part_pixels = p.width / c4;
    let image_row = t.y / p.fold_parts;
    let x = (t.y % p.fold_parts) * part_pixels + t.x / c4;
    let c0 = (t.x % c4) * 4u;
    let pixel = image_row * p.image_w + x;
    var v = vec4<f32>(0.0);
    if (x < p.image_w) {
        for (var e = 0u; e < 4u; e++) {
            if (c0 + e < p.channels) { v[e] = f32(src[pixel * p.channels + c0 + e]); }
        }
    }
    textureStore(dst, t, stored(v));
}

// pack_nhwc where each texture row is a run of the buffer (channels a multiple of 4, image rows
// of whole parts): texel (x, y) is vec4 y · width + x, one load and no division per texel. What
// a buffer-to-texture copy does, for the rows a copy cannot take (a pitch not a multiple of 256
// bytes) and for rgba16float, which needs the rounding.
@compute @workgroup_size(16, 4)
fn pack_nhwc_vec4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = texel_coords(wid, lid);
    if (t.x >= p.width || t.y >= p.height) { return; }
    textureStore(dst, t, stored(vec4<f32>(src4[t.y * p.width + t.x])));
}

// Conv weights W [Co, Ci, KH, KW] as the B operand of an implicit GEMM: row (tap, kc) with kc
// over the reduction channels padded to a multiple of 4, texel x = 4 output channels.
// Forward: reduce over ci, columns co. Backward-input (io_swapped): reduce over co, columns ci.
@compute @workgroup_size(16, 4)
fn pack_conv_weight(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = texel_coords(wid, lid);
    if (t.x >= p.width || t.y >= p.height) { return; }
    let kpad = ((p.k_channels + 3u) / 4u) * 4u;
    let n4 = (p.n_channels + 3u) / 4u;
    let tap = (t.x / n4) * p.fold_taps + t.y / kpad;
    let kc = t.y % kpad;
    var v = vec4<f32>(0.0);
    if (kc < p.k_channels && tap < p.taps) {
        for (var e = 0u; e < 4u; e++) {
            let nc = (t.x % n4) * 4u + e;
            if (nc < p.n_channels) {
                var co = nc;
                var ci = kc;
                if (p.io_swapped != 0u) { co = kc; ci = nc; }
                let in_c = select(p.k_channels, p.n_channels, p.io_swapped != 0u);
                v[e] = f32(src[(co * in_c + ci) * p.taps + tap]);
            }
        }
    }
    textureStore(dst, t, stored(v));
}
