// Mean squared error with optional per-sample weights (torch.nn.functional.mse_loss,
// reduction="mean", times w_b):
//   loss = (1 / N) Σ_i w_{b(i)} (pred_i − target_i)²,   N = B·C·H·W, b(i) = i / per_sample
//   dloss/dpred_i = scale · 2 w_{b(i)} (pred_i − target_i) / N
// and the VAE's reconstruction loss, L1 summed over each image and averaged over the batch
// (CompVis' LPIPSWithDiscriminator without its perceptual and GAN terms):
//   loss = (1 / B) Σ_i |pred_i − target_i|,   dloss/dpred_i = scale · sign(pred_i − target_i) / B
// (sign(0) = 0, as torch's abs backward). The VAE's `--rec-loss l2` runs the unweighted MSE
// entry points with B in place of N: loss = (1 / B) Σ_i (pred_i − target_i)², gradient
// scale · 2 (pred_i − target_i) / B.
//
// The sum is a deterministic two-stage reduction (no float atomics): stage 1 gives workgroup g
// the fixed chunk [g·CHUNK, (g+1)·CHUNK); each thread adds its ITEMS elements in order, then a
// fixed binary tree in workgroup memory sums the 256 thread values into partials[g]. Stage 2
// (one workgroup) adds the partials the same way. The order depends only on N, so the same
// inputs give the same bits on every run.

struct Params {
    n: u32,          // elements (stage 1, backward) or partials (stage 2)
    per_sample: u32, // elements per sample, for the weight index
    count: f32,      // the divisor of sum_finish: N for the MSE (torch divides by numel), B for L1, L2 and KL
    factor: f32,     // backward: scale · 2 / N for the MSE (torch: 2. / numel), scale · 2 / B for L2, scale / B for L1
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> pred: array<Elem1>;
@group(0) @binding(2) var<storage, read> tgt: array<Elem2>;
@group(0) @binding(3) var<storage, read> weights: array<f32>;
@group(0) @binding(4) var<storage, read_write> partials: array<f32>;
@group(0) @binding(5) var<storage, read> partials_in: array<f32>;
@group(0) @binding(6) var<storage, read_write> result: array<f32>;
@group(0) @binding(7) var<storage, read_write> dpred: array<Elem7>;

const WG: u32 = 256u;
const ITEMS: u32 = 8u;          // elements per thread in stage 1
const CHUNK: u32 = WG * ITEMS;  // elements per workgroup in stage 1 (src/ops/loss.rs: CHUNK)


//#include group_index

//#include tree_sum

fn sq_err(i: u32) -> f32 {
    let d = f32(pred[i]) - f32(tgt[i]);
    return d * d;
}

// Stage 1 without weights: partials[g] = Σ over chunk g of (pred − target)².
@compute @workgroup_size(256)
fn mse_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wid, nwg);
    let base = g * CHUNK + lid;
    var acc = 0.0;
    for (var k = 0u; k < ITEMS; k = k + 1u) {
        let i = base + k * WG;
        if (i < p.n) { acc = acc + sq_err(i); }
    }
    let total = tree_sum(lid, acc);
    if (lid == 0u) { partials[g] = total; }
}

// Stage 1 with weights: partials[g] = Σ over chunk g of w_b (pred − target)².
@compute @workgroup_size(256)
fn mse_partial_weighted(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wid, nwg);
    let base = g * CHUNK + lid;
    var acc = 0.0;
    for (var k = 0u; k < ITEMS; k = k + 1u) {
        let i = base + k * WG;
        if (i < p.n) { acc = acc + weights[i / p.per_sample] * sq_err(i); }
    }
    let total = tree_sum(lid, acc);
    if (lid == 0u) { partials[g] = total; }
}

// Stage 1 of the L1 loss: partials[g] = Σ over chunk g of |pred − target|.
@compute @workgroup_size(256)
fn l1_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let g = group_index(wid, nwg);
    let base = g * CHUNK + lid;
    var acc = 0.0;
    for (var k = 0u; k < ITEMS; k = k + 1u) {
        let i = base + k * WG;
        if (i < p.n) { acc = acc + abs(f32(pred[i]) - f32(tgt[i])); }
    }
    let total = tree_sum(lid, acc);
    if (lid == 0u) { partials[g] = total; }
}

// dpred_i = scale · sign(pred_i − target_i) / B
@compute @workgroup_size(256)
fn l1_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, nwg) * WG + lid;
    if (i < p.n) {
        dpred[i] = to_elem7(p.factor * sign(f32(pred[i]) - f32(tgt[i])));
    }
}

// Stage 2 of every loss here and of the VAE's KL term (one workgroup):
// result[0] = (Σ partials) / count.
@compute @workgroup_size(256)
fn sum_finish(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var i = lid; i < p.n; i = i + WG) {
        acc = acc + partials_in[i];
    }
    let total = tree_sum(lid, acc);
    if (lid == 0u) { result[0] = total / p.count; }
}

// dpred_i = scale · 2 (pred_i − target_i) / N
@compute @workgroup_size(256)
fn mse_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, nwg) * WG + lid;
    if (i < p.n) {
        dpred[i] = to_elem7(p.factor * (f32(pred[i]) - f32(tgt[i])));
    }
}

// dpred_i = scale · 2 w_b (pred_i − target_i) / N
@compute @workgroup_size(256)
fn mse_backward_weighted(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, nwg) * WG + lid;
    if (i < p.n) {
        dpred[i] = to_elem7(p.factor * weights[i / p.per_sample] * (f32(pred[i]) - f32(tgt[i])));
    }
}
