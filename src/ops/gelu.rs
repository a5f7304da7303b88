//! `shaders/gelu.wgsl`: GELU with the exact normal CDF, diffusers' GEGLU and CLIP's quick-GELU,
//! forward and backward (one invocation per element).

use super::{OpResult, expect_distinct, expect_numel, invalid, u32_of};
use crate::gpu::{KernelKey, Recorder, Tensor, grid_1d};

#[repr(C)]
#[derive(Clone, Copy, Default, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GeluParams {
    pub n: u32,
    /// GEGLU: the width of each half of the input's last dimension.
    pub inner: u32,
    pub _pad: [u32; 2],
}

const WG: usize = 256;

fn key(entry: &'static str) -> KernelKey {
    KernelKey::new("gelu", entry)
}

/// One elementwise dispatch of `entry` over `n` outputs.
fn dispatch(
    rec: &mut Recorder,
    entry: &'static str,
    (n, inner): (usize, usize),
    x: &Tensor,
    dy: Option<&Tensor>,
    y: &Tensor,
) -> OpResult {
    let p = GeluParams {
        n: u32_of(entry, "n", n)?,
        inner: u32_of(entry, "inner", inner)?,
        ..Default::default()
    };
    // Forward entry points do not use dy: their pipelines have no binding 2.
    let mut bindings = vec![(1, x.into()), (3, y.into())];
    if let Some(dy) = dy {
        bindings.push((2, dy.into()));
    }
    rec.dispatch(key(entry), &p, &bindings, grid_1d(n.div_ceil(WG)));
    Ok(())
}

/// Checks an elementwise pair: `y` as long as `x`, not the same memory.
fn same_length(op: &str, x: &Tensor, y: &Tensor) -> OpResult<usize> {
    expect_numel(op, "output", y, x.numel())?;
    expect_distinct(op, x, y)?;
    Ok(x.numel())
}

/// y = gelu(x) = x·Φ(x) (torch.nn.functional.gelu, approximate="none").
pub fn gelu_forward(rec: &mut Recorder, x: &Tensor, y: &Tensor) -> OpResult {
    let n = same_length("gelu_forward", x, y)?;
    dispatch(rec, "gelu_forward", (n, 1), x, None, y)
}

/// dx = dy·gelu'(x).
pub fn gelu_backward(rec: &mut Recorder, x: &Tensor, dy: &Tensor, dx: &Tensor) -> OpResult {
    let n = same_length("gelu_backward", x, dx)?;
    expect_numel("gelu_backward", "dy", dy, n)?;
    expect_distinct("gelu_backward", dy, dx)?;
    dispatch(rec, "gelu_backward", (n, 1), x, Some(dy), dx)
}

/// The width of each GEGLU half: `x` [.., 2·inner], `y` [.., inner].
fn geglu_inner(op: &str, x: &Tensor, y: &Tensor) -> OpResult<usize> {
    let last = *x.shape().last().unwrap_or(&0);
    if last == 0 || !last.is_multiple_of(2) {
        return Err(invalid(format!(
            "{op}: `{}` {:?} must end in an even dimension ([hidden | gate])",
            x.label(),
            x.shape()
        )));
    }
    expect_numel(op, "output", y, x.numel() / 2)?;
    Ok(last / 2)
}

/// diffusers' GEGLU: hidden, gate = x.chunk(2, dim=-1); y = hidden·gelu(gate).
pub fn geglu_forward(rec: &mut Recorder, x: &Tensor, y: &Tensor) -> OpResult {
    let inner = geglu_inner("geglu_forward", x, y)?;
    expect_distinct("geglu_forward", x, y)?;
    dispatch(rec, "geglu_forward", (y.numel(), inner), x, None, y)
}

/// dx [.., 2·inner] = [dy·gelu(gate) | dy·hidden·gelu'(gate)].
pub fn geglu_backward(rec: &mut Recorder, x: &Tensor, dy: &Tensor, dx: &Tensor) -> OpResult {
    let inner = geglu_inner("geglu_backward", x, dy)?;
    expect_numel("geglu_backward", "dx", dx, x.numel())?;
    expect_distinct("geglu_backward", x, dx)?;
    expect_distinct("geglu_backward", dy, dx)?;
    dispatch(rec, "geglu_backward", (x.numel(), inner), x, Some(dy), dx)
}

/// y = x·sigmoid(1.702·x) (CLIP's quick_gelu).
pub fn quick_gelu_forward(rec: &mut Recorder, x: &Tensor, y: &Tensor) -> OpResult {
    let n = same_length("quick_gelu_forward", x, y)?;
    dispatch(rec, "quick_gelu_forward", (n, 1), x, None, y)
}

/// dx = dy·quick_gelu'(x).
pub fn quick_gelu_backward(rec: &mut Recorder, x: &Tensor, dy: &Tensor, dx: &Tensor) -> OpResult {
    let n = same_length("quick_gelu_backward", x, dx)?;
    expect_numel("quick_gelu_backward", "dy", dy, n)?;
    expect_distinct("quick_gelu_backward", dy, dx)?;
    dispatch(rec, "quick_gelu_backward", (n, 1), x, Some(dy), dx)
}
