// Diffusion-specific elementwise kernels: training targets for v-prediction, min-SNR-γ loss
// weights, and the DDPM sampler step (diffusers DDPMScheduler.step, variance "fixed_small").
// Per-step scalars (timestep coefficients) come from a small storage buffer the caller rewrites
// before each submit, so one recorded plan serves every sampling step.

struct Params {
    n: u32,            // elements
    per_sample: u32,   // elements per sample (H*W*C)
    prediction: u32,   // 0 epsilon, 1 v_prediction, 2 sample
    clip_sample: u32,  // DDPM step: clamp the x0 estimate to [-1, 1]
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
// DDPM step coefficients: [sqrt(ᾱ_t), sqrt(1-ᾱ_t), x0 coefficient, x_t coefficient, σ_t]
@group(0) @binding(6) var<storage, read> step_coeffs: array<f32>;

const WG: u32 = 256u;

fn linear_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid;
}

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

// One DDPM reverse step in place on x_t (out), from the model output (a) and fresh noise z (b):
// x0 = prediction → x0 estimate (clamped to [-1, 1] when clip_sample), then
// x_prev = c_x0·x0 + c_xt·x_t + σ·z (Ho et al. 2020, eq. 7, "fixed_small" variance).
@compute @workgroup_size(256)
fn ddpm_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let sqrt_acp = step_coeffs[0];
    let sqrt_one_minus_acp = step_coeffs[1];
    let x = out[i];
    let m = a[i];
    var x0 = m;
    if (p.prediction == 0u) { x0 = (x - sqrt_one_minus_acp * m) / sqrt_acp; }
    if (p.prediction == 1u) { x0 = sqrt_acp * x - sqrt_one_minus_acp * m; }
    if (p.clip_sample != 0u) { x0 = clamp(x0, -1.0, 1.0); }
    out[i] = step_coeffs[2] * x0 + step_coeffs[3] * x + step_coeffs[4] * b[i];
}
