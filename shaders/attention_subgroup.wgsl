// Multi-head attention for short sequences and small heads in one kernel per direction, for
// adapters with a fixed subgroup size L (lavapipe): O = softmax(scale · Q Kᵀ) V without writing
// the T x T scores and probabilities to memory. Unfused, a 14 x 14 attention of mnist28 at
// batch 32 writes and reads three 39 MB matrices per direction for 2 x 8-wide dot products per
// element; here each lane keeps its row's q, o (and gradients) in registers and the K, V rows
// of L tokens are loaded once per subgroup (one row per lane) and shared by subgroupBroadcast,
// as in the GEMM (docs/ARCHITECTURE.md, "Fast GEMM on lavapipe").
//
// Template: L (lanes), DH4 (head_dim / 4: the texels of one head's row). Layout: q, o and dQ are
// `[N · Tq, C]` rows, k, v, dK, dV `[N · Tk, C]` (diffusers' Attention before its head split; Tk
// unlike Tq in cross-attention), head h in texels h · DH4 .. of a row of C / 4 texels. Workgroup =
// one subgroup; wid.y = sample · heads + head; wid.x = a block of L query rows (forward, dQ) or key
// rows (dK, dV). With `causal` (the CLIP text encoder's mask; Tq = Tk) query i sees keys j ≤ i:
// the masked weights are exactly zero, and whole blocks past a subgroup's last query (forward, dQ)
// or before its first key (dK, dV) are not visited (a bound uniform over the subgroup).
//
// The softmax is taken in two passes over the keys (the row maximum, then the exponentials),
// like the unfused softmax kernel, rather than online (FlashAttention's running rescale): one
// more 2·dh-FLOP dot product per key instead of a second exp, and the same rounding as the
// reference's max-subtracted softmax. Backward: Dao, "FlashAttention-2" (2023), Algorithm 2,
// with P recomputed from the saved row log-sum-exp and D_i = dO_i · O_i. Every sum runs in a
// fixed order: deterministic. Subgroup operations stay in uniform control flow.

//#include attention_common

@compute @workgroup_size({{L}})
fn attention_forward(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(subgroup_invocation_id) lane: u32) {
    let t = p.q_tokens;
    let tk = p.k_tokens;
    let h = wid.y % p.heads;
    let row0 = (wid.y / p.heads) * t;
    let krow0 = (wid.y / p.heads) * tk;
    let i = wid.x * {{L}}u + lane;
    let end = key_end(wid.x * {{L}}u);
    let qi = texel_of(row0, min(i, t - 1u), h);
//#for d in 0..DH4
    let q{{d}} = vec4<f32>(q[qi + {{d}}u]) * p.scale;
//#end
    // Pass 1: the row maximum of the scaled scores.
    var m = -3.0e38;
    for (var j0 = 0u; j0 < end; j0 += {{L}}u) {
        let kj = texel_of(krow0, min(j0 + lane, tk - 1u), h);
//#for d in 0..DH4
        let k{{d}} = vec4<f32>(k[kj + {{d}}u]);
//#end
//#for r in 0..L
        var s{{r}} = 0.0;
//#for d in 0..DH4
        s{{r}} += dot(q{{d}}, subgroupBroadcast(k{{d}}, {{r}}u));
//#end
        m = select(m, max(m, s{{r}}), visible(i, j0 + {{r}}u, end));
//#end
    }
    // Pass 2: l = Σ exp(s - m), acc = Σ exp(s - m) v.
    var l = 0.0;
//#for d in 0..DH4
    var acc{{d}} = vec4<f32>(0.0);
//#end
    for (var j0 = 0u; j0 < end; j0 += {{L}}u) {
        let kj = texel_of(krow0, min(j0 + lane, tk - 1u), h);
//#for d in 0..DH4
        let k{{d}} = vec4<f32>(k[kj + {{d}}u]);
        let v{{d}} = vec4<f32>(v[kj + {{d}}u]);
//#end
//#for r in 0..L
        var s{{r}} = 0.0;
//#for d in 0..DH4
        s{{r}} += dot(q{{d}}, subgroupBroadcast(k{{d}}, {{r}}u));
//#end
        let e{{r}} = select(0.0, exp(s{{r}} - m), visible(i, j0 + {{r}}u, end));
        l += e{{r}};
//#for d in 0..DH4
        acc{{d}} = fma(vec4<f32>(e{{r}}), subgroupBroadcast(v{{d}}, {{r}}u), acc{{d}});
//#end
//#end
    }
    if (i < t) {
//#for d in 0..DH4
        o[qi + {{d}}u] = to_elem4x4(acc{{d}} / l);
//#end
        stats[wid.y * t + i] = m + log(l);
    }
}

// dQ_i = scale Σ_j P_ij (dP_ij - D_i) K_j, with P_ij = exp(s_ij - lse_i), dP_ij = dO_i · V_j.
// Also writes D_i for the dK/dV pass.
@compute @workgroup_size({{L}})
fn attention_backward_dq(@builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(subgroup_invocation_id) lane: u32) {
    let t = p.q_tokens;
    let tk = p.k_tokens;
    let h = wid.y % p.heads;
    let row0 = (wid.y / p.heads) * t;
    let krow0 = (wid.y / p.heads) * tk;
    let i = wid.x * {{L}}u + lane;
    let end = key_end(wid.x * {{L}}u);
    let il = min(i, t - 1u);
    let qi = texel_of(row0, il, h);
    var delta = 0.0;
//#for d in 0..DH4
    let q{{d}} = vec4<f32>(q[qi + {{d}}u]) * p.scale;
    let do{{d}} = vec4<f32>(d_o[qi + {{d}}u]);
    delta += dot(do{{d}}, vec4<f32>(o[qi + {{d}}u]));
    var acc{{d}} = vec4<f32>(0.0);
//#end
    let lse = stats[wid.y * t + il];
    for (var j0 = 0u; j0 < end; j0 += {{L}}u) {
        let kj = texel_of(krow0, min(j0 + lane, tk - 1u), h);
//#for d in 0..DH4
        let k{{d}} = vec4<f32>(k[kj + {{d}}u]);
        let v{{d}} = vec4<f32>(v[kj + {{d}}u]);
//#end
//#for r in 0..L
        var s{{r}} = 0.0;
        var dp{{r}} = 0.0;
//#for d in 0..DH4
        let k{{r}}_{{d}} = subgroupBroadcast(k{{d}}, {{r}}u);
        s{{r}} += dot(q{{d}}, k{{r}}_{{d}});
        dp{{r}} += dot(do{{d}}, subgroupBroadcast(v{{d}}, {{r}}u));
//#end
        let ds{{r}} = select(0.0, exp(s{{r}} - lse) * (dp{{r}} - delta), visible(i, j0 + {{r}}u, end));
//#for d in 0..DH4
        acc{{d}} = fma(vec4<f32>(ds{{r}}), k{{r}}_{{d}}, acc{{d}});
//#end
//#end
    }
    if (i < t) {
//#for d in 0..DH4
        grad_a[qi + {{d}}u] = to_elem7x4(acc{{d}} * p.scale);
//#end
        stats[p.stat_rows + wid.y * t + i] = delta;
    }
}

// For key row j: dV_j = Σ_i P_ij dO_i and dK_j = Σ_i dS_ij (scale Q_i), dS_ij = P_ij (dP_ij - D_i).
@compute @workgroup_size({{L}})
fn attention_backward_dkv(@builtin(workgroup_id) wid: vec3<u32>,
                          @builtin(subgroup_invocation_id) lane: u32) {
    let t = p.q_tokens;
    let tk = p.k_tokens;
    let h = wid.y % p.heads;
    let row0 = (wid.y / p.heads) * t;
    let krow0 = (wid.y / p.heads) * tk;
    let j = wid.x * {{L}}u + lane;
    // Causal: queries before the block's first key see none of its keys.
    let start = select(0u, wid.x * {{L}}u, p.causal != 0u);
    let kj = texel_of(krow0, min(j, tk - 1u), h);
//#for d in 0..DH4
    let k{{d}} = vec4<f32>(k[kj + {{d}}u]);
    let v{{d}} = vec4<f32>(v[kj + {{d}}u]);
    var dk{{d}} = vec4<f32>(0.0);
    var dv{{d}} = vec4<f32>(0.0);
//#end
    for (var i0 = start; i0 < t; i0 += {{L}}u) {
        let il = min(i0 + lane, t - 1u);
        let qi = texel_of(row0, il, h);
//#for d in 0..DH4
        let q{{d}} = vec4<f32>(q[qi + {{d}}u]) * p.scale;
        let do{{d}} = vec4<f32>(d_o[qi + {{d}}u]);
//#end
        let lse = stats[wid.y * t + il];
        let delta = stats[p.stat_rows + wid.y * t + il];
//#for r in 0..L
        var s{{r}} = 0.0;
        var dp{{r}} = 0.0;
//#for d in 0..DH4
        let q{{r}}_{{d}} = subgroupBroadcast(q{{d}}, {{r}}u);
        let do{{r}}_{{d}} = subgroupBroadcast(do{{d}}, {{r}}u);
        s{{r}} += dot(q{{r}}_{{d}}, k{{d}});
        dp{{r}} += dot(do{{r}}_{{d}}, v{{d}});
//#end
        let p{{r}} = select(0.0, exp(s{{r}} - subgroupBroadcast(lse, {{r}}u)), i0 + {{r}}u < t && (p.causal == 0u || j <= i0 + {{r}}u));
        let ds{{r}} = p{{r}} * (dp{{r}} - subgroupBroadcast(delta, {{r}}u));
//#for d in 0..DH4
        dv{{d}} = fma(vec4<f32>(p{{r}}), do{{r}}_{{d}}, dv{{d}});
        dk{{d}} = fma(vec4<f32>(ds{{r}}), q{{r}}_{{d}}, dk{{d}});
//#end
//#end
    }
    if (j < tk) {
//#for d in 0..DH4
        grad_a[kj + {{d}}u] = to_elem7x4(dk{{d}});
        grad_b[kj + {{d}}u] = to_elem8x4(dv{{d}});
//#end
    }
}
