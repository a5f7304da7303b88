//! GPU tensors: f32 (or u32) elements in a storage buffer, row-major, activations channels-last
//! (NHWC). A tensor may be a view into a larger buffer (parameters and gradients live in one
//! flat buffer each, so AdamW, EMA and the gradient norm are one dispatch over everything).

use std::sync::Arc;

use super::Gpu;

#[derive(Clone, Debug)]
pub struct Tensor {
    buffer: Arc<wgpu::Buffer>,
    /// Offset into `buffer`, in elements.
    offset: usize,
    shape: Vec<usize>,
    label: Arc<str>,
}

impl Tensor {
    pub(super) fn new(gpu: &Gpu, shape: &[usize], label: &str) -> Tensor {
        // Saturating: a shape whose product overflows is past every limit, not a panic.
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX / 8);
        // Never zero-sized: wgpu rejects empty bindings.
        let mut size = (numel.max(1) as u64 * 4).next_multiple_of(16);
        if !gpu.admit_buffer(size, label, shape) {
            // A stand-in: the plan is refused by `Gpu::check` before it could run.
            size = 16;
        }
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
        }
    }

    /// A view of `shape` starting `offset` elements into this tensor's buffer. The caller keeps
    /// `offset` a multiple of the adapter's storage offset alignment (64 elements covers 256 B).
    pub fn view(&self, offset: usize, shape: &[usize], label: &str) -> Tensor {
        Tensor {
            buffer: self.buffer.clone(),
            offset: self.offset + offset,
            shape: shape.to_vec(),
            label: label.into(),
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
    pub fn byte_offset(&self) -> u64 {
        (self.offset * 4) as u64
    }
    pub fn byte_len(&self) -> u64 {
        (self.numel() * 4) as u64
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
            size: std::num::NonZeroU64::new(self.byte_len().max(4)),
        })
    }
}

/// An `rgba32float` 2-D texture used as a read-only GEMM operand on the subgroup path.
#[derive(Clone, Debug)]
pub struct Texture2d {
    pub texture: Arc<wgpu::Texture>,
    pub view: Arc<wgpu::TextureView>,
    /// Width in texels (4 floats each) and height in rows.
    pub width: u32,
    pub height: u32,
}

impl Texture2d {
    pub fn new(gpu: &Gpu, width: u32, height: u32, label: &str) -> Texture2d {
        // Past the adapter's limit: a 1 x 1 stand-in, refused by `Gpu::check` before use.
        let (width, height) = if gpu.admit_texture(width, height, label) {
            (width, height)
        } else {
            (1, 1)
        };
        let texture = gpu.device.create_texture(&wgpu::TextureDescriptor {
            label: Some(label),
            size: wgpu::Extent3d {
                width: width.max(1),
                height: height.max(1),
                depth_or_array_layers: 1,
            },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: wgpu::TextureFormat::Rgba32Float,
            usage: wgpu::TextureUsages::STORAGE_BINDING | wgpu::TextureUsages::COPY_DST,
            view_formats: &[],
        });
        let view = texture.create_view(&Default::default());
        Texture2d {
            texture: Arc::new(texture),
            view: Arc::new(view),
            width,
            height,
        }
    }
}
