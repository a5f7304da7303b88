// Fixed-shape tree sum of one value per invocation of a WG-wide workgroup (WG a power of two,
// at most 256): the same additions in the same order every time (deterministic); every
// invocation gets the total.
var<workgroup> wg_sum: array<f32, 256>;

fn tree_sum(lid: u32, v: f32) -> f32 {
    wg_sum[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            wg_sum[lid] = wg_sum[lid] + wg_sum[lid + s];
        }
        workgroupBarrier();
    }
    return wg_sum[0];
}
