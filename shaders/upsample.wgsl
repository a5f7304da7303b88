// Resampling of channels-last (NHWC) images for super-resolution: bicubic upsampling by an
// integer factor and average pooling (the low-resolution input), then the U-Net's
// nearest-neighbour x2 upsampling with its backward.
//
// Nearest-neighbour x2 upsampling of channels-last (NHWC) images (torch F.interpolate(mode="nearest",
// scale_factor=2), as in diffusers Upsample2D):
//   forward:  y[n, oy, ox, c] = x[n, oy / 2, ox / 2, c]            (one thread per output element)
//   backward: dx[n, iy, ix, c] = sum_{a,b in {0,1}} dy[n, 2iy + a, 2ix + b, c]
//             (one thread per input element, children summed in the fixed order (0,0), (0,1),
//             (1,0), (1,1): deterministic, no atomics, and dx is overwritten)

struct Params {
    numel: u32,  // elements of the tensor this dispatch writes
    height: u32, // H of the small (input) image
    width: u32,  // W of the small image
    channels: u32,
    factor: u32, // bicubic / average pooling: the integer scale factor (nearest x2: unused)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<Elem1>;
@group(0) @binding(2) var<storage, read_write> dst: array<Elem2>;

const WG: u32 = 256u;

//#include linear_index

// src = x [N, H, W, C], dst = y [N, 2H, 2W, C].
@compute @workgroup_size(256)
fn upsample_nearest2x_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.numel) { return; }
    let c = i % p.channels;
    let pix = i / p.channels;
    let ox = pix % (2u * p.width);
    let t = pix / (2u * p.width);
    let oy = t % (2u * p.height);
    let n = t / (2u * p.height);
    dst[i] = to_elem2(f32(src[((n * p.height + oy / 2u) * p.width + ox / 2u) * p.channels + c]));
}

// src = dy [N, 2H, 2W, C], dst = dx [N, H, W, C].
@compute @workgroup_size(256)
fn upsample_nearest2x_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                               @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.numel) { return; }
    let c = i % p.channels;
    let pix = i / p.channels;
    let ix = pix % p.width;
    let t = pix / p.width;
    let iy = t % p.height;
    let n = t / p.height;
    let row = 2u * p.width * p.channels; // one output row
    let b = ((n * 2u * p.height + 2u * iy) * 2u * p.width + 2u * ix) * p.channels + c;
    dst[i] = to_elem2(((f32(src[b]) + f32(src[b + p.channels])) + f32(src[b + row])) + f32(src[b + row + p.channels]));
}

// The same for C a multiple of 4, one thread per (input pixel, 4-channel texel), without the
// scalar kernels' five integer divisions per element (llvmpipe runs a vector integer division
// as one scalar division per lane; the scalar forward wrote 0.6 GB/s). Workgroup row wid.y + nwg.y
// * wid.z is input row r = n H + iy, whose output rows are 2r and 2r + 1; x runs over W C/4.
@group(0) @binding(3) var<storage, read> src4: array<Elem3x4>;
@group(0) @binding(4) var<storage, read_write> dst4: array<Elem4x4>;

const WG4: u32 = 64u;

// An invocation's input texel (index `small` in x / dx) and the first of its 2 x 2 children
// (index `big` in y / dy; the others at + c4n, + out_row, + out_row + c4n), in texels.
struct TexelSite {
    live: bool,
    small: u32,
    big: u32,
    c4n: u32,
    out_row: u32,
}

fn texel_site(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> TexelSite {
    let c4n = p.channels / 4u;
    let xi = wid.x * WG4 + lid;
    let r = wid.y + nwg.y * wid.z;
    let ix = xi / c4n;
    let out_row = 2u * p.width * c4n;
    let live = xi < p.width * c4n && r < p.numel;
    return TexelSite(live, r * p.width * c4n + xi, 2u * r * out_row + 2u * ix * c4n + xi % c4n,
                     c4n, out_row);
}

// src = x [N, H, W, C], dst = y [N, 2H, 2W, C]: copies one texel to its 2 x 2 children.
@compute @workgroup_size(64)
fn upsample_nearest2x_forward4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                               @builtin(local_invocation_index) lid: u32) {
    let t = texel_site(wid, nwg, lid);
    if (!t.live) { return; }
    let v = vec4<f32>(src4[t.small]);
    dst4[t.big] = to_elem4x4(v);
    dst4[t.big + t.c4n] = to_elem4x4(v);
    dst4[t.big + t.out_row] = to_elem4x4(v);
    dst4[t.big + t.out_row + t.c4n] = to_elem4x4(v);
}

// src = dy [N, 2H, 2W, C], dst = dx [N, H, W, C]: children summed in the scalar kernel's order.
@compute @workgroup_size(64)
fn upsample_nearest2x_backward4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                                @builtin(local_invocation_index) lid: u32) {
    let t = texel_site(wid, nwg, lid);
    if (!t.live) { return; }
    let b = t.big;
    dst4[t.small] = to_elem4x4(((vec4<f32>(src4[b]) + vec4<f32>(src4[b + t.c4n])) + vec4<f32>(src4[b + t.out_row])) + vec4<f32>(src4[b + t.out_row + t.c4n]));
}

// torch F.interpolate(mode="bicubic", align_corners=False, scale_factor=k) (Keys' cubic
// convolution with A = −0.75; aten/src/ATen/native/UpSample.h): for output x, the source
// position is (x + 0.5)/k − 0.5 (not clamped), taps at floor − 1 .. floor + 2 with their indices
// clamped to the image, weights from the fractional part. Separable: 4 × 4 taps per output.
// src = small [N, H, W, C], dst = [N, kH, kW, C].
const CUBIC_A: f32 = -0.75;

fn cubic_weights(t: f32) -> vec4<f32> {
    // cubic_convolution2(t + 1), cubic_convolution1(t), cubic_convolution1(1 − t),
    // cubic_convolution2(2 − t)
    let x0 = t + 1.0;
    let x1 = t;
    let x2 = 1.0 - t;
    let x3 = 2.0 - t;
    let w0 = ((CUBIC_A * x0 - 5.0 * CUBIC_A) * x0 + 8.0 * CUBIC_A) * x0 - 4.0 * CUBIC_A;
    let w1 = ((CUBIC_A + 2.0) * x1 - (CUBIC_A + 3.0)) * x1 * x1 + 1.0;
    let w2 = ((CUBIC_A + 2.0) * x2 - (CUBIC_A + 3.0)) * x2 * x2 + 1.0;
    let w3 = ((CUBIC_A * x3 - 5.0 * CUBIC_A) * x3 + 8.0 * CUBIC_A) * x3 - 4.0 * CUBIC_A;
    return vec4<f32>(w0, w1, w2, w3);
}

@compute @workgroup_size(256)
fn upsample_bicubic_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.numel) { return; }
    let k = p.factor;
    let c = i % p.channels;
    let pix = i / p.channels;
    let ox = pix % (k * p.width);
    let t = pix / (k * p.width);
    let oy = t % (k * p.height);
    let n = t / (k * p.height);
    let scale = 1.0 / f32(k);
    let real_x = scale * (f32(ox) + 0.5) - 0.5;
    let real_y = scale * (f32(oy) + 0.5) - 0.5;
    let fx = floor(real_x);
    let fy = floor(real_y);
    let wx = cubic_weights(real_x - fx);
    let wy = cubic_weights(real_y - fy);
    let last_x = i32(p.width) - 1;
    let last_y = i32(p.height) - 1;
    var acc = 0.0;
    for (var a = 0; a < 4; a = a + 1) {
        let sy = u32(clamp(i32(fy) - 1 + a, 0, last_y));
        var row = 0.0;
        for (var b = 0; b < 4; b = b + 1) {
            let sx = u32(clamp(i32(fx) - 1 + b, 0, last_x));
            row = row + wx[b] * f32(src[((n * p.height + sy) * p.width + sx) * p.channels + c]);
        }
        acc = acc + wy[a] * row;
    }
    dst[i] = to_elem2(acc);
}

// Average pooling by k (torch F.avg_pool2d(kernel_size=k)): src = [N, kH, kW, C] (the big
// image), dst = [N, H, W, C]; height/width are the small image's.
@compute @workgroup_size(256)
fn avg_pool_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.numel) { return; }
    let k = p.factor;
    let c = i % p.channels;
    let pix = i / p.channels;
    let x = pix % p.width;
    let t = pix / p.width;
    let y = t % p.height;
    let n = t / p.height;
    let bw = k * p.width;
    var acc = 0.0;
    for (var a = 0u; a < k; a = a + 1u) {
        for (var b = 0u; b < k; b = b + 1u) {
            acc = acc + f32(src[((n * k * p.height + k * y + a) * bw + k * x + b) * p.channels + c]);
        }
    }
    dst[i] = to_elem2(acc / f32(k * k));
}
