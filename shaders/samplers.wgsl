// Sampler updates with diffusers' semantics (src/diffusion/scheduler.rs computes the per-step
// constants): DDPM (Ho et al. 2020, eq. 7), DDIM (Song et al. 2021, eq. 12), DPM-Solver++ 2M
// (Lu et al. 2022, Algorithm 2, midpoint), and Euler / Heun steps in σ-space (Karras et al. 2022,
// Algorithms 1–2 with s_churn = 0), the VE-SDE's predictor–corrector and probability-flow ODE
// steps (Song et al. 2021, Algorithms 2 and 5; diffusers' ScoreSdeVeScheduler), PNDM's PLMS
// steps (Liu et al. 2022; diffusers' PNDMScheduler with skip_prk_steps), plus
// `scale_model_input`.
//
// Every constant that changes from step to step is read from `coeffs` (12 floats the host
// rewrites before each submit), so one recorded plan serves the whole loop:
//   coeffs[0..2] = (a, s): the x0 estimate from the model output m and the current x,
//                  ε: x0 = (x − s·m)/a, v: x0 = a·x − s·m, sample: x0 = m;
//   coeffs[2..5] = the update's own constants (see each entry point);
//   coeffs[5..7] = inpainting's known-region coefficients;
//   coeffs[7]    = the model-input scale of `scale_model_input`;
//   coeffs[8..12] = PLMS's history weights and flags.

struct Params {
    n: u32,           // elements (of x: one copy of the batch)
    prediction: u32,  // 0 epsilon, 1 v_prediction, 2 sample
    clip: u32,        // clamp the x0 estimate to [−clip_range, clip_range]
    clip_range: f32,
    copies: u32,      // scale_model_input: copies of the batch written (2 for guidance)
    guidance: f32,    // guidance_combine: the scale s
    per_image: u32,   // inpaint_known: elements of one image (known/keep are one image, broadcast)
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> model_output: array<Elem1>;
@group(0) @binding(2) var<storage, read> z: array<f32>;            // fresh noise of this step
@group(0) @binding(3) var<storage, read> coeffs: array<f32>;
@group(0) @binding(4) var<storage, read_write> x: array<f32>;      // the sample, updated in place
@group(0) @binding(5) var<storage, read_write> aux0: array<f32>;   // DPM: previous x0; Heun: saved x
@group(0) @binding(6) var<storage, read_write> aux1: array<f32>;   // Heun: saved derivative
@group(0) @binding(7) var<storage, read> src: array<f32>;          // scale_model_input's input
@group(0) @binding(8) var<storage, read> known: array<f32>;        // inpainting: the original image
@group(0) @binding(9) var<storage, read> keep: array<f32>;         // inpainting: 1 = keep, 0 = regenerate
@group(0) @binding(10) var<storage, read_write> aux2: array<f32>;  // PLMS: third-newest model output
@group(0) @binding(11) var<storage, read_write> aux3: array<f32>;  // PLMS: the first step's sample

const WG: u32 = 256u;

//#include linear_index

// The x0 estimate before clipping.
fn x0_raw(xv: f32, m: f32) -> f32 {
    let a = coeffs[0];
    let s = coeffs[1];
    if (p.prediction == 0u) { return (xv - s * m) / a; }
    if (p.prediction == 1u) { return a * xv - s * m; }
    return m;
}

fn clipped(x0: f32) -> f32 {
    if (p.clip != 0u) { return clamp(x0, -p.clip_range, p.clip_range); }
    return x0;
}

// out[c·n + i] = src[i] · coeffs[7] for each copy c (diffusers' scale_model_input: 1 for VP
// samplers, 1/√(σ²+1) in σ-space; with guidance the conditional and unconditional halves of the
// U-Net batch see the same input).
@compute @workgroup_size(256)
fn scale_model_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let v = src[i] * coeffs[7];
    for (var c = 0u; c < p.copies; c = c + 1u) {
        x[c * p.n + i] = v;
    }
}

// Classifier-free guidance (Ho & Salimans 2022, eq. 6, as diffusers' pipelines apply it to the
// raw model output): out = u + s·(c − u), with the conditional outputs c in the first n values
// of model_output and the unconditional u in the next n.
@compute @workgroup_size(256)
fn guidance_combine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let c = f32(model_output[i]);
    let u = f32(model_output[p.n + i]);
    x[i] = u + p.guidance * (c - u);
}

// DDPMScheduler.step: x ← c_x0·clip(x0) + c_xt·x + σ·z, coeffs[2..5] = (c_x0, c_xt, σ).
@compute @workgroup_size(256)
fn ddpm_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let xv = x[i];
    let x0 = clipped(x0_raw(xv, f32(model_output[i])));
    var next = coeffs[2] * x0 + coeffs[3] * xv;
    if (coeffs[4] != 0.0) { next = next + coeffs[4] * z[i]; }
    x[i] = next;
}

// DDIMScheduler.step: x ← c_x0·clip(x0) + c_eps·ε̂ + σ·z, coeffs[2..5] = (c_x0, c_eps, σ);
// ε̂ is the model's own noise estimate (ε: m; v: a·m + s·x; sample: (x − a·x0)/s), not
// recomputed from the clipped x0 (diffusers' use_clipped_model_output = False).
@compute @workgroup_size(256)
fn ddim_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let xv = x[i];
    let m = f32(model_output[i]);
    let a = coeffs[0];
    let s = coeffs[1];
    let raw = x0_raw(xv, m);
    var eps = m;
    if (p.prediction == 1u) { eps = a * m + s * xv; }
    if (p.prediction == 2u) { eps = (xv - a * raw) / s; }
    var next = coeffs[2] * clipped(raw) + coeffs[3] * eps;
    if (coeffs[4] != 0.0) { next = next + coeffs[4] * z[i]; }
    x[i] = next;
}

// DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint): with D0 = x0 and
// D1 = (x0 − x0_prev)/r0, x ← (σ_t/σ_s)·x − α_t(e^{−h} − 1)·D0 − ½α_t(e^{−h} − 1)·D1;
// coeffs[2..5] = (σ_t/σ_s, α_t(e^{−h} − 1), ½α_t(e^{−h} − 1)/r0, or 0 for a first-order step).
// aux0 keeps this step's x0 for the next one.
@compute @workgroup_size(256)
fn dpm_solver_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let xv = x[i];
    let x0 = clipped(x0_raw(xv, f32(model_output[i])));
    var next = coeffs[2] * xv - coeffs[3] * x0;
    if (coeffs[4] != 0.0) { next = next - coeffs[4] * (x0 - aux0[i]); }
    aux0[i] = x0;
    x[i] = next;
}

// σ-space steps, coeffs[2..5] = (σ, dt, stage): derivative d = (x − x0)/σ, then
//   stage 0 (Euler):            x ← x + d·dt;
//   stage 1 (Heun, first half): saves x and d, x ← x + d·dt;
//   stage 2 (Heun, correction): x ← x_saved + ½(d_saved + d)·dt.
@compute @workgroup_size(256)
fn sigma_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let xv = x[i];
    let x0 = clipped(x0_raw(xv, f32(model_output[i])));
    let d = (xv - x0) / coeffs[2];
    let dt = coeffs[3];
    let stage = coeffs[4];
    if (stage == 2.0) {
        x[i] = aux0[i] + (aux1[i] + d) / 2.0 * dt;
        return;
    }
    if (stage == 1.0) {
        aux0[i] = xv;
        aux1[i] = d;
    }
    x[i] = xv + d * dt;
}

// RePaint's known region (Lugmayr et al. 2022, eq. 8–9): after the update, the pixels to keep
// are the original noised to the level the step lands on, with this step's noise:
// x ← keep·(coeffs[5]·x0_known + coeffs[6]·z) + (1 − keep)·x, coeffs[5..7] = (√ᾱ_prev, √(1−ᾱ_prev)).
@compute @workgroup_size(256)
fn inpaint_known(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let j = i % p.per_image;
    let k = keep[j];
    let noised = coeffs[5] * known[j] + coeffs[6] * z[i];
    x[i] = k * noised + (1.0 - k) * x[i];
}

// RePaint's resampling jump (diffusers RePaintScheduler.undo_step, all betas of the jump at
// once): x ← coeffs[5]·x + coeffs[6]·z with (√Π(1−β), √(1 − Π(1−β))).
@compute @workgroup_size(256)
fn renoise(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    x[i] = coeffs[5] * x[i] + coeffs[6] * z[i];
}

//#include tree_sum

// The VE-SDE corrector's step size (ScoreSdeVeScheduler.step_correct, Song et al. 2021,
// Algorithm 5): ε = (r·mean_b‖z_b‖ / mean_b‖m_b‖)²·2 over the whole batch (so a sample depends
// on its batch, as in diffusers), r = coeffs[2], into aux1[0]. One workgroup: per image the
// invocations sum squares over strided elements and tree_sum combines them in a fixed order.
@compute @workgroup_size(256)
fn ve_step_size(@builtin(local_invocation_index) lid: u32) {
    let images = p.n / p.per_image;
    var grad_sum = 0.0;
    var noise_sum = 0.0;
    for (var b = 0u; b < images; b = b + 1u) {
        var gs = 0.0;
        var ns = 0.0;
        for (var j = lid; j < p.per_image; j = j + WG) {
            let m = f32(model_output[b * p.per_image + j]);
            let zz = z[b * p.per_image + j];
            gs = gs + m * m;
            ns = ns + zz * zz;
        }
        let g2 = tree_sum(lid, gs);
        workgroupBarrier();
        let n2 = tree_sum(lid, ns);
        workgroupBarrier();
        grad_sum = grad_sum + sqrt(g2);
        noise_sum = noise_sum + sqrt(n2);
    }
    if (lid == 0u) {
        let r = coeffs[2] * (noise_sum / f32(images)) / (grad_sum / f32(images));
        aux1[0] = r * r * 2.0;
    }
}

// A VE-SDE step with the score m, stage coeffs[4]:
//   0 corrector:  x ← (x + ε·m) + √(2ε)·z, ε = aux1[0] (ve_step_size);
//   1 predictor:  x ← (x + d²·m) + d·z, (d², d) = coeffs[2..4] (step_pred: sample − drift);
//   2 last predictor: x ← 2·clamp(x + d²·m, 0, 1) − 1 (the pipeline's sample_mean.clamp(0, 1),
//     mapped to the [−1, 1] every other sampler returns);
//   3 ODE (Euler in σ): x ← x + c·m, c = σ(σ − σ_next) = coeffs[2]; 4 the last ODE step, mapped
//     as in 2.
@compute @workgroup_size(256)
fn ve_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let xv = x[i];
    let m = f32(model_output[i]);
    let stage = coeffs[4];
    if (stage == 0.0) {
        let e = aux1[0];
        x[i] = (xv + e * m) + sqrt(e * 2.0) * z[i];
        return;
    }
    let mean = xv + coeffs[2] * m;
    if (stage == 2.0 || stage == 4.0) {
        x[i] = 2.0 * clamp(mean, 0.0, 1.0) - 1.0;
        return;
    }
    if (stage == 1.0) {
        x[i] = mean + coeffs[3] * z[i];
        return;
    }
    x[i] = mean;
}

// PNDMScheduler.step_plms (skip_prk_steps): the linear multistep combination of the model
// outputs, ε = w_m·m + w_0·h_0 + w_1·h_1 + w_2·h_2 (h_0 the newest earlier output: aux0, aux1,
// aux2; weights (1), (½, ½), (3/2, −½), (23, −16, 5)/12 or (55, −59, 37, −9)/24 by the history's
// length, coeffs[4], [8..11]), for v models ε = a·(that) + s·base; then eq. 9 of Liu et al. 2022,
// x ← c_sample·base − c_out·ε with c_sample = √(ᾱ_prev/ᾱ_t) and c_out = (ᾱ_prev − ᾱ_t) /
// (ᾱ_t·√(1 − ᾱ_prev) + √(ᾱ_t(1 − ᾱ_t)ᾱ_prev)) (coeffs[2], [3]). The base is x, or (flag 4)
// the sample the first step saved in aux3 (flag 2): the second evaluation redoes the first
// step with the mean of both outputs. Flag 1 shifts m into the history.
@compute @workgroup_size(256)
fn plms_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    let flags = u32(coeffs[11]);
    let xv = x[i];
    let m = f32(model_output[i]);
    let h0 = aux0[i];
    let h1 = aux1[i];
    var base = xv;
    if ((flags & 4u) != 0u) { base = aux3[i]; }
    var eps = coeffs[4] * m + coeffs[8] * h0 + coeffs[9] * h1 + coeffs[10] * aux2[i];
    if (p.prediction == 1u) { eps = coeffs[0] * eps + coeffs[1] * base; }
    if ((flags & 2u) != 0u) { aux3[i] = xv; }
    if ((flags & 1u) != 0u) {
        aux2[i] = h1;
        aux1[i] = h0;
        aux0[i] = m;
    }
    x[i] = coeffs[2] * base - coeffs[3] * eps;
}

