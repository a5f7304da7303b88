// Diffusion-specific elementwise kernels of training: targets for v-prediction, min-SNR-γ
// loss weights, EDM's noise levels, preconditioned input and target, and the VE-SDE's noise
// levels, perturbed input and score target (the sampler updates are in samplers.wgsl).

struct Params {
    n: u32,            // elements
    per_sample: u32,   // elements per sample (H*W*C)
    prediction: u32,   // 0 epsilon, 1 v_prediction, 2 sample
    _reserved: u32,
    gamma: f32,        // min-SNR γ
    k0: f32,           // per-kernel constants: EDM (P_mean, P_std, σ_d), VE-SDE (σ_min, σ_max, ε)
    k1: f32,
    k2: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<Elem1>;          // x0 / model output
@group(0) @binding(2) var<storage, read> b: array<Elem2>;          // noise
@group(0) @binding(3) var<storage, read> timesteps: array<u32>;  // per sample
@group(0) @binding(4) var<storage, read> alphas_cumprod: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<Elem5>;
@group(0) @binding(6) var<storage, read_write> out2: array<Elem6>;
@group(0) @binding(7) var<storage, read> sigma_of: array<f32>;    // EDM, VE-SDE: σ per sample

const WG: u32 = 256u;

//#include linear_index

// v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x0 (Salimans & Ho 2022, §4; diffusers get_velocity).
@compute @workgroup_size(256)
fn v_target(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let acp = alphas_cumprod[timesteps[i / p.per_sample]];
    out[i] = to_elem5(sqrt(acp) * f32(b[i]) - sqrt(1.0 - acp) * f32(a[i]));
}

// Per-sample min-SNR-γ weight (Hang et al. 2023, eq. 10), SNR = ᾱ/(1 − ᾱ):
// ε: min(SNR, γ)/SNR, v: min(SNR, γ)/(SNR + 1), x0: min(SNR, γ).
@compute @workgroup_size(64)
fn min_snr_weights(@builtin(global_invocation_id) gid: vec3<u32>) {
    let s = gid.x;
    if (s >= p.n) { return; }
    let acp = alphas_cumprod[timesteps[s]];
    let snr = acp / (1.0 - acp);
    let m = min(snr, p.gamma);
    var w = m;
    if (p.prediction == 0u) { w = m / snr; }
    if (p.prediction == 1u) { w = m / (snr + 1.0); }
    out[s] = to_elem5(w);
}

// EDM training noise levels (Karras et al. 2022, Table 1), per sample from a standard normal
// draw u (binding 1): σ = exp(u·P_std + P_mean) into `out`, and the U-Net's timestep
// c_noise = ¼ ln σ into `out2` (computed from σ, as torch does).
@compute @workgroup_size(64)
fn edm_sigmas(@builtin(global_invocation_id) gid: vec3<u32>) {
    let s = gid.x;
    if (s >= p.n) { return; }
    let sigma = exp(f32(a[s]) * p.k1 + p.k0);
    out[s] = to_elem5(sigma);
    out2[s] = to_elem6(0.25 * log(sigma));
}

// EDM's preconditioned training input and target, per element (Table 1): a = y = x0,
// b = n the noise, `sigma_of` σ per sample; with x = y + σ·n,
//   input  = c_in·x,                  c_in = 1/√(σ²+σ_d²)
//   target = (y − c_skip·x)/c_out,    c_skip = σ_d²/(σ²+σ_d²), c_out = σσ_d/√(σ²+σ_d²),
// so that the MSE of the U-Net output F to `target` equals λ(σ)·(D − y)² with
// D = c_skip·x + c_out·F and λ = 1/c_out² (eq. 8 with Table 1's λ(σ) = (σ²+σ_d²)/(σσ_d)²).
@compute @workgroup_size(256)
fn edm_noised(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let sigma = sigma_of[i / p.per_sample];
    let sigma_data = p.k2;
    let sd2 = sigma_data * sigma_data;
    let v = sigma * sigma + sd2;
    let x = f32(a[i]) + f32(b[i]) * sigma;
    let c_skip = sd2 / v;
    let c_out = sigma * sigma_data / sqrt(v);
    let c_in = 1.0 / sqrt(v);
    out[i] = to_elem5(c_in * x);
    out2[i] = to_elem6((f32(a[i]) - c_skip * x) / c_out);
}

// VE-SDE training noise levels (Song et al. 2021, Appendix C): from u32 draws k in [0, 2^24)
// (binding 3), t = (k/2^24)·(1 − ε) + ε ~ U(ε, 1) as `torch.rand(B)·(1 − eps) + eps`, and
// σ = σ_min·(σ_max/σ_min)^t into `out` (the U-Net's timestep: it takes σ) with the loss weight
// λ = σ² into `out2`.
@compute @workgroup_size(64)
fn ve_sigmas(@builtin(global_invocation_id) gid: vec3<u32>) {
    let s = gid.x;
    if (s >= p.n) { return; }
    let u = f32(timesteps[s]) / 16777216.0;
    let t = u * (1.0 - p.k2) + p.k2;
    let sigma = p.k0 * pow(p.k1 / p.k0, t);
    out[s] = to_elem5(sigma);
    out2[s] = to_elem6(sigma * sigma);
}

// The VE-SDE's perturbed input and score target per element: the data x0 in [−1, 1] (a) is
// taken to [0, 1] as y = ½x0 + ½ (the VE-SDE's data range), then input = y + σ·z and
// target = −z/σ, the score of the perturbation kernel N(y, σ²) (eq. 7 with λ = σ² as a weight).
@compute @workgroup_size(256)
fn ve_noised(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let sigma = sigma_of[i / p.per_sample];
    let y = 0.5 * f32(a[i]) + 0.5;
    out[i] = to_elem5(y + f32(b[i]) * sigma);
    out2[i] = to_elem6(-f32(b[i]) / sigma);
}
