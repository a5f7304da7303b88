//! GPU tensors: f32 (or u32) elements in a storage buffer, row-major, activations channels-last
//! (NHWC); or f16 elements ([`Dtype::F16`], half-precision activations, WGSL's `f16` behind
//! `SHADER_F16`). A tensor may be a view into a larger buffer (parameters and gradients live in
//! one flat buffer each, so AdamW, EMA and the gradient norm are one dispatch over everything).

use std::cell::Cell;
use std::sync::Arc;

use super::{Gpu, GpuError, human_bytes};

thread_local! {
    /// Whether models built on this thread keep gradient storage (see [`no_grad`]).
    static GRAD_MODE: Cell<bool> = const { Cell::new(true) };
    /// Whether activations built on this thread have storage (see [`unused_activations`]).
    static ACTIVATION_MODE: Cell<bool> = const { Cell::new(true) };
    /// Whether activations built on this thread stay f32 in a half-precision run (see
    /// [`f32_activations`]).
    static F32_ACTIVATIONS: Cell<bool> = const { Cell::new(false) };
}

/// For the parts of a model that torch.autocast keeps in f32 (the time-embedding MLP, a model's
/// input and output): while the guard lives, activations built on this thread
/// ([`Gpu::activation_dtype`]) are f32 even in a half-precision run.
pub fn f32_activations() -> F32ActivationsGuard {
    F32ActivationsGuard {
        previous: F32_ACTIVATIONS.with(|m| m.replace(true)),
    }
}

#[must_use = "activations stay f32 only while the guard lives"]
pub struct F32ActivationsGuard {
    previous: bool,
}

impl Drop for F32ActivationsGuard {
    fn drop(&mut self) {
        F32_ACTIVATIONS.with(|m| m.set(self.previous));
    }
}

/// torch's `no_grad()` for model builds: while the guard lives, models built on this thread
/// allocate no gradient storage (activation gradients, the parameter gradient buffer), and a
/// parameter store larger than one buffer is split over several (see `nn::ParamStore`).
/// Sampling builds under it, so a model twice the size of its activations still fits. A kernel
/// that binds such a missing gradient is refused by `Gpu::check` with the tensor's name, before
/// anything runs. Thread-local, as torch's grad mode is.
#[must_use = "gradients are off only while the guard lives"]
pub struct NoGradGuard {
    previous: bool,
}

pub fn no_grad() -> NoGradGuard {
    NoGradGuard {
        previous: GRAD_MODE.with(|m| m.replace(false)),
    }
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        GRAD_MODE.with(|m| m.set(self.previous));
    }
}

/// Whether builds on this thread keep gradients (false inside [`no_grad`]).
pub fn grad_enabled() -> bool {
    GRAD_MODE.with(|m| m.get())
}

/// For a part of a model that a build never runs (the VAE encoder of a sampler, which only
/// decodes, whose parameters still load with the rest): while the guard lives, activations
/// built on this thread ([`Gpu::activation_tensor`]) have no storage, and recording a kernel
/// that binds one is refused with its name, as under [`no_grad`].
pub fn unused_activations() -> UnusedActivationsGuard {
    UnusedActivationsGuard {
        previous: ACTIVATION_MODE.with(|m| m.replace(false)),
    }
}

pub struct UnusedActivationsGuard {
    previous: bool,
}

impl Drop for UnusedActivationsGuard {
    fn drop(&mut self) {
        ACTIVATION_MODE.with(|m| m.set(self.previous));
    }
}

/// The element type of a tensor's storage. u32 tensors share the f32 storage (4-byte words).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    /// IEEE binary16, WGSL `f16`: needs the adapter's `SHADER_F16` feature.
    F16,
}

impl Dtype {
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 => 2,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Tensor {
    buffer: Arc<wgpu::Buffer>,
    /// Offset into `buffer`, in elements.
    offset: usize,
    shape: Vec<usize>,
    label: Arc<str>,
    dtype: Dtype,
}

impl Tensor {
    pub(super) fn new(gpu: &Gpu, shape: &[usize], dtype: Dtype, label: &str) -> Tensor {
        // Saturating: a shape whose product overflows is past every limit, not a panic.
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX / 8);
        // Never zero-sized: wgpu rejects empty bindings.
        let mut size = (numel.max(1) as u64 * dtype.bytes() as u64).next_multiple_of(16);
        if !gpu.admit_buffer(size, label, shape) || !gpu.admit_dtype(dtype, label) {
            // A stand-in: the plan is refused by `Gpu::check` before it could run.
            size = 16;
        }
        Self::in_buffer(gpu, size, shape, dtype, label)
    }

    /// A tensor with no storage behind it (a 16-byte buffer): a gradient under [`no_grad`].
    /// Binding it is refused by the recorder's admission check, never reaches wgpu.
    fn unbacked(gpu: &Gpu, shape: &[usize], dtype: Dtype, label: &str) -> Tensor {
        Self::in_buffer(gpu, 16, shape, dtype, label)
    }

    /// `shape` over a new storage buffer of `size` bytes.
    fn in_buffer(gpu: &Gpu, size: u64, shape: &[usize], dtype: Dtype, label: &str) -> Tensor {
        let buffer = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Tensor {
            buffer: Arc::new(buffer),
            offset: 0,
            shape: shape.to_vec(),
            label: label.into(),
            dtype,
        }
    }

    /// Whether the view lies inside its buffer (false for the gradients of a [`no_grad`] build).
    pub fn is_backed(&self) -> bool {
        self.byte_offset() + self.byte_len().max(4) <= self.buffer.size()
    }

    /// A view of `shape` starting `offset` elements into this tensor's buffer. The caller keeps
    /// `offset` a multiple of the adapter's storage offset alignment (64 elements covers 256 B
    /// of f32, 128 of f16).
    pub fn view(&self, offset: usize, shape: &[usize], label: &str) -> Tensor {
        Tensor {
            buffer: self.buffer.clone(),
            offset: self.offset + offset,
            shape: shape.to_vec(),
            label: label.into(),
            dtype: self.dtype,
        }
    }

    /// Same storage, another shape with the same number of elements.
    pub fn reshape(&self, shape: &[usize]) -> Tensor {
        assert_eq!(
            shape.iter().product::<usize>(),
            self.numel(),
            "reshape of `{}` must keep the element count",
            self.label
        );
        Tensor {
            shape: shape.to_vec(),
            ..self.clone()
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn label(&self) -> &str {
        &self.label
    }
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    pub fn byte_offset(&self) -> u64 {
        (self.offset * self.dtype.bytes()) as u64
    }
    pub fn byte_len(&self) -> u64 {
        (self.numel() * self.dtype.bytes()) as u64
    }
    /// Whether both live in the same wgpu buffer. wgpu tracks usage per buffer, so a buffer may
    /// not be bound read-only and read-write in one dispatch even through disjoint views.
    pub fn shares_buffer(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.buffer, &other.buffer)
    }

    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: self.byte_offset(),
            // Storage bindings are whole 4-byte words: an odd count of f16 elements binds the
            // padding half after the last one (inside the buffer: buffers are 16-byte
            // multiples, views start 256-byte aligned).
            size: std::num::NonZeroU64::new(self.byte_len().max(4).next_multiple_of(4)),
        })
    }
}

/// An `rgba32float` (or, for half-precision operands, `rgba16float`) 2-D texture used as a
/// read-only GEMM operand on the subgroup path.
#[derive(Clone, Debug)]
pub struct Texture2d {
    pub texture: Arc<wgpu::Texture>,
    pub view: Arc<wgpu::TextureView>,
    /// Width in texels (4 values each) and height in rows.
    pub width: u32,
    pub height: u32,
    /// `rgba16float`: values stored as f16.
    pub half: bool,
}

/// The allocated extent of a texture side: `v`, or the next odd size when `v` is a power of two
/// (1 -> 3, 2^k -> 2^k + 1).
///
/// llvmpipe compiles one machine-code variant of a shader per combination of its bound
/// textures' "power-of-two width/height" flags (`lp_static_texture_state`), at the first
/// dispatch. With operands of every shape, each large GEMM kernel was compiled up to three
/// times (tiny16 cold first step 95 s -> 39 s with one flag state for all). Kernels address
/// texels by their logical extent, so the spare column or row is never read.
fn non_power_of_two(v: u32, max: u32) -> u32 {
    let padded = if v == 1 { 3 } else { v + 1 };
    if v.is_power_of_two() && padded <= max {
        padded
    } else {
        v
    }
}

impl Texture2d {
    pub fn new(gpu: &Gpu, width: u32, height: u32, half: bool, label: &str) -> Texture2d {
        let max = gpu.limits.max_texture_dimension_2d;
        let (alloc_width, alloc_height) = (
            non_power_of_two(width.max(1), max),
            non_power_of_two(height.max(1), max),
        );
        // Past the adapter's limit: a 1 x 1 stand-in, refused by `Gpu::check` before use.
        let (width, height, alloc_width, alloc_height) = if gpu.admit_texture(
            (alloc_width, alloc_height),
            if half { 8 } else { 16 },
            label,
        ) {
            (width, height, alloc_width, alloc_height)
        } else {
            (1, 1, 1, 1)
        };
        let texture = gpu.device.create_texture(&wgpu::TextureDescriptor {
            label: Some(label),
            size: wgpu::Extent3d {
                width: alloc_width,
                height: alloc_height,
                depth_or_array_layers: 1,
            },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: if half {
                wgpu::TextureFormat::Rgba16Float
            } else {
                wgpu::TextureFormat::Rgba32Float
            },
            usage: wgpu::TextureUsages::STORAGE_BINDING | wgpu::TextureUsages::COPY_DST,
            view_formats: &[],
        });
        let view = texture.create_view(&Default::default());
        Texture2d {
            texture: Arc::new(texture),
            view: Arc::new(view),
            width,
            height,
            half,
        }
    }
}

/// The device's tensor traffic: allocation, uploads, readbacks and binding checks (here, beside
/// [`Tensor`], so that `gpu/mod.rs` needs nothing of this file).
impl Gpu {
    /// Whether a tensor may be bound to one kernel (its bytes within one storage binding).
    pub(crate) fn admit_binding(&self, t: &Tensor, entry: &str) -> bool {
        if !self.admit_backed(t, entry) {
            return false;
        }
        let max = self.limits.max_storage_buffer_binding_size;
        if t.byte_len() > max {
            let named = format!("tensor `{}`", t.label());
            if self
                .health
                .limits
                .lock()
                .is_ok_and(|v| v.iter().any(|m| m.starts_with(&named)))
            {
                return false;
            }
            self.limit_problem(format!(
                "tensor `{}` {:?} is {} and one storage binding of this adapter holds {} (max_storage_buffer_binding_size; kernel `{entry}`)",
                t.label(),
                t.shape(),
                human_bytes(t.byte_len()),
                human_bytes(max)
            ));
            return false;
        }
        true
    }

    /// Whether an f16 tensor may be bound to binding `n` of `shader` (declared with `ElemN`,
    /// see kernels.rs); records the problem if not.
    pub(crate) fn admit_f16_binding(&self, t: &Tensor, shader: &str, n: u32, entry: &str) -> bool {
        if super::kernels::binding_takes_f16(shader, n) {
            return true;
        }
        self.unsupported_problem(format!(
            "tensor `{}` {:?} is stored as f16, and binding {n} of kernel `{entry}` ({shader}.wgsl) reads f32 only",
            t.label(),
            t.shape()
        ));
        false
    }

    /// Whether `t` has storage; a gradient of a [`no_grad`] build has none, and using it is
    /// recorded as a problem (`Gpu::check` reports it) instead of reaching wgpu.
    pub(crate) fn admit_backed(&self, t: &Tensor, what: &str) -> bool {
        if t.is_backed() {
            return true;
        }
        self.limit_problem(format!(
            "tensor `{}` {:?} has no storage: the model was built for sampling (no gradients kept), and `{what}` uses it",
            t.label(),
            t.shape()
        ));
        false
    }

    /// A gradient tensor: zero-filled storage, or none inside [`no_grad`] (see there).
    /// An activation's value: a new tensor, or one without storage inside
    /// [`unused_activations`].
    pub fn activation_tensor(&self, shape: &[usize], label: &str) -> Tensor {
        self.activation_tensor_of(shape, Dtype::F32, label)
    }

    /// [`Gpu::activation_tensor`] of `dtype`.
    pub fn activation_tensor_of(&self, shape: &[usize], dtype: Dtype, label: &str) -> Tensor {
        if ACTIVATION_MODE.with(|m| m.get()) {
            Tensor::new(self, shape, dtype, label)
        } else {
            Tensor::unbacked(self, shape, dtype, label)
        }
    }

    pub fn grad_tensor(&self, shape: &[usize], label: &str) -> Tensor {
        self.grad_tensor_of(shape, Dtype::F32, label)
    }

    /// [`Gpu::grad_tensor`] of `dtype`.
    pub fn grad_tensor_of(&self, shape: &[usize], dtype: Dtype, label: &str) -> Tensor {
        if grad_enabled() && ACTIVATION_MODE.with(|m| m.get()) {
            Tensor::new(self, shape, dtype, label)
        } else {
            Tensor::unbacked(self, shape, dtype, label)
        }
    }

    /// The element type of a model's activations and their gradients: f16 in a half-precision
    /// run (what backward keeps, as torch.autocast's f16 tensors), f32 otherwise and inside
    /// [`f32_activations`].
    pub fn activation_dtype(&self) -> Dtype {
        if self.precision == super::Precision::F16 && !F32_ACTIVATIONS.with(|m| m.get()) {
            Dtype::F16
        } else {
            Dtype::F32
        }
    }

    /// Allocates a zero-filled f32 tensor in its own storage buffer.
    pub fn tensor(&self, shape: &[usize], label: &str) -> Tensor {
        Tensor::new(self, shape, Dtype::F32, label)
    }

    /// Allocates a zero-filled tensor of `dtype` in its own storage buffer. An f16 tensor on an
    /// adapter without `SHADER_F16` is a stand-in that `Gpu::check` refuses with the feature's
    /// and the adapter's names.
    pub fn tensor_of(&self, shape: &[usize], dtype: Dtype, label: &str) -> Tensor {
        Tensor::new(self, shape, dtype, label)
    }

    /// Whether tensors may have f16 storage here (the adapter has `SHADER_F16`).
    pub fn supports_f16_storage(&self) -> bool {
        self.features.contains(wgpu::Features::SHADER_F16)
    }

    /// Whether this adapter can hold `dtype`; records the problem if not.
    pub(crate) fn admit_dtype(&self, dtype: Dtype, label: &str) -> bool {
        if dtype == Dtype::F32 || self.supports_f16_storage() {
            return true;
        }
        self.unsupported_problem(format!(
            "tensor `{label}` is stored as f16, which needs the SHADER_F16 feature, and adapter `{}` does not have it: use --precision f32 on this adapter",
            self.adapter.name
        ));
        false
    }

    /// Allocates a tensor and uploads `data` into it.
    pub fn tensor_from(
        &self,
        shape: &[usize],
        data: &[f32],
        label: &str,
    ) -> Result<Tensor, GpuError> {
        let t = Tensor::new(self, shape, Dtype::F32, label);
        self.write(&t, data)?;
        Ok(t)
    }

    pub fn write(&self, t: &Tensor, data: &[f32]) -> Result<(), GpuError> {
        if data.len() != t.numel() {
            return Err(GpuError::Invalid(format!(
                "upload to `{}`: {} values given for shape {:?} ({} elements)",
                t.label(),
                data.len(),
                t.shape(),
                t.numel()
            )));
        }
        match t.dtype() {
            Dtype::F32 => {
                self.queue
                    .write_buffer(t.buffer(), t.byte_offset(), bytemuck::cast_slice(data));
            }
            Dtype::F16 => {
                // Rounded to nearest, ties to even (torch's `.half()`). Buffer writes are whole
                // 4-byte words: an odd count keeps the half after the last element as it was.
                let mut halves: Vec<u16> = data
                    .iter()
                    .map(|&v| half::f16::from_f32(v).to_bits())
                    .collect();
                if !halves.len().is_multiple_of(2) {
                    let next = t.byte_offset() + t.byte_len();
                    let kept = if next + 2 <= t.buffer().size() {
                        let word = self.read_bytes(t.buffer(), next - 2, 4)?;
                        u16::from_le_bytes([word[2], word[3]])
                    } else {
                        0
                    };
                    halves.push(kept);
                }
                self.queue
                    .write_buffer(t.buffer(), t.byte_offset(), bytemuck::cast_slice(&halves));
            }
        }
        Ok(())
    }

    /// Writes raw 32-bit words (u32 tensors share the f32 storage).
    pub fn write_u32(&self, t: &Tensor, data: &[u32]) -> Result<(), GpuError> {
        self.write(t, bytemuck::cast_slice(data))
    }

    /// Reads a tensor back as f32 values (blocks until the GPU is done with everything
    /// submitted); f16 elements are widened exactly.
    pub fn read(&self, t: &Tensor) -> Result<Vec<f32>, GpuError> {
        match t.dtype() {
            Dtype::F32 => {
                let bytes = self.read_bytes(t.buffer(), t.byte_offset(), t.byte_len())?;
                Ok(bytemuck::pod_collect_to_vec(&bytes))
            }
            Dtype::F16 => {
                // Copies between buffers are whole 4-byte words: read the words that hold the
                // elements (views start 4-byte aligned) and drop a trailing half.
                let len = t.byte_len().next_multiple_of(4);
                let bytes = self.read_bytes(t.buffer(), t.byte_offset(), len)?;
                Ok(bytes
                    .chunks_exact(2)
                    .take(t.numel())
                    .map(|h| half::f16::from_bits(u16::from_le_bytes([h[0], h[1]])).to_f32())
                    .collect())
            }
        }
    }

    pub fn read_u32(&self, t: &Tensor) -> Result<Vec<u32>, GpuError> {
        let bytes = self.read_bytes(t.buffer(), t.byte_offset(), t.byte_len())?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::non_power_of_two;

    #[test]
    fn texture_sides_are_allocated_at_non_power_of_two_sizes() {
        for (v, want) in [
            (1, 3),
            (2, 3),
            (3, 3),
            (16, 17),
            (17, 17),
            (96, 96),
            (4096, 4097),
        ] {
            let got = non_power_of_two(v, 8192);
            assert_eq!(got, want, "side {v}");
            assert!(got == v || !got.is_power_of_two());
        }
        // At the adapter's limit the side stays as asked (it would not fit padded).
        assert_eq!(non_power_of_two(8192, 8192), 8192);
    }
}
