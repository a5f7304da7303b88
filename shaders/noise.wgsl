// Counter-based random numbers and the DDPM forward process.
//
// Philox4x32-10 (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3",
// SC'11): a keyed bijection of a 128-bit counter, so element i of a stream is computed from i
// alone, by any thread, in any dispatch shape. Mapping (src/ops/noise.rs has the full story):
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (index / 4, step, purpose, 0), element index uses word index % 4.
// The seed and step come from a 4-word state buffer the caller rewrites each step
// ([seed lo, seed hi, step, 0]), so a recorded plan never needs rebuilding.

struct Params {
    n: u32,        // elements to write
    first: u32,    // stream index of out[0] (a sub-range gives the same values as the whole)
    purpose: u32,  // stream id (timesteps, noise, dropout...), counter word 2
    range: u32,    // uniform integers in [0, range); 0 = raw 32-bit words
    per_sample: u32, // q_sample: elements per sample (C*H*W)
    num_t: u32,    // q_sample: number of timesteps T (length of alphas_cumprod)
    scale_bits: u32, // dropout: bits of the f32 scale 1 / (1 - p)
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// [seed lo, seed hi, step, 0]; for philox_kat: 8 words per vector (ctr[4], key[2], 0, 0).
@group(0) @binding(1) var<storage, read> rng: array<u32>;
@group(0) @binding(2) var<storage, read_write> out_u32: array<u32>;
@group(0) @binding(3) var<storage, read_write> out_f32: array<f32>;
@group(0) @binding(4) var<storage, read> x0: array<f32>;
@group(0) @binding(5) var<storage, read> eps: array<f32>;
@group(0) @binding(6) var<storage, read> timesteps: array<u32>;
@group(0) @binding(7) var<storage, read> alphas_cumprod: array<f32>;

const WG: u32 = 256u;
const PHILOX_M0: u32 = 0xD2511F53u;
const PHILOX_M1: u32 = 0xCD9E8D57u;
const PHILOX_W0: u32 = 0x9E3779B9u;
const PHILOX_W1: u32 = 0xBB67AE85u;
const PI: f32 = 3.14159265358979;

//#include linear_index

// High 32 bits of the 64-bit product a*b. WGSL has no 64-bit integers, so split into 16-bit
// halves: a*b = hh 2^32 + (lh + hl) 2^16 + ll, and carry the middle column exactly
// (each partial product < 2^32; the column sum < 3 * 2^16).
fn mulhi(a: u32, b: u32) -> u32 {
    let al = a & 0xffffu;
    let ah = a >> 16u;
    let bl = b & 0xffffu;
    let bh = b >> 16u;
    let ll = al * bl;
    let lh = al * bh;
    let hl = ah * bl;
    let hh = ah * bh;
    let mid = (ll >> 16u) + (lh & 0xffffu) + (hl & 0xffffu);
    return hh + (lh >> 16u) + (hl >> 16u) + (mid >> 16u);
}

// One Philox4x32 round (Random123 _philox4x32round).
fn philox_round(c: vec4<u32>, k: vec2<u32>) -> vec4<u32> {
    let hi0 = mulhi(PHILOX_M0, c.x);
    let lo0 = PHILOX_M0 * c.x;
    let hi1 = mulhi(PHILOX_M1, c.z);
    let lo1 = PHILOX_M1 * c.z;
    return vec4<u32>(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
}

// Philox4x32-10: ten rounds, the key bumped by the Weyl constants between rounds.
fn philox4x32_10(ctr: vec4<u32>, key: vec2<u32>) -> vec4<u32> {
    var c = ctr;
    var k = key;
    c = philox_round(c, k);
    for (var r = 1u; r < 10u; r = r + 1u) {
        k = k + vec2<u32>(PHILOX_W0, PHILOX_W1);
        c = philox_round(c, k);
    }
    return c;
}

// The Philox block holding stream element `index` (see the mapping above).
fn block_of(index: u32) -> vec4<u32> {
    let key = vec2<u32>(rng[0], rng[1]);
    return philox4x32_10(vec4<u32>(index / 4u, rng[2], p.purpose, 0u), key);
}

// Uniform in (0, 1] / [0, 1) from the top 24 bits: exact in f32 (24-bit significand).
fn u_open_closed(w: u32) -> f32 {
    return f32((w >> 8u) + 1u) * (1.0 / 16777216.0);
}
fn u_closed_open(w: u32) -> f32 {
    return f32(w >> 8u) * (1.0 / 16777216.0);
}

// ln(u) for u in (0, 1], accurate relative to ln(u) itself. GPU `log` is typically accurate
// only in absolute terms near 1 (WGSL allows 2^-21 absolute on [0.5, 2]; lavapipe errs ~4e-8),
// which would give the small Box–Muller radii (u near 1) relative errors of 1e-3 and more.
// For u >= 0.5: ln u = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), s = (u − 1)/(u + 1) in
// [−1/3, 0], u − 1 exact (Sterbenz); the first omitted term is < 1.4e-8 relative (s^14/15).
fn ln_unit(u: f32) -> f32 {
    if (u < 0.5) { return log(u); }
    let s = (u - 1.0) / (u + 1.0);
    let q = s * s;
    let series = 1.0 + q * (1.0 / 3.0 + q * (1.0 / 5.0 + q * (1.0 / 7.0 + q * (1.0 / 9.0 + q * (1.0 / 11.0 + q * (1.0 / 13.0))))));
    return 2.0 * s * series;
}

// Raw words (range = 0) or uniform integers in [0, range) by multiply-high (Lemire 2019,
// without rejection: bias < range / 2^32).
@compute @workgroup_size(256)
fn random_uniform_u32(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let index = p.first + i;
    let w = block_of(index)[index % 4u];
    var v = w;
    if (p.range != 0u) { v = mulhi(w, p.range); }
    out_u32[i] = v;
}

// Standard normals by Box–Muller: words (w0, w1) give r cos θ, r sin θ with
// r = sqrt(-2 ln u) (ln_unit), u in (0, 1], θ = π (2 v − 1) in [−π, π) (WGSL's accurate range for
// sin/cos); (w2, w3) likewise. Element index takes component index % 4.
@compute @workgroup_size(256)
fn random_normal(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let index = p.first + i;
    let w = block_of(index);
    let j = index % 4u;
    let pair = j / 2u;
    let a = select(w.x, w.z, pair == 1u);
    let b = select(w.y, w.w, pair == 1u);
    let r = sqrt(-2.0 * ln_unit(u_open_closed(a)));
    let theta = PI * (2.0 * u_closed_open(b) - 1.0);
    out_f32[i] = select(r * cos(theta), r * sin(theta), (j & 1u) == 1u);
}

// x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε, t = timesteps[sample] (Ho et al. 2020, eq. 4; diffusers
// DDPMScheduler.add_noise). A timestep past the table is clamped to T − 1 rather than read out
// of bounds (the host cannot validate GPU-resident timesteps).
@compute @workgroup_size(256)
fn q_sample(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let t = min(timesteps[i / p.per_sample], p.num_t - 1u);
    let a = alphas_cumprod[t];
    out_f32[i] = sqrt(a) * x0[i] + sqrt(1.0 - a) * eps[i];
}

// Known-answer check: vector k reads (ctr[4], key[2], _, _) from rng[8k..8k+8] and writes the
// four output words to out_u32[4k..4k+4].
@compute @workgroup_size(256)
fn philox_kat(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let k = linear_index(wid, nwg, lid);
    if (k >= p.n) { return; }
    let b = 8u * k;
    let o = philox4x32_10(vec4<u32>(rng[b], rng[b + 1u], rng[b + 2u], rng[b + 3u]), vec2<u32>(rng[b + 4u], rng[b + 5u]));
    out_u32[4u * k] = o.x;
    out_u32[4u * k + 1u] = o.y;
    out_u32[4u * k + 2u] = o.z;
    out_u32[4u * k + 3u] = o.w;
}

// Inverted dropout (Srivastava et al. 2014): y = x · keep / (1 − p) with keep = (word ≥ p·2^32),
// the word being stream element `first + i` (bindings: x through x0, y through out_f32). The
// mask is a pure function of (seed, purpose, step, index), so the backward pass is this same
// kernel applied to dy: no mask is stored.
@compute @workgroup_size(256)
fn dropout(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let index = p.first + i;
    let w = block_of(index)[index % 4u];
    out_f32[i] = select(0.0, x0[i] * bitcast<f32>(p.scale_bits), w >= p.range);
}
