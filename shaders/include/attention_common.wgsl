// The uniform block, bindings and index helpers of the fused attention kernels
// (attention.wgsl, attention_subgroup.wgsl). Template: DH4 (head_dim / 4), ROWS (query rows per
// workgroup, for the causal key bound).

struct Params {
    q_tokens: u32,
    k_tokens: u32,
    row_texels: u32,
    heads: u32,
    // Rows of the statistics buffer's first half: samples · heads · q_tokens.
    stat_rows: u32,
    scale: f32,
    // 1: query i sees keys j ≤ i only.
    causal: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<Elem1x4>;
@group(0) @binding(2) var<storage, read> k: array<Elem2x4>;
@group(0) @binding(3) var<storage, read> v: array<Elem3x4>;
// Forward: written. dQ pass: read.
@group(0) @binding(4) var<storage, read_write> o: array<Elem4x4>;
// [stat_rows]: each query row's log-sum-exp of its scaled scores (forward); then
// [stat_rows, 2 stat_rows): D_i = dO_i · O_i (dQ pass, read by the dK/dV pass).
@group(0) @binding(5) var<storage, read_write> stats: array<f32>;
@group(0) @binding(6) var<storage, read> d_o: array<Elem6x4>;
// dQ (dQ pass) or dK (dK/dV pass).
@group(0) @binding(7) var<storage, read_write> grad_a: array<Elem7x4>;
// dV (dK/dV pass).
@group(0) @binding(8) var<storage, read_write> grad_b: array<Elem8x4>;

// First texel of head h of token `token` of the sample whose first token row is `row0`.
fn texel_of(row0: u32, token: u32, h: u32) -> u32 {
    return (row0 + token) * p.row_texels + h * {{DH4}}u;
}

// The end of the keys the block of ROWS queries starting at `first_query` sees.
fn key_end(first_query: u32) -> u32 {
    return select(p.k_tokens, min(p.k_tokens, first_query + {{ROWS}}u), p.causal != 0u);
}

// Whether query i sees key j (below `end`, the block's key bound).
fn visible(i: u32, j: u32, end: u32) -> bool {
    return j < end && (p.causal == 0u || j <= i);
}
