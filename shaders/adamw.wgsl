// AdamW, EMA and the global gradient norm over ONE flat parameter buffer.
//
// AdamW follows torch.optim.AdamW (single-tensor path; Loshchilov & Hutter, "Decoupled weight
// decay regularization", ICLR 2019):
//   p  *= 1 − lr·wd                         (decoupled weight decay)
//   m   = lerp(m, g, 1 − β1)                (torch: exp_avg.lerp_(grad, 1 − β1))
//   v   = β2·v + (1 − β2)·g²
//   p  −= step_size · m / (sqrt(v) / sqrt(1 − β2^t) + eps),   step_size = lr / (1 − β1^t)
// g = grad · grad_scale[0] (the clip factor of grad_norm_finish, 1 when not clipping).
// Everything that changes per step (lr, bias corrections, EMA decay) is read from the `hyper`
// buffer, which the host rewrites each step with queue.write_buffer, so the plan never changes.
//
// The gradient norm is a deterministic two-stage sum of squares (fixed chunks, fixed trees, no
// float atomics), then clip = min(1, max_norm / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_.

struct Params {
    n: u32,         // elements (stage 1, AdamW, EMA) or partials (stage 2)
    max_norm: f32,  // grad_norm_finish: clipping threshold; <= 0 = never clip (factor 1)
    _pad0: u32,
    _pad1: u32,
}

//#include adamw_hyper

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> h: Hyper;
@group(0) @binding(2) var<storage, read> grads: array<f32>;
@group(0) @binding(3) var<storage, read_write> params: array<f32>;
@group(0) @binding(4) var<storage, read_write> exp_avg: array<f32>;
@group(0) @binding(5) var<storage, read_write> exp_avg_sq: array<f32>;
@group(0) @binding(6) var<storage, read> grad_scale: array<f32>;
@group(0) @binding(7) var<storage, read_write> ema: array<f32>;
@group(0) @binding(8) var<storage, read> params_in: array<f32>;
@group(0) @binding(9) var<storage, read_write> partials: array<f32>;
@group(0) @binding(10) var<storage, read> partials_in: array<f32>;
@group(0) @binding(11) var<storage, read_write> norm_out: array<f32>;
// The loss scale the gradients carry (element 0: GradScaler's scale, or a tensor holding 1.0);
// the norm is taken of the unscaled gradients, as after torch's `scaler.unscale_(optimizer)`.
@group(0) @binding(18) var<storage, read> loss_scale: array<f32>;

const WG: u32 = 256u;
const ITEMS: u32 = 8u;          // elements per thread in the sum of squares
const CHUNK: u32 = WG * ITEMS;  // elements per workgroup (src/ops/adamw.rs: CHUNK)


//#include group_index

// torch.lerp(a, b, w): a + w (b − a) for w < 0.5, b − (b − a)(1 − w) otherwise (ATen Lerp.h).
fn lerp(a: f32, b: f32, w: f32) -> f32 {
    if (w < 0.5) { return a + w * (b - a); }
    return b - (b - a) * (1.0 - w);
}

@compute @workgroup_size(256)
fn adamw_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    if (h.skip != 0.0) { return; }
    let i = group_index(wid, nwg) * WG + lid;
    if (i >= p.n) { return; }
    let g = grads[i] * grad_scale[0];
    let param = params[i] * h.decay_mul;
    let m = lerp(exp_avg[i], g, h.one_minus_beta1);
    let v = exp_avg_sq[i] * h.beta2 + h.one_minus_beta2 * (g * g);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    let denom = sqrt(v) / h.bias_correction2_sqrt + h.eps;
    params[i] = param - h.step_size * (m / denom);
}

// The same update 4 elements per thread, for buffers of a multiple of 4 elements on 16-byte
// boundaries (the parameter store's are): llvmpipe loads and stores storage buffers lane by
// lane, and a vec4 per lane makes a quarter of those trips. Each component goes through the
// scalar kernel's operations in the same order: the same bits.
@group(0) @binding(12) var<storage, read> grads4: array<vec4<f32>>;
@group(0) @binding(13) var<storage, read_write> params4: array<vec4<f32>>;
@group(0) @binding(14) var<storage, read_write> exp_avg4: array<vec4<f32>>;
@group(0) @binding(15) var<storage, read_write> exp_avg_sq4: array<vec4<f32>>;
@group(0) @binding(16) var<storage, read_write> ema4: array<vec4<f32>>;
@group(0) @binding(17) var<storage, read> params_in4: array<vec4<f32>>;

fn lerp4(a: vec4<f32>, b: vec4<f32>, w: f32) -> vec4<f32> {
    if (w < 0.5) { return a + w * (b - a); }
    return b - (b - a) * (1.0 - w);
}

@compute @workgroup_size(256)
fn adamw_step4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    if (h.skip != 0.0) { return; }
    let i = group_index(wid, nwg) * WG + lid;
    if (i >= p.n / 4u) { return; }
    let g = grads4[i] * grad_scale[0];
    let param = params4[i] * h.decay_mul;
    let m = lerp4(exp_avg4[i], g, h.one_minus_beta1);
    let v = exp_avg_sq4[i] * h.beta2 + h.one_minus_beta2 * (g * g);
    exp_avg4[i] = m;
    exp_avg_sq4[i] = v;
    let denom = sqrt(v) / h.bias_correction2_sqrt + h.eps;
    params4[i] = param - h.step_size * (m / denom);
}

@compute @workgroup_size(256)
fn ema_update4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    if (h.skip != 0.0) { return; }
    let i = group_index(wid, nwg) * WG + lid;
    if (i >= p.n / 4u) { return; }
    let e = ema4[i];
    ema4[i] = e - h.ema_one_minus_decay * (e - params_in4[i]);
}

// diffusers EMAModel.step: ema −= (1 − decay)(ema − param).
@compute @workgroup_size(256)
fn ema_update(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    if (h.skip != 0.0) { return; }
    let i = group_index(wid, nwg) * WG + lid;
    if (i >= p.n) { return; }
    let e = ema[i];
    ema[i] = e - h.ema_one_minus_decay * (e - params_in[i]);
}

//#include tree_sum

// Stage 1: partials[g] = Σ over chunk g of (grad / loss_scale)².
@compute @workgroup_size(256)
fn sumsq_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wid, nwg);
    let base = g * CHUNK + lid;
    // A power-of-two scale makes x exactly torch's unscaled gradient; an inf or NaN gradient
    // makes the sum, and so the norm, non-finite (src/ops/grad_scaler.rs reads that as found_inf).
    let unscale = 1.0 / loss_scale[0];
    var acc = 0.0;
    for (var k = 0u; k < ITEMS; k = k + 1u) {
        let i = base + k * WG;
        if (i < p.n) {
            let x = grads[i] * unscale;
            acc = acc + x * x;
        }
    }
    let total = tree_sum(lid, acc);
    if (lid == 0u) { partials[g] = total; }
}

// Stage 2 (one workgroup): norm = sqrt(Σ partials); norm_out = [clip factor, norm].
@compute @workgroup_size(256)
fn grad_norm_finish(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var i = lid; i < p.n; i = i + WG) {
        acc = acc + partials_in[i];
    }
    let total = tree_sum(lid, acc);
    if (lid == 0u) {
        let norm = sqrt(total);
        var clip = 1.0;
        if (p.max_norm > 0.0) { clip = min(1.0, p.max_norm / (norm + 1e-6)); }
        norm_out[0] = clip;
        norm_out[1] = norm;
    }
}
