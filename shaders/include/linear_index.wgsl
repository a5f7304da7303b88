// The flat index of an invocation on a 2D grid of 1D workgroups of WG invocations (grid_1d in
// src/gpu/plan.rs splits dispatches over x and y past 65535 workgroups). WG: the includer's
// workgroup size constant.
fn linear_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.y * nwg.x + wid.x) * WG + lid;
}
