// Sinusoidal timestep embedding, diffusers `get_timestep_embedding` (scale 1, max_period 10000):
//   half = dim / 2,  freq_i = exp(-ln(10000) * i / (half - downscale_freq_shift))  (f32, as torch),
//   emb_i = t * freq_i  (one f32 multiply),  out = [sin(emb), cos(emb)]  ([cos, sin] when
//   flip_sin_to_cos), and a zero last column when dim is odd.
// The frequency table is computed on the host (torch computes it in f32 too) and passed in, so
// every driver sees the same freq_i bits and emb_i is a single correctly rounded product.
//
// Arguments reach ~1000 rad, where GPU sin/cos are imprecise on some drivers (Vulkan only bounds
// their error on [-pi, pi], and loosely). So sin/cos are computed here: Cody-Waite reduction
// r = v - k*pi/2 with pi/2 split into three f32 parts (C1, C2 carry 8 and 11 significant bits, so
// k*C1 and k*C2 are exact for |k| < 4096, i.e. |v| < ~6400 rad; v - k*C1 is exact by Sterbenz), then
// the Cephes sinf/cosf minimax polynomials on |r| <= pi/4 (about 1 ulp) and the quadrant k mod 4.
// One thread per output element.
//
// `fourier_embedding` is diffusers' GaussianFourierProjection (log = True, as UNet2DModel's
// time_embedding_type = "fourier" builds it; Song et al. 2021's NCSN++): with the frozen random
// weights w (binding 2, [half]) and v_i = ((ln t · w_i) · 2) · π in torch's order of f32
// products, out = [sin(v), cos(v)] ([cos, sin] when flip).

struct Params {
    batch: u32, // B
    dim: u32,
    half_dim: u32,
    flip: u32,  // flip_sin_to_cos
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> timesteps: array<f32>;
@group(0) @binding(2) var<storage, read> freqs: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;

const TWO_OVER_PI: f32 = 0.636619772367581343;
// pi/2 = C1 + C2 + C3 (C1 = 0x1.92p0, C2 = 0x1.fb4p-12, C3 = pi/2 - C1 - C2 rounded to f32).
const C1: f32 = 1.5703125;
const C2: f32 = 4.837512969970703125e-4;
const C3: f32 = 7.549790126404332e-8;

fn sin_poly(r: f32) -> f32 {
    let z = r * r;
    return r + r * z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4));
}

fn cos_poly(r: f32) -> f32 {
    let z = r * r;
    return 1.0 - 0.5 * z + z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3 + z * 2.443315711809948e-5));
}

// (sin v, cos v) with explicit range reduction.
fn sincos(v: f32) -> vec2<f32> {
    let kf = round(v * TWO_OVER_PI);
    let r = ((v - kf * C1) - kf * C2) - kf * C3;
    let s = sin_poly(r);
    let c = cos_poly(r);
    // v = k*pi/2 + r: rotate (sin r, cos r) by k quarter turns.
    switch (i32(kf) & 3) {
        case 0: { return vec2<f32>(s, c); }
        case 1: { return vec2<f32>(c, -s); }
        case 2: { return vec2<f32>(-s, -c); }
        default: { return vec2<f32>(-c, s); }
    }
}

@compute @workgroup_size(256)
fn timestep_embedding(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid;
    if (i >= p.batch * p.dim) { return; }
    let b = i / p.dim;
    let j = i % p.dim;
    if (j >= 2u * p.half_dim) { // the zero pad column of an odd dim
        out[i] = 0.0;
        return;
    }
    let second = j >= p.half_dim; // second half of the row
    let f = select(j, j - p.half_dim, second);
    let sc = sincos(timesteps[b] * freqs[f]);
    // Without flip: [sin, cos]; with flip: [cos, sin].
    let want_cos = second != (p.flip != 0u);
    out[i] = select(sc.x, sc.y, want_cos);
}

@compute @workgroup_size(256)
fn fourier_embedding(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let i = (wid.y * nwg.x + wid.x) * WG + lid;
    if (i >= p.batch * p.dim) { return; }
    let b = i / p.dim;
    let j = i % p.dim;
    let second = j >= p.half_dim;
    let f = select(j, j - p.half_dim, second);
    let v = ((log(timesteps[b]) * freqs[f]) * 2.0) * 3.14159274101257324;
    let sc = sincos(v);
    let want_cos = second != (p.flip != 0u);
    out[i] = select(sc.x, sc.y, want_cos);
}
