// Diffusion-specific elementwise kernels of training: targets for v-prediction, min-SNR-γ
// loss weights, and EDM's noise levels, preconditioned input and target (the sampler updates
// are in samplers.wgsl).

struct Params {
    n: u32,            // elements
    per_sample: u32,   // elements per sample (H*W*C)
    prediction: u32,   // 0 epsilon, 1 v_prediction, 2 sample
    _reserved: u32,
    gamma: f32,        // min-SNR γ
    p_mean: f32,       // EDM: ln σ ~ N(p_mean, p_std²)
    p_std: f32,
    sigma_data: f32,   // EDM's σ_d
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;          // x0 / model output
@group(0) @binding(2) var<storage, read> b: array<f32>;          // noise
@group(0) @binding(3) var<storage, read> timesteps: array<u32>;  // per sample
@group(0) @binding(4) var<storage, read> alphas_cumprod: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<storage, read_write> out2: array<f32>;
@group(0) @binding(7) var<storage, read> edm_sigma: array<f32>;   // EDM: σ per sample

const WG: u32 = 256u;

//#include linear_index

// v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x0 (Salimans & Ho 2022, §4; diffusers get_velocity).
@compute @workgroup_size(256)
fn v_target(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let acp = alphas_cumprod[timesteps[i / p.per_sample]];
    out[i] = sqrt(acp) * b[i] - sqrt(1.0 - acp) * a[i];
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
    out[s] = w;
}

// EDM training noise levels (Karras et al. 2022, Table 1), per sample from a standard normal
// draw u (binding 1): σ = exp(u·P_std + P_mean) into `out`, and the U-Net's timestep
// c_noise = ¼ ln σ into `out2` (computed from σ, as torch does).
@compute @workgroup_size(64)
fn edm_sigmas(@builtin(global_invocation_id) gid: vec3<u32>) {
    let s = gid.x;
    if (s >= p.n) { return; }
    let sigma = exp(a[s] * p.p_std + p.p_mean);
    out[s] = sigma;
    out2[s] = 0.25 * log(sigma);
}

// EDM's preconditioned training input and target, per element (Table 1): a = y = x0,
// b = n the noise, `edm_sigma` σ per sample; with x = y + σ·n,
//   input  = c_in·x,                  c_in = 1/√(σ²+σ_d²)
//   target = (y − c_skip·x)/c_out,    c_skip = σ_d²/(σ²+σ_d²), c_out = σσ_d/√(σ²+σ_d²),
// so that the MSE of the U-Net output F to `target` equals λ(σ)·(D − y)² with
// D = c_skip·x + c_out·F and λ = 1/c_out² (eq. 8 with Table 1's λ(σ) = (σ²+σ_d²)/(σσ_d)²).
@compute @workgroup_size(256)
fn edm_noised(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let sigma = edm_sigma[i / p.per_sample];
    let sd2 = p.sigma_data * p.sigma_data;
    let v = sigma * sigma + sd2;
    let x = a[i] + b[i] * sigma;
    let c_skip = sd2 / v;
    let c_out = sigma * p.sigma_data / sqrt(v);
    let c_in = 1.0 / sqrt(v);
    out[i] = c_in * x;
    out2[i] = (a[i] - c_skip * x) / c_out;
}
