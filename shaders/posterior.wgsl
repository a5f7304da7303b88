// The VAE's diagonal Gaussian posterior (diffusers' DiagonalGaussianDistribution; Kingma & Welling
// 2014, §2.4, the reparameterisation trick): the encoder's moments [P, 2L] per pixel (NHWC: the
// first L channels the mean μ, the last L the log-variance) give
//   logvar = clamp(moments[L..2L], -30, 20),  σ = exp(logvar / 2),  z = μ + σ·ε
// (ε = 0 gives the mode, z = μ). Backward: dμ = dz, dlogvar = dz·ε·σ/2 where the clamp passes
// (torch.clamp's gradient is 1 inside [min, max], bounds included, and 0 outside).
// The KL divergence to N(0, I) (Kingma & Welling 2014, appendix B), summed over each latent and
// averaged over the batch as the VAE's loss uses it:
//   kl_mean = (1/B) Σ ½(μ² + exp(logvar) − 1 − logvar),
//   d(w·kl_mean)/dμ = w·μ/B,  d(w·kl_mean)/d logvar = w·½(exp(logvar) − 1)/B inside the clamp,
// added (+=) into the moments' gradient; the sum is the deterministic two-stage reduction of
// loss.wgsl (fixed chunks and trees here, its `sum_finish` for stage 2).

struct Params {
    n: u32,        // P·L: elements of z
    latent: u32,   // L
    factor: f32,   // KL backward: w / B
    scaled: u32,   // KL backward: 1 when the gradient is of the loss × loss_scale[0]
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> moments: array<Elem1>;       // [P, 2L]
@group(0) @binding(2) var<storage, read> eps: array<Elem2>;           // [P, L]
@group(0) @binding(3) var<storage, read_write> z: array<Elem3>;       // [P, L]
@group(0) @binding(4) var<storage, read> dz: array<Elem4>;            // [P, L]
@group(0) @binding(5) var<storage, read_write> dmoments: array<Elem5>; // [P, 2L]
@group(0) @binding(6) var<storage, read_write> partials: array<f32>; // KL stage 1
// The GradScaler's state (its scale first) when `scaled`: a half-precision step's gradients are
// of the loss × scale, the reconstruction term's and this one's alike.
@group(0) @binding(7) var<storage, read> loss_scale: array<f32>;

const WG: u32 = 256u;
const ITEMS: u32 = 8u;          // elements per thread in the KL's stage 1
const CHUNK: u32 = WG * ITEMS;  // elements per workgroup (src/ops/posterior.rs: KL_CHUNK)
const LOGVAR_MIN: f32 = -30.0;
const LOGVAR_MAX: f32 = 20.0;

//#include linear_index

//#include group_index

//#include tree_sum

// (index of μ, index of the raw log-variance) in moments for element i of z.
fn moment_index(i: u32) -> vec2<u32> {
    let pixel = i / p.latent;
    let c = i - pixel * p.latent;
    let m = pixel * 2u * p.latent + c;
    return vec2<u32>(m, m + p.latent);
}

@compute @workgroup_size(256)
fn posterior_sample(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let at = moment_index(i);
    let logvar = clamp(f32(moments[at.y]), LOGVAR_MIN, LOGVAR_MAX);
    z[i] = to_elem3(f32(moments[at.x]) + exp(0.5 * logvar) * f32(eps[i]));
}

// Writes both halves of dmoments (overwriting): one invocation per element of z.
@compute @workgroup_size(256)
fn posterior_sample_backward(@builtin(workgroup_id) wid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>,
                             @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let at = moment_index(i);
    let raw = f32(moments[at.y]);
    let inside = raw >= LOGVAR_MIN && raw <= LOGVAR_MAX;
    let sigma = exp(0.5 * clamp(raw, LOGVAR_MIN, LOGVAR_MAX));
    dmoments[at.x] = to_elem5(f32(dz[i]));
    dmoments[at.y] = to_elem5(select(0.0, f32(dz[i]) * f32(eps[i]) * 0.5 * sigma, inside));
}

// ½(μ² + exp(logvar) − 1 − logvar) of element i of the latent.
fn kl_term(i: u32) -> f32 {
    let at = moment_index(i);
    let mean = f32(moments[at.x]);
    let logvar = clamp(f32(moments[at.y]), LOGVAR_MIN, LOGVAR_MAX);
    return 0.5 * (mean * mean + exp(logvar) - 1.0 - logvar);
}

// KL stage 1: partials[g] = Σ over chunk g of the KL terms.
@compute @workgroup_size(256)
fn posterior_kl_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wid, nwg);
    let base = g * CHUNK + lid;
    var acc = 0.0;
    for (var k = 0u; k < ITEMS; k = k + 1u) {
        let i = base + k * WG;
        if (i < p.n) { acc = acc + kl_term(i); }
    }
    let total = tree_sum(lid, acc);
    if (lid == 0u) { partials[g] = total; }
}

// dmoments += the gradient of factor·Σ KL terms (× loss_scale[0] when `scaled`).
@compute @workgroup_size(256)
fn posterior_kl_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let at = moment_index(i);
    let raw = f32(moments[at.y]);
    let inside = raw >= LOGVAR_MIN && raw <= LOGVAR_MAX;
    let var_ = exp(clamp(raw, LOGVAR_MIN, LOGVAR_MAX));
    let factor = select(p.factor, p.factor * loss_scale[0], p.scaled != 0u);
    dmoments[at.x] = to_elem5(f32(dmoments[at.x]) + factor * f32(moments[at.x]));
    dmoments[at.y] = to_elem5(f32(dmoments[at.y]) + select(0.0, factor * 0.5 * (var_ - 1.0), inside));
}
