// Diffusion-specific elementwise kernels of training: targets for v-prediction and min-SNR-γ
// loss weights (the sampler updates are in samplers.wgsl).

struct Params {
    n: u32,            // elements
    per_sample: u32,   // elements per sample (H*W*C)
    prediction: u32,   // 0 epsilon, 1 v_prediction, 2 sample
    _reserved: u32,
    gamma: f32,        // min-SNR γ
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;          // x0 / model output
@group(0) @binding(2) var<storage, read> b: array<f32>;          // noise
@group(0) @binding(3) var<storage, read> timesteps: array<u32>;  // per sample
@group(0) @binding(4) var<storage, read> alphas_cumprod: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

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
