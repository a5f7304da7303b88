// Multi-head attention O = softmax(scale · Q Kᵀ) V in one kernel per direction for adapters
// without the subgroup path (discrete and integrated GPUs through Vulkan, Metal, DX12): no
// Tq x Tk matrix in memory, so SD's 4096-token self-attention needs only its inputs, output and
// two floats per query row. The layout, the causal mask and the statistics are
// attention_subgroup.wgsl's (shared in include/attention_common.wgsl).
//
// One invocation per query row (forward, dQ) or key row (dK, dV), ROWS of them per workgroup;
// the other side's rows stream through workgroup memory in tiles of TILE rows that the whole
// workgroup loads together (the portable GEMM's shared-memory tiling, instead of the subgroup
// kernel's broadcasts). Each invocation keeps its row of q and its accumulator (and dO, or k and
// v, in the backward) in arrays of DH4 texels: the template fixes their size.
//
// Forward: FlashAttention's online softmax (Dao et al. 2022, Algorithm 1): a running maximum m
// and sum l, the accumulator rescaled by exp(m_old − m_new) when the maximum grows; lse = m + log l
// is kept for the backward. Backward: Dao, "FlashAttention-2" (2023), Algorithm 2, with P
// recomputed from lse and D_i = dO_i · O_i, as in the subgroup kernel. Barriers stay in uniform
// control flow (tile loops bounded per workgroup); every sum runs in a fixed order.
//
// Template: DH4 (head_dim / 4), ROWS (invocations per workgroup), TILE (rows per shared tile).

//#include attention_common

// Two tiles of TILE rows of a head (k and v forward and dQ; q and dO for dK/dV), and the rows'
// log-sum-exp and D for dK/dV.
var<workgroup> tile_a: array<vec4<f32>, {{TILE * DH4}}>;
var<workgroup> tile_b: array<vec4<f32>, {{TILE * DH4}}>;
var<workgroup> tile_lse: array<f32, {{TILE}}>;
var<workgroup> tile_delta: array<f32, {{TILE}}>;

const DH4: u32 = {{DH4}}u;
const TILE: u32 = {{TILE}}u;

// Loads key rows first .. first + TILE (clamped to the last) of head h into the tiles: k into
// tile_a, v into tile_b. Called by the whole workgroup.
fn load_key_tiles(krow0: u32, first: u32, h: u32, lid: u32) {
    workgroupBarrier();
    for (var e = lid; e < TILE * DH4; e += {{ROWS}}u) {
        let src = texel_of(krow0, min(first + e / DH4, p.k_tokens - 1u), h) + e % DH4;
        tile_a[e] = vec4<f32>(k[src]);
        tile_b[e] = vec4<f32>(v[src]);
    }
    workgroupBarrier();
}

// Loads query rows first .. first + TILE (clamped) of head h: scale · q into tile_a, dO into
// tile_b, their log-sum-exp and D (statistics rows from `stat0`). Called by the whole workgroup.
fn load_query_tiles(row0: u32, first: u32, h: u32, stat0: u32, lid: u32) {
    workgroupBarrier();
    for (var e = lid; e < TILE * DH4; e += {{ROWS}}u) {
        let src = texel_of(row0, min(first + e / DH4, p.q_tokens - 1u), h) + e % DH4;
        tile_a[e] = vec4<f32>(q[src]) * p.scale;
        tile_b[e] = vec4<f32>(d_o[src]);
    }
    if (lid < TILE) {
        let r = min(first + lid, p.q_tokens - 1u);
        tile_lse[lid] = stats[stat0 + r];
        tile_delta[lid] = stats[p.stat_rows + stat0 + r];
    }
    workgroupBarrier();
}

@compute @workgroup_size({{ROWS}})
fn attention_forward(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let t = p.q_tokens;
    let h = wid.y % p.heads;
    let row0 = (wid.y / p.heads) * t;
    let krow0 = (wid.y / p.heads) * p.k_tokens;
    let i = wid.x * {{ROWS}}u + lid;
    let end = key_end(wid.x * {{ROWS}}u);
    let qi = texel_of(row0, min(i, t - 1u), h);
    var qr: array<vec4<f32>, {{DH4}}>;
    var acc: array<vec4<f32>, {{DH4}}>;
    for (var d = 0u; d < DH4; d++) {
        qr[d] = vec4<f32>(q[qi + d]) * p.scale;
        acc[d] = vec4<f32>(0.0);
    }
    var m = -3.0e38;
    var l = 0.0;
    for (var j0 = 0u; j0 < end; j0 += TILE) {
        load_key_tiles(krow0, j0, h, lid);
        for (var r = 0u; r < TILE; r++) {
            if (!visible(i, j0 + r, end)) {
                continue;
            }
            var s = 0.0;
            for (var d = 0u; d < DH4; d++) {
                s += dot(qr[d], tile_a[r * DH4 + d]);
            }
            let m_new = max(m, s);
            let rescale = exp(m - m_new);
            let e = exp(s - m_new);
            l = l * rescale + e;
            for (var d = 0u; d < DH4; d++) {
                acc[d] = fma(vec4<f32>(e), tile_b[r * DH4 + d], acc[d] * rescale);
            }
            m = m_new;
        }
    }
    if (i < t) {
        for (var d = 0u; d < DH4; d++) {
            o[qi + d] = to_elem4x4(acc[d] / l);
        }
        stats[wid.y * t + i] = m + log(l);
    }
}

// dQ_i = scale Σ_j P_ij (dP_ij - D_i) K_j, with P_ij = exp(s_ij - lse_i), dP_ij = dO_i · V_j.
// Also writes D_i for the dK/dV pass.
@compute @workgroup_size({{ROWS}})
fn attention_backward_dq(@builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let t = p.q_tokens;
    let h = wid.y % p.heads;
    let row0 = (wid.y / p.heads) * t;
    let krow0 = (wid.y / p.heads) * p.k_tokens;
    let i = wid.x * {{ROWS}}u + lid;
    let end = key_end(wid.x * {{ROWS}}u);
    let il = min(i, t - 1u);
    let qi = texel_of(row0, il, h);
    var qr: array<vec4<f32>, {{DH4}}>;
    var dor: array<vec4<f32>, {{DH4}}>;
    var acc: array<vec4<f32>, {{DH4}}>;
    var delta = 0.0;
    for (var d = 0u; d < DH4; d++) {
        qr[d] = vec4<f32>(q[qi + d]) * p.scale;
        dor[d] = vec4<f32>(d_o[qi + d]);
        delta += dot(dor[d], vec4<f32>(o[qi + d]));
        acc[d] = vec4<f32>(0.0);
    }
    let lse = stats[wid.y * t + il];
    for (var j0 = 0u; j0 < end; j0 += TILE) {
        load_key_tiles(krow0, j0, h, lid);
        for (var r = 0u; r < TILE; r++) {
            if (!visible(i, j0 + r, end)) {
                continue;
            }
            var s = 0.0;
            var dp = 0.0;
            for (var d = 0u; d < DH4; d++) {
                s += dot(qr[d], tile_a[r * DH4 + d]);
                dp += dot(dor[d], tile_b[r * DH4 + d]);
            }
            let ds = exp(s - lse) * (dp - delta);
            for (var d = 0u; d < DH4; d++) {
                acc[d] = fma(vec4<f32>(ds), tile_a[r * DH4 + d], acc[d]);
            }
        }
    }
    if (i < t) {
        for (var d = 0u; d < DH4; d++) {
            grad_a[qi + d] = to_elem7x4(acc[d] * p.scale);
        }
        stats[p.stat_rows + wid.y * t + i] = delta;
    }
}

// For key row j: dV_j = Σ_i P_ij dO_i and dK_j = Σ_i dS_ij (scale Q_i), dS_ij = P_ij (dP_ij - D_i).
@compute @workgroup_size({{ROWS}})
fn attention_backward_dkv(@builtin(workgroup_id) wid: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let t = p.q_tokens;
    let tk = p.k_tokens;
    let h = wid.y % p.heads;
    let row0 = (wid.y / p.heads) * t;
    let krow0 = (wid.y / p.heads) * tk;
    let j = wid.x * {{ROWS}}u + lid;
    // Causal: queries before the block's first key see none of its keys.
    let start = select(0u, wid.x * {{ROWS}}u, p.causal != 0u);
    let kj = texel_of(krow0, min(j, tk - 1u), h);
    var kr: array<vec4<f32>, {{DH4}}>;
    var vr: array<vec4<f32>, {{DH4}}>;
    var dk: array<vec4<f32>, {{DH4}}>;
    var dv: array<vec4<f32>, {{DH4}}>;
    for (var d = 0u; d < DH4; d++) {
        kr[d] = vec4<f32>(k[kj + d]);
        vr[d] = vec4<f32>(v[kj + d]);
        dk[d] = vec4<f32>(0.0);
        dv[d] = vec4<f32>(0.0);
    }
    for (var i0 = start; i0 < t; i0 += TILE) {
        load_query_tiles(row0, i0, h, wid.y * t, lid);
        for (var r = 0u; r < TILE; r++) {
            let i = i0 + r;
            if (i >= t || (p.causal != 0u && j > i)) {
                continue;
            }
            var s = 0.0;
            var dp = 0.0;
            for (var d = 0u; d < DH4; d++) {
                s += dot(tile_a[r * DH4 + d], kr[d]);
                dp += dot(tile_b[r * DH4 + d], vr[d]);
            }
            let pij = exp(s - tile_lse[r]);
            let ds = pij * (dp - tile_delta[r]);
            for (var d = 0u; d < DH4; d++) {
                dv[d] = fma(vec4<f32>(pij), tile_b[r * DH4 + d], dv[d]);
                dk[d] = fma(vec4<f32>(ds), tile_a[r * DH4 + d], dk[d]);
            }
        }
    }
    if (j < tk) {
        for (var d = 0u; d < DH4; d++) {
            grad_a[kj + d] = to_elem7x4(dk[d]);
            grad_b[kj + d] = to_elem8x4(dv[d]);
        }
    }
}
