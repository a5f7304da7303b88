// The GELU family of the text-to-image models, forward and backward, one invocation per element:
// * gelu: x·Φ(x) with the exact normal CDF (torch's default `approximate="none"`, the U-Net
//   transformer blocks' feed-forward), Φ(x) = ½·erfc(−x/√2);
// * geglu: diffusers' GEGLU, input [rows, 2·inner] = [hidden | gate] (Linear's output chunked in
//   two along the last dimension), out = hidden·gelu(gate) (Shazeer 2020, "GLU Variants
//   Improve Transformer");
// * quick_gelu: x·sigmoid(1.702·x), CLIP's `quick_gelu` activation (Hendrycks & Gimpel 2016).
// Backward: gelu'(x) = Φ(x) + x·φ(x), φ the normal density; quick_gelu'(x) = s + 1.702·x·s·(1 − s).
//
// WGSL has no erf. `erfc_positive` is Numerical Recipes' Chebyshev fit of erfc (fractional error
// below 1.2e-7 for every argument), used on |x| so that the far negative tail of gelu keeps its
// relative accuracy (x·Φ(x) for x = −8 is ~1e-15, where 1 − erf would be 0).

struct Params {
    n: u32,      // elements of the output
    inner: u32,  // geglu: width of each half
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<Elem1>;
@group(0) @binding(2) var<storage, read> dy: array<Elem2>;
@group(0) @binding(3) var<storage, read_write> y: array<Elem3>;

const WG: u32 = 256u;

//#include linear_index
//#include sigmoid

// erfc(z) for z ≥ 0.
fn erfc_positive(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 +
        t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 +
        t * (-0.82215223 + t * 0.17087277))))))));
    return t * exp(-z * z + poly);
}

// Φ(v), the standard normal CDF.
fn normal_cdf(v: f32) -> f32 {
    let z = v * 0.70710678118654752;
    if (z <= 0.0) { return 0.5 * erfc_positive(-z); }
    return 1.0 - 0.5 * erfc_positive(z);
}

fn gelu(v: f32) -> f32 {
    return v * normal_cdf(v);
}

fn gelu_grad(v: f32) -> f32 {
    return normal_cdf(v) + v * 0.39894228040143268 * exp(-0.5 * v * v);
}

@compute @workgroup_size(256)
fn gelu_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < p.n) { y[i] = to_elem3(gelu(f32(x[i]))); }
}

// y = dx = dy·gelu'(x)
@compute @workgroup_size(256)
fn gelu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < p.n) { y[i] = to_elem3(f32(dy[i]) * gelu_grad(f32(x[i]))); }
}

// y[r, j] = x[r, j]·gelu(x[r, inner + j]), n = rows·inner.
@compute @workgroup_size(256)
fn geglu_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < p.n) {
        let h = (i / p.inner) * 2u * p.inner + i % p.inner;
        y[i] = to_elem3(f32(x[h]) * gelu(f32(x[h + p.inner])));
    }
}

// y = d[hidden | gate] [rows, 2·inner] from dy [rows, inner]; n = rows·2·inner.
@compute @workgroup_size(256)
fn geglu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < p.n) {
        let row = i / (2u * p.inner);
        let col = i % (2u * p.inner);
        let j = col % p.inner;
        let h = row * 2u * p.inner + j;
        let g = f32(dy[row * p.inner + j]);
        if (col < p.inner) {
            y[i] = to_elem3(g * gelu(f32(x[h + p.inner])));
        } else {
            y[i] = to_elem3(g * f32(x[h]) * gelu_grad(f32(x[h + p.inner])));
        }
    }
}

@compute @workgroup_size(256)
fn quick_gelu_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < p.n) {
        let v = f32(x[i]);
        y[i] = to_elem3(v * sigmoid(1.702 * v));
    }
}

@compute @workgroup_size(256)
fn quick_gelu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i < p.n) {
        let v = f32(x[i]);
        let s = sigmoid(1.702 * v);
        y[i] = to_elem3(f32(dy[i]) * (s + 1.702 * v * s * (1.0 - s)));
    }
}
