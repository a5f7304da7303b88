// Dynamic loss scaling with torch.amp.GradScaler's semantics (Micikevicius et al., "Mixed
// Precision Training", ICLR 2018, §3.2), decided on the GPU inside the step, with no readback:
//
//   scale_loss_gradient   the loss gradient × scale        (torch: scaler.scale(loss).backward())
//   (adamw.wgsl)          the norm of gradient / scale     (scaler.unscale_(opt); clip_grad_norm_)
//   grad_scaler_update    found_inf = the norm is not finite; AdamW's and the EMA's values for
//                         this step or a skip; the scale for the next step (scaler.step(opt);
//                         scaler.update())
//
// torch's update (_amp_update_scale_): on found_inf scale ×= backoff and the growth tracker
// resets; otherwise the tracker counts clean steps and at growth_interval the scale ×= growth
// (if that stays finite) and the tracker resets. A skipped step leaves AdamW's step count t and
// the EMA's update count where they were, so the host cannot know t: it writes this step's
// learning-rate values (`host_hyper`) and a table of the t-dependent values for every t the
// step might have (from the last t it read back on), and the kernel picks the row of its own t.

struct Params {
    n: u32,                // scale_loss_gradient: elements
    growth_interval: u32,
    growth_factor: f32,
    backoff_factor: f32,
}

// src/ops/grad_scaler.rs: ScalerState, same field order.
struct State {
    scale: f32,
    growth_tracker: u32,   // consecutive clean steps since the scale last changed
    optimizer_steps: u32,  // AdamW's t after this step (= the EMA's update count)
    skipped_total: u32,
    skipped_in_row: u32,
    table_miss: u32,       // 1 if a t fell outside the host's table (a bug: the run stops)
    _pad0: u32,
    _pad1: u32,
}

//#include adamw_hyper

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> state: State;
@group(0) @binding(2) var<storage, read_write> grads: array<f32>;
@group(0) @binding(3) var<storage, read_write> clip: array<f32>;   // [clip factor, norm]
@group(0) @binding(4) var<storage, read> host_hyper: Hyper;
// [first t (u32 bits), rows (u32 bits), then per row: step_size, sqrt(1 − β2^t), 1 − EMA decay]
@group(0) @binding(5) var<storage, read> table: array<f32>;
@group(0) @binding(6) var<storage, read_write> hyper: Hyper;
@group(0) @binding(7) var<storage, read> scale_in: State;

//#include group_index

fn is_finite(x: f32) -> bool {
    // By the bits: a compiler may assume comparisons never see inf or NaN.
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

@compute @workgroup_size(256)
fn scale_loss_gradient(@builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, nwg) * 256u + lid;
    if (i >= p.n) { return; }
    grads[i] = grads[i] * scale_in.scale;
}

// One thread, after grad_norm_unscaled wrote `clip` = [clip factor, norm] of the unscaled
// gradients.
@compute @workgroup_size(1)
fn grad_scaler_update() {
    var h = host_hyper;
    let scale = state.scale;
    if (!is_finite(clip[1])) {
        h.skip = 1.0;
        state.scale = scale * p.backoff_factor;
        state.growth_tracker = 0u;
        state.skipped_total = state.skipped_total + 1u;
        state.skipped_in_row = state.skipped_in_row + 1u;
        hyper = h;
        return;
    }
    // AdamW multiplies the stored (scaled) gradients by this one factor: exact for a power-of-two
    // scale, as unscaling then clipping is.
    clip[0] = clip[0] * (1.0 / scale);
    let t = state.optimizer_steps + 1u;
    state.optimizer_steps = t;
    let first = bitcast<u32>(table[0]);
    let rows = bitcast<u32>(table[1]);
    var row = t - first;
    if (t < first || row >= rows) {
        state.table_miss = 1u;
        row = 0u;
    }
    h.step_size = table[2u + 3u * row];
    h.bias_correction2_sqrt = table[3u + 3u * row];
    h.ema_one_minus_decay = table[4u + 3u * row];
    h.skip = 0.0;
    hyper = h;
    state.skipped_in_row = 0u;
    let clean = state.growth_tracker + 1u;
    if (clean >= p.growth_interval) {
        let grown = scale * p.growth_factor;
        if (is_finite(grown)) { state.scale = grown; }
        state.growth_tracker = 0u;
    } else {
        state.growth_tracker = clean;
    }
}
