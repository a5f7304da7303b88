// Softmax over the last axis of a row-major [R, L] tensor, for adapters with subgroups (the
// same formulas as softmax.wgsl):
//   forward:  m = max_j x_j,  y_i = exp(x_i - m) / sum_j exp(x_j - m)
//   backward: dx_i = y_i * (dy_i - sum_j dy_j * y_j)
// One subgroup per workgroup (docs/ARCHITECTURE.md, "Memory-bound kernels on lavapipe": no workgroup memory
// and no barriers, which lavapipe runs as coroutines); it takes p.rows_per_group consecutive rows
// one after the other. Lane l reads columns l, l + LANES, ... and the lanes are combined with
// subgroupMax / subgroupAdd, whose order is fixed for a given adapter: deterministic. The trip
// counts are uniform (the column test is inside the loop), so every subgroup operation runs with
// all lanes active. LANES = the subgroup size (an `override`). Workgroup index = wid.x + wid.y * nwg.x.

struct Params {
    rows: u32,           // R
    len: u32,            // L
    _unused: u32,        // softmax.wgsl's threads per row
    rows_per_group: u32, // rows each workgroup takes
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem1>;
@group(0) @binding(2) var<storage, read_write> y: array<Elem2>;
@group(0) @binding(3) var<storage, read> y_in: array<Elem3>;
@group(0) @binding(4) var<storage, read> dy: array<Elem4>;
@group(0) @binding(5) var<storage, read_write> dx: array<Elem5>;

override LANES: u32 = 16u;

@compute @workgroup_size(LANES)
fn softmax_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(subgroup_invocation_id) lane: u32) {
    let first = (wid.y * nwg.x + wid.x) * p.rows_per_group;
    let end = min(first + p.rows_per_group, p.rows);
    for (var row = first; row < end; row++) {
        let base = row * p.len;
        // Start from the row's first element rather than -FLT_MAX so rows holding -inf stay exact.
        var m = f32(x[base]);
        for (var j0 = 0u; j0 < p.len; j0 += LANES) {
            let j = j0 + lane;
            if (j < p.len) { m = max(m, f32(x[base + j])); }
        }
        m = subgroupMax(m);
        var s = 0.0;
        for (var j0 = 0u; j0 < p.len; j0 += LANES) {
            let j = j0 + lane;
            if (j < p.len) { s += exp(f32(x[base + j]) - m); }
        }
        s = subgroupAdd(s);
        for (var j0 = 0u; j0 < p.len; j0 += LANES) {
            let j = j0 + lane;
            if (j < p.len) { y[base + j] = to_elem2(exp(f32(x[base + j]) - m) / s); }
        }
    }
}

@compute @workgroup_size(LANES)
fn softmax_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(subgroup_invocation_id) lane: u32) {
    let first = (wid.y * nwg.x + wid.x) * p.rows_per_group;
    let end = min(first + p.rows_per_group, p.rows);
    for (var row = first; row < end; row++) {
        let base = row * p.len;
        var d = 0.0;
        for (var j0 = 0u; j0 < p.len; j0 += LANES) {
            let j = j0 + lane;
            if (j < p.len) { d += f32(dy[base + j]) * f32(y_in[base + j]); }
        }
        d = subgroupAdd(d);
        for (var j0 = 0u; j0 < p.len; j0 += LANES) {
            let j = j0 + lane;
            if (j < p.len) {
                let yj = f32(y_in[base + j]);
                dx[base + j] = to_elem5(yj * (f32(dy[base + j]) - d));
            }
        }
    }
}

// The same for rows of a multiple of 4 elements (on 16-byte boundaries), 4 columns per lane
// and load: llvmpipe loads storage buffers lane by lane, and a vec4 per lane makes a quarter
// of those trips. Lane l reads texels l, l + LANES, ...; a lane adds its texel's 4 terms
// pairwise before the running sum (a fixed order: deterministic).
@group(0) @binding(6) var<storage, read> x4: array<Elem6x4>;
@group(0) @binding(7) var<storage, read_write> y4: array<Elem7x4>;
@group(0) @binding(8) var<storage, read> y_in4: array<Elem8x4>;
@group(0) @binding(9) var<storage, read> dy4: array<Elem9x4>;
@group(0) @binding(10) var<storage, read_write> dx4: array<Elem10x4>;

fn sum4(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

@compute @workgroup_size(LANES)
fn softmax_forward4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(subgroup_invocation_id) lane: u32) {
    let first = (wid.y * nwg.x + wid.x) * p.rows_per_group;
    let end = min(first + p.rows_per_group, p.rows);
    let len4 = p.len / 4u;
    for (var row = first; row < end; row++) {
        let base = row * len4;
        var m = vec4<f32>(x4[base]).x;
        for (var j0 = 0u; j0 < len4; j0 += LANES) {
            let j = j0 + lane;
            if (j < len4) {
                let v = vec4<f32>(x4[base + j]);
                m = max(m, max(max(v.x, v.y), max(v.z, v.w)));
            }
        }
        m = subgroupMax(m);
        var s = 0.0;
        for (var j0 = 0u; j0 < len4; j0 += LANES) {
            let j = j0 + lane;
            if (j < len4) { s += sum4(exp(vec4<f32>(x4[base + j]) - m)); }
        }
        s = subgroupAdd(s);
        for (var j0 = 0u; j0 < len4; j0 += LANES) {
            let j = j0 + lane;
            if (j < len4) { y4[base + j] = to_elem7x4(exp(vec4<f32>(x4[base + j]) - m) / s); }
        }
    }
}

@compute @workgroup_size(LANES)
fn softmax_backward4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(subgroup_invocation_id) lane: u32) {
    let first = (wid.y * nwg.x + wid.x) * p.rows_per_group;
    let end = min(first + p.rows_per_group, p.rows);
    let len4 = p.len / 4u;
    for (var row = first; row < end; row++) {
        let base = row * len4;
        var d = 0.0;
        for (var j0 = 0u; j0 < len4; j0 += LANES) {
            let j = j0 + lane;
            if (j < len4) { d += sum4(vec4<f32>(dy4[base + j]) * vec4<f32>(y_in4[base + j])); }
        }
        d = subgroupAdd(d);
        for (var j0 = 0u; j0 < len4; j0 += LANES) {
            let j = j0 + lane;
            if (j < len4) { dx4[base + j] = to_elem10x4(vec4<f32>(y_in4[base + j]) * (vec4<f32>(dy4[base + j]) - d)); }
        }
    }
}
