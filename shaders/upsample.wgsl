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
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

const WG: u32 = 256u;

fn linear_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid;
}

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
    dst[i] = src[((n * p.height + oy / 2u) * p.width + ox / 2u) * p.channels + c];
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
    dst[i] = ((src[b] + src[b + p.channels]) + src[b + row]) + src[b + row + p.channels];
}
