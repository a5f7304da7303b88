// The flat index of a workgroup on a 2D grid (grid_1d in src/gpu/plan.rs splits dispatches
// over x and y past 65535 workgroups).
fn group_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}
