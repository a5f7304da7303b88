// Elementwise kernels: add, scale, axpby, SiLU forward/backward, per-channel broadcast add
// (time-embedding injection), channel-slice copies (concat and its backward) and the division
// of each sample by its own scalar (a fourier U-Net's output / σ, and its backward).
// Tensors are flat arrays of f32 or f16 (each binding's `ElemN` is the bound tensor's type,
// src/gpu/kernels.rs; arithmetic is f32); images are channels-last (NHWC), so a pixel's channels
// are contiguous. One invocation per element; the grid may be 2-D when it exceeds 65535 groups.

struct Params {
    n: u32,          // number of elements (or of pixels, for the channel kernels)
    channels: u32,   // channels per pixel of the broadcast operand / copy width
    src_stride: u32, // channels per pixel in the source (copy_channels)
    src_offset: u32, // first source channel (copy_channels)
    dst_stride: u32, // channels per pixel in the destination (copy_channels)
    dst_offset: u32, // first destination channel (copy_channels)
    alpha: f32,
    beta: f32,
    pixels_per_sample: u32, // add_channel_bias: H*W
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem1>;
@group(0) @binding(2) var<storage, read_write> y: array<Elem2>;
@group(0) @binding(3) var<storage, read_write> z: array<Elem3>;

const WG: u32 = 256u;

//#include linear_index

// z = x + y  (bindings: x, y read as inputs through the read_write slot, z)
@compute @workgroup_size(256)
fn add(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < p.n) { z[i] = to_elem3(f32(x[i]) + f32(y[i])); }
}

// y = alpha * x + beta * y   (beta = 0 overwrites y: then y is never read, so NaNs in it vanish)
@compute @workgroup_size(256)
fn axpby(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < p.n) {
        var v = p.alpha * f32(x[i]);
        if (p.beta != 0.0) { v = v + p.beta * f32(y[i]); }
        y[i] = to_elem2(v);
    }
}

// y = alpha * y (in place; binds y only)
@compute @workgroup_size(256)
fn scale(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < p.n) { y[i] = to_elem2(p.alpha * f32(y[i])); }
}

// z = x / y[i / pixels_per_sample]: each sample divided by its own scalar (here
// pixels_per_sample counts the sample's elements). diffusers' UNet2DModel with fourier time
// embeddings returns conv_out / σ; the backward is the same division of the gradient.
@compute @workgroup_size(256)
fn divide_per_sample(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < p.n) { z[i] = to_elem3(f32(x[i]) / f32(y[i / p.pixels_per_sample])); }
}

// Causal mask of attention scores [blocks · T, T] (p.channels = T keys per row, p.n elements):
// row r is query r mod T, which may not attend to later keys: y[r, j] = float32's lowest for
// j > r mod T, as transformers' 4-D causal mask (torch.finfo(float32).min), which softmax turns
// into exact zeros (and whose gradient through softmax is then zero). In place.
@compute @workgroup_size(256)
fn causal_mask(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < p.n) {
        let row = i / p.channels;
        let key = i % p.channels;
        if (key > row % p.channels) { y[i] = to_elem2(-3.40282347e38); }
    }
}

//#include sigmoid

// y = silu(x) = x * sigmoid(x)
@compute @workgroup_size(256)
fn silu_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < p.n) {
        let v = f32(x[i]);
        y[i] = to_elem2(v * sigmoid(v));
    }
}

// dx = dy * silu'(x), silu'(x) = s * (1 + x * (1 - s)), s = sigmoid(x).
// Bindings: x (forward input), dy (through the y slot, read only here), dx (z);
// dx = beta * dx + dy * silu'(x) so a gradient can be accumulated.
@compute @workgroup_size(256)
fn silu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < p.n) {
        let v = f32(x[i]);
        let s = sigmoid(v);
        var g = f32(y[i]) * s * (1.0 + v * (1.0 - s));
        if (p.beta != 0.0) { g = g + p.beta * f32(z[i]); }
        z[i] = to_elem3(g);
    }
}

// y[n, q, c] += alpha * x[n, c] for every pixel q of sample n: the time-embedding projection
// added to a resnet's hidden state (diffusers ResnetBlock2D, `hidden_states + temb[:, :, None, None]`).
@compute @workgroup_size(256)
fn add_channel_bias(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < p.n) {
        let c = i % p.channels;
        let sample = i / (p.channels * p.pixels_per_sample);
        y[i] = to_elem2(f32(y[i]) + p.alpha * f32(x[sample * p.channels + c]));
    }
}

// y[q, dst_offset + c] = x[q, src_offset + c] + beta * y[q, dst_offset + c] for c < channels:
// channel concatenation (torch.cat(dim=1) in NCHW is a slice copy in NHWC) and its backward.
@compute @workgroup_size(256)
fn copy_channels(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < p.n * p.channels) {
        let q = i / p.channels;
        let c = i % p.channels;
        let d = q * p.dst_stride + p.dst_offset + c;
        var v = f32(x[q * p.src_stride + p.src_offset + c]);
        if (p.beta != 0.0) { v = v + p.beta * f32(y[d]); }
        y[d] = to_elem2(v);
    }
}

// y = f32(x as u32): integer timesteps (drawn by the RNG as u32 and stored in an f32 buffer's
// bits) to the f32 timesteps the embedding takes.
@compute @workgroup_size(256)
fn cast_u32_to_f32(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < p.n) { y[i] = to_elem2(f32(bitcast<u32>(f32(x[i])))); }
}

// ---- Vectorised variants (used when every count, offset and stride is a multiple of 4 and the
// buffers start on 16-byte boundaries): one vec4 per invocation. Storage-buffer loads are per-lane
// on lavapipe (docs/ARCHITECTURE.md, "Memory-bound kernels on lavapipe"), so a vec4 moves 4 values for the cost of one.
// p.n and the channel fields keep their scalar meaning; each kernel divides by 4 itself.

@group(0) @binding(4) var<storage, read> x4: array<Elem4x4>;
@group(0) @binding(5) var<storage, read_write> y4: array<Elem5x4>;
@group(0) @binding(6) var<storage, read_write> z4: array<Elem6x4>;

@compute @workgroup_size(256)
fn add4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < p.n / 4u) { z4[i] = to_elem6x4(vec4<f32>(x4[i]) + vec4<f32>(y4[i])); }
}

@compute @workgroup_size(256)
fn axpby4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < p.n / 4u) {
        var v = p.alpha * vec4<f32>(x4[i]);
        if (p.beta != 0.0) { v = v + p.beta * vec4<f32>(y4[i]); }
        y4[i] = to_elem5x4(v);
    }
}

// One invocation per pixel, looping over its texels: no per-texel integer division (llvmpipe
// runs a vector integer division as one scalar division per lane).
@compute @workgroup_size(256)
fn add_channel_bias4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let q = linear_index(wid, nwg, lid);
    let c4n = p.channels / 4u;
    if (q < p.n / p.channels) {
        let v0 = (q / p.pixels_per_sample) * c4n;
        for (var c4 = 0u; c4 < c4n; c4++) {
            y4[q * c4n + c4] = to_elem5x4(vec4<f32>(y4[q * c4n + c4]) + p.alpha * vec4<f32>(x4[v0 + c4]));
        }
    }
}

// One invocation per pixel (p.n pixels), looping over the copied texels.
@compute @workgroup_size(256)
fn copy_channels4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let q = linear_index(wid, nwg, lid);
    if (q < p.n) {
        let d0 = (q * p.dst_stride + p.dst_offset) / 4u;
        let s0 = (q * p.src_stride + p.src_offset) / 4u;
        for (var c4 = 0u; c4 < p.channels / 4u; c4++) {
            var v = vec4<f32>(x4[s0 + c4]);
            if (p.beta != 0.0) { v = v + p.beta * vec4<f32>(y4[d0 + c4]); }
            y4[d0 + c4] = to_elem5x4(v);
        }
    }
}
