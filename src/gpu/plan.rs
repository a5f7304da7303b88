//! Recording and replaying a step.
//!
//! Ops record dispatches into a [`Recorder`] (validating shapes first, so a mistake is an error
//! value, never a wgpu validation panic). `finish` uploads every dispatch's parameters into one
//! uniform buffer and builds the bind groups, giving a [`Plan`]: a plain list of dispatches and
//! copies that is encoded into one command buffer per step, as often as needed, with no
//! allocation. [`Plan::records`] exposes it as data (kernel, constants, bindings, workgroups).

use std::sync::Arc;

use super::{Dtype, Gpu, GpuError, KernelKey, Tensor, Texture2d};

/// A resource bound to a kernel, in binding order after the parameter block.
#[derive(Clone, Debug)]
pub enum Binding {
    Buffer(Tensor),
    Texture(Texture2d),
}

impl From<&Tensor> for Binding {
    fn from(t: &Tensor) -> Binding {
        Binding::Buffer(t.clone())
    }
}
impl From<&Texture2d> for Binding {
    fn from(t: &Texture2d) -> Binding {
        Binding::Texture(t.clone())
    }
}

/// One recorded dispatch or copy, as data.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepRecord {
    pub kind: &'static str,
    pub shader: &'static str,
    pub entry: &'static str,
    /// Template values of the kernel's specialization (`KernelKey::template`).
    pub template: Vec<(&'static str, i64)>,
    pub constants: Vec<(&'static str, f64)>,
    pub bindings: Vec<String>,
    pub workgroups: [u32; 3],
}

struct PendingDispatch {
    key: KernelKey,
    pipeline: Arc<wgpu::ComputePipeline>,
    params_offset: u64,
    params_size: u64,
    bindings: Vec<(u32, Binding)>,
    groups: [u32; 3],
}

enum Pending {
    Dispatch(PendingDispatch),
    Clear(Tensor),
    CopyToTexture {
        src: Tensor,
        dst: Texture2d,
        bytes_per_row: u32,
    },
    CopyBuffer {
        src: Tensor,
        dst: Tensor,
    },
}

enum Step {
    Dispatch {
        pipeline: Arc<wgpu::ComputePipeline>,
        bind_group: wgpu::BindGroup,
        groups: [u32; 3],
    },
    Clear(Tensor),
    CopyToTexture {
        src: Tensor,
        dst: Texture2d,
        bytes_per_row: u32,
    },
    CopyBuffer {
        src: Tensor,
        dst: Tensor,
    },
}

pub struct Recorder {
    pub gpu: Arc<Gpu>,
    params: Vec<u8>,
    pending: Vec<Pending>,
    records: Vec<StepRecord>,
    dummy: Option<Tensor>,
    /// Textures packed from a tensor (`remember_pack`) whose buffer nothing has bound since:
    /// a later pack of the same tensor reuses them instead of copying again (a conv's dY is
    /// packed for its backward-weight and then its backward-input pass).
    packs: Vec<(Tensor, String, Texture2d)>,
    /// Buffers the plan only reads and that change only between replays (sampling's weights,
    /// [`Recorder::freeze`]): the texture packs of tensors in them go to `setup`, a plan run
    /// once after the buffers are written instead of at every replay.
    frozen: Vec<Tensor>,
    setup: Option<Box<Recorder>>,
    /// Pack textures no later step can reach: their cache entry was dropped (`touch`), so every
    /// dispatch that reads them is recorded already, and replays run each step after the one
    /// before. A later pack of the same size writes one of these instead of a new texture.
    /// Empty, and unused, in a setup recorder, whose textures the main plan reads afterwards.
    free_textures: Vec<Texture2d>,
    reuse_textures: bool,
    /// [`Recorder::recycle_packs`]: how many packs of one texture size stay cached before the
    /// oldest one's texture is written again (None: all stay).
    packs_per_size: Option<usize>,
    /// Floating-point operations of the GEMM-shaped work recorded (2 per multiply-add), for
    /// the benchmark's achieved GFLOP/s.
    flops: f64,
    /// Inside [`Recorder::full_precision`]: GEMM and conv operands stay f32 in a half-precision
    /// run.
    f32_operands: bool,
}

const PARAMS_ALIGN: usize = 256;

impl Recorder {
    pub fn new(gpu: Arc<Gpu>) -> Recorder {
        Recorder {
            gpu,
            params: Vec::new(),
            pending: Vec::new(),
            records: Vec::new(),
            dummy: None,
            packs: Vec::new(),
            frozen: Vec::new(),
            setup: None,
            free_textures: Vec::new(),
            reuse_textures: true,
            packs_per_size: None,
            flops: 0.0,
            f32_operands: false,
        }
    }

    /// Declares that the plan never writes `buffers` and that whoever writes them runs the
    /// setup plan of [`Recorder::finish_with_setup`] afterwards: packs of tensors in them
    /// (a sampler's conv and linear weights) are recorded there, once, rather than in every
    /// replay of this plan.
    pub fn freeze(&mut self, buffers: &[Tensor]) {
        self.frozen.extend(buffers.iter().cloned());
        let gpu = self.gpu.clone();
        let f32_operands = self.f32_operands;
        self.setup.get_or_insert_with(|| {
            let mut setup = Recorder::new(gpu);
            setup.reuse_textures = false;
            setup.f32_operands = f32_operands;
            Box::new(setup)
        });
    }

    /// Keeps at most `per_size` packs of each texture size cached: a pack past that writes the
    /// texture of the oldest one, dropping it from the cache (a later GEMM or conv of its
    /// tensor packs it again). For plans without a backward pass (sampling), where each pack
    /// is read by the op that made it and at most its neighbours, this bounds the textures to a
    /// few per size instead of one per packed activation. Frozen buffers' packs (the setup
    /// plan's) are not affected.
    pub fn recycle_packs(&mut self, per_size: usize) {
        self.packs_per_size = Some(per_size.max(1));
    }

    /// A `width × height` texture for a pack: a free one of that size ([`Recorder`]'s
    /// `free_textures`), the oldest cached pack's of that size past
    /// [`Recorder::recycle_packs`]'s limit, or a new one.
    pub fn texture(&mut self, width: u32, height: u32, label: &str) -> Texture2d {
        let half = self.half_operands();
        let fits = |t: &Texture2d| t.width == width && t.height == height && t.half == half;
        if let Some(i) = self.free_textures.iter().position(fits) {
            return self.free_textures.swap_remove(i);
        }
        if let Some(limit) = self.packs_per_size.filter(|_| self.reuse_textures) {
            let same_size = self.packs.iter().filter(|(_, _, t)| fits(t)).count();
            if same_size >= limit
                && let Some(oldest) = self.packs.iter().position(|(_, _, t)| fits(t))
            {
                return self.packs.remove(oldest).2;
            }
        }
        Texture2d::new(&self.gpu, width, height, half, label)
    }

    /// Whether GEMM and conv operands are half precision ([`crate::gpu::Precision::F16`]):
    /// rounded to f16 as the portable kernels load them, packed into `rgba16float` textures on
    /// the subgroup path.
    pub fn half_operands(&self) -> bool {
        self.gpu.precision == crate::gpu::Precision::F16 && !self.f32_operands
    }

    /// Records `body` with f32 GEMM and conv operands even in a half-precision run: the
    /// time-embedding MLP (issue 21 keeps it in f32, as the timestep embedding it reads). Packs
    /// made inside are f32 textures; a half pack of the same tensor is a different one.
    pub fn full_precision<T>(&mut self, body: impl FnOnce(&mut Recorder) -> T) -> T {
        let before = self.f32_operands;
        self.set_f32_operands(true);
        let out = body(self);
        self.set_f32_operands(before);
        out
    }

    fn set_f32_operands(&mut self, on: bool) {
        self.f32_operands = on;
        if let Some(setup) = self.setup.as_deref_mut() {
            setup.f32_operands = on;
        }
    }

    /// The recorder a texture pack of `t` belongs in: the setup recorder when `t` lies in a
    /// frozen buffer, else this one.
    pub fn pack_recorder(&mut self, t: &Tensor) -> &mut Recorder {
        if self.setup.is_some() && self.frozen.iter().any(|f| f.shares_buffer(t)) {
            self.setup.as_deref_mut().expect("checked just above")
        } else {
            self
        }
    }

    /// Counts the floating-point operations of a GEMM or convolution just recorded.
    pub fn add_flops(&mut self, flops: f64) {
        self.flops += flops;
    }

    /// A small tensor to bind where a kernel's optional operand (a bias, weights) is absent.
    pub fn dummy(&mut self) -> Tensor {
        let gpu = self.gpu.clone();
        self.dummy
            .get_or_insert_with(|| gpu.tensor(&[4], "unused"))
            .clone()
    }

    /// Records one dispatch of `key` with `params` at binding 0 and each `(binding, resource)`.
    pub fn dispatch<P: bytemuck::Pod>(
        &mut self,
        key: KernelKey,
        params: &P,
        bindings: &[(u32, Binding)],
        groups: [u32; 3],
    ) {
        self.dispatch_as(key.entry, key, params, bindings, groups)
    }

    /// `dispatch`, named `entry` in the step's records (profiles, `StepRecord`): for an entry
    /// point that serves several operations, selected by its parameters.
    pub fn dispatch_as<P: bytemuck::Pod>(
        &mut self,
        entry: &'static str,
        mut key: KernelKey,
        params: &P,
        bindings: &[(u32, Binding)],
        groups: [u32; 3],
    ) {
        // Each binding's element type is the bound tensor's: an f16 tensor makes its binding's
        // `ElemN` f16 (kernels.rs), where the shader declares one.
        let mut typed = true;
        for (i, b) in bindings {
            if let Binding::Buffer(t) = b
                && t.dtype() == Dtype::F16
            {
                key.f16_bindings |= 1 << i;
                typed &= self.gpu.admit_f16_binding(t, key.shader, *i, key.entry);
            }
        }
        let align = PARAMS_ALIGN.max(self.gpu.limits.min_uniform_buffer_offset_alignment as usize);
        let offset = self.params.len().next_multiple_of(align);
        self.params.resize(offset, 0);
        let bytes = bytemuck::bytes_of(params);
        self.params.extend_from_slice(bytes);
        // Uniform blocks are sized in multiples of 16 bytes.
        let size = bytes.len().next_multiple_of(16);
        self.params.resize(offset + size, 0);
        // A binding or grid past the adapter's limits is recorded (and reported by `Gpu::check`
        // before anything runs) instead of reaching wgpu, whose validation would panic.
        let fits = typed
            && bindings.iter().all(|(_, b)| match b {
                Binding::Buffer(t) => self.gpu.admit_binding(t, key.entry),
                Binding::Texture(_) => true,
            })
            && self.gpu.admit_workgroups(groups, key.entry);
        for (_, b) in bindings {
            if let Binding::Buffer(t) = b {
                self.touch(t);
            }
        }
        let pipeline = self.gpu.kernels.pipeline(&key);
        self.records.push(StepRecord {
            kind: "dispatch",
            shader: key.shader,
            entry,
            template: key.template.clone(),
            constants: key.constants_f64(),
            bindings: bindings
                .iter()
                .map(|(i, b)| match b {
                    Binding::Buffer(t) => format!("{i}:{}", t.label()),
                    Binding::Texture(_) => format!("{i}:texture"),
                })
                .collect(),
            workgroups: groups,
        });
        if !fits {
            return;
        }
        self.pending.push(Pending::Dispatch(PendingDispatch {
            key,
            pipeline,
            params_offset: offset as u64,
            params_size: size as u64,
            bindings: bindings.to_vec(),
            groups,
        }));
    }

    /// The texture that `layout` packed from `t` (same buffer, offset and shape) if no dispatch or
    /// copy has bound `t`'s buffer since: its contents are still `t`'s.
    pub fn packed(&self, t: &Tensor, layout: &str) -> Option<Texture2d> {
        self.packs
            .iter()
            .find(|(src, l, tex)| {
                *l == layout
                    && tex.half == self.half_operands()
                    && src.shares_buffer(t)
                    && src.offset() == t.offset()
                    && src.shape() == t.shape()
            })
            .map(|(_, _, tex)| tex.clone())
    }

    /// Remembers that `tex` now holds `t` packed as `layout` (call after recording the pack).
    pub fn remember_pack(&mut self, t: &Tensor, layout: impl Into<String>, tex: &Texture2d) {
        self.packs.push((t.clone(), layout.into(), tex.clone()));
    }

    /// Forgets the packs of tensors that overlap `t`: it is bound (possibly written) by what is
    /// recorded next. Conservative: a read-only binding also forgets them. Other parts of the
    /// same buffer keep theirs (the parameters share one buffer; a bias binding leaves the
    /// packed weights beside it valid).
    fn touch(&mut self, t: &Tensor) {
        let overlaps = |src: &Tensor| {
            src.shares_buffer(t)
                && src.offset() < t.offset() + t.numel().max(1)
                && t.offset() < src.offset() + src.numel().max(1)
        };
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.packs)
            .into_iter()
            .partition(|(src, _, _)| overlaps(src));
        self.packs = kept;
        if self.reuse_textures {
            self.free_textures
                .extend(gone.into_iter().map(|(_, _, tex)| tex));
        }
    }

    /// Records a zero fill of `t` (e.g. gradients at the start of a step).
    pub fn clear(&mut self, t: &Tensor) {
        self.touch(t);
        if !self.gpu.admit_backed(t, "clear") {
            return;
        }
        self.records.push(StepRecord {
            kind: "clear",
            shader: "",
            entry: "",
            template: Vec::new(),
            constants: vec![],
            bindings: vec![t.label().into()],
            workgroups: [0; 3],
        });
        self.pending.push(Pending::Clear(t.clone()));
    }

    pub fn copy(&mut self, src: &Tensor, dst: &Tensor) -> Result<(), GpuError> {
        if src.numel() != dst.numel() || src.dtype() != dst.dtype() {
            return Err(GpuError::Invalid(format!(
                "copy `{}` {:?} {:?} -> `{}` {:?} {:?}: element counts or types differ",
                src.label(),
                src.shape(),
                src.dtype(),
                dst.label(),
                dst.shape(),
                dst.dtype()
            )));
        }
        if !src.byte_len().is_multiple_of(4) {
            // Buffer copies move whole 4-byte words: an odd count of f16 elements would
            // overwrite the half after `dst`.
            return Err(GpuError::Invalid(format!(
                "copy `{}` -> `{}`: {} f16 elements is not a whole number of 4-byte words; copy with a kernel",
                src.label(),
                dst.label(),
                src.numel()
            )));
        }
        self.records.push(StepRecord {
            kind: "copy",
            shader: "",
            entry: "",
            template: Vec::new(),
            constants: vec![],
            bindings: vec![src.label().into(), dst.label().into()],
            workgroups: [0; 3],
        });
        self.touch(dst);
        if !(self.gpu.admit_backed(src, "copy") && self.gpu.admit_backed(dst, "copy")) {
            return Ok(());
        }
        self.pending.push(Pending::CopyBuffer {
            src: src.clone(),
            dst: dst.clone(),
        });
        Ok(())
    }

    /// Whether `t` can be packed into this recorder's operand textures by a plain copy: its
    /// elements are the texels' (f32 into `rgba32float`, f16 into `rgba16float`). Otherwise a
    /// pack kernel converts (and, into f16 texels, rounds to nearest even).
    pub fn texture_copies(&self, t: &Tensor) -> bool {
        (t.dtype() == Dtype::F16) == self.half_operands()
    }

    /// Records a copy of a buffer whose rows are exactly `dst.width` texels into a texture
    /// (`bytes_per_row` must be a multiple of 256; the tensor's elements are the texels' type,
    /// [`Recorder::texture_copies`]).
    pub fn copy_to_texture(&mut self, src: &Tensor, dst: &Texture2d) {
        assert_eq!(
            src.dtype() == Dtype::F16,
            dst.half,
            "copy of `{}` into a texture of another element type",
            src.label()
        );
        let bytes_per_row = dst.width * if dst.half { 8 } else { 16 };
        debug_assert_eq!(bytes_per_row % 256, 0);
        self.records.push(StepRecord {
            kind: "copy_to_texture",
            shader: "",
            entry: "",
            template: Vec::new(),
            constants: vec![],
            bindings: vec![src.label().into(), "texture".into()],
            workgroups: [0; 3],
        });
        self.pending.push(Pending::CopyToTexture {
            src: src.clone(),
            dst: dst.clone(),
            bytes_per_row,
        });
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// [`Recorder::finish`] of a recorder with frozen buffers: (the setup plan that packs
    /// them, to run after each write of those buffers; the plan).
    pub fn finish_with_setup(mut self) -> (Plan, Plan) {
        let setup = match self.setup.take() {
            Some(setup) => setup.finish(),
            None => Recorder::new(self.gpu.clone()).finish(),
        };
        (setup, self.finish())
    }

    /// Uploads the parameter blocks and builds the bind groups.
    pub fn finish(self) -> Plan {
        // Packs recorded for a setup plan that nobody takes would never run.
        assert!(
            self.setup.as_ref().is_none_or(|s| s.is_empty()),
            "a recorder with frozen buffers is finished with finish_with_setup"
        );
        let device = &self.gpu.device;
        self.gpu
            .admit_buffer(self.params.len().max(16) as u64, "plan params", &[]);
        let params = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("plan params"),
            size: self.params.len().max(16) as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.gpu.queue.write_buffer(&params, 0, &self.params);
        let bound = self.pending.iter().map(Pending::tensors).collect();
        let steps = self
            .pending
            .into_iter()
            .map(|p| match p {
                Pending::Dispatch(d) => {
                    let mut entries = vec![wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &params,
                            offset: d.params_offset,
                            size: std::num::NonZeroU64::new(d.params_size),
                        }),
                    }];
                    for (i, b) in &d.bindings {
                        let resource = match b {
                            Binding::Buffer(t) => t.binding(),
                            Binding::Texture(t) => wgpu::BindingResource::TextureView(&t.view),
                        };
                        entries.push(wgpu::BindGroupEntry {
                            binding: *i,
                            resource,
                        });
                    }
                    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                        label: Some(d.key.entry),
                        layout: &d.pipeline.get_bind_group_layout(0),
                        entries: &entries,
                    });
                    Step::Dispatch {
                        pipeline: d.pipeline,
                        bind_group,
                        groups: d.groups,
                    }
                }
                Pending::Clear(t) => Step::Clear(t),
                Pending::CopyToTexture {
                    src,
                    dst,
                    bytes_per_row,
                } => Step::CopyToTexture {
                    src,
                    dst,
                    bytes_per_row,
                },
                Pending::CopyBuffer { src, dst } => Step::CopyBuffer { src, dst },
            })
            .collect();
        Plan {
            steps,
            bound,
            _params: params,
            records: self.records,
            flops: self.flops,
        }
    }
}

impl Pending {
    /// The buffer ranges the step binds or copies, read or written.
    fn tensors(&self) -> Vec<Tensor> {
        match self {
            Pending::Dispatch(d) => d
                .bindings
                .iter()
                .filter_map(|(_, b)| match b {
                    Binding::Buffer(t) => Some(t.clone()),
                    Binding::Texture(_) => None,
                })
                .collect(),
            Pending::Clear(t) => vec![t.clone()],
            Pending::CopyToTexture { src, .. } => vec![src.clone()],
            Pending::CopyBuffer { src, dst } => vec![src.clone(), dst.clone()],
        }
    }
}

/// A recorded sequence of dispatches and copies, replayable any number of times.
pub struct Plan {
    steps: Vec<Step>,
    /// What each step binds or copies (`last_step_touching`).
    bound: Vec<Vec<Tensor>>,
    _params: wgpu::Buffer,
    records: Vec<StepRecord>,
    flops: f64,
}

impl Plan {
    pub fn encode(&self, enc: &mut wgpu::CommandEncoder) {
        self.encode_steps(&self.steps, enc);
    }

    /// Encodes steps `range` only: a plan submitted in segments (a data-parallel step reads
    /// each bucket of gradients back as soon as the segment that finishes it is done).
    pub fn encode_range(&self, range: std::ops::Range<usize>, enc: &mut wgpu::CommandEncoder) {
        self.encode_steps(&self.steps[range], enc);
    }

    /// Steps (dispatches and copies) in the plan.
    pub fn step_count(&self) -> usize {
        self.steps.len()
    }

    /// The last step that binds or copies any element of `t`, read or written: after it, `t`
    /// holds its final values for this replay.
    pub fn last_step_touching(&self, t: &Tensor) -> Option<usize> {
        let end = t.offset() + t.numel();
        self.bound.iter().rposition(|tensors| {
            tensors.iter().any(|b| {
                b.shares_buffer(t) && b.offset() < end && t.offset() < b.offset() + b.numel()
            })
        })
    }

    fn encode_steps(&self, steps: &[Step], enc: &mut wgpu::CommandEncoder) {
        let mut i = 0;
        while i < steps.len() {
            match &steps[i] {
                Step::Dispatch { .. } => {
                    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: None,
                        timestamp_writes: None,
                    });
                    while let Some(Step::Dispatch {
                        pipeline,
                        bind_group,
                        groups,
                    }) = steps.get(i)
                    {
                        pass.set_pipeline(pipeline);
                        pass.set_bind_group(0, bind_group, &[]);
                        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
                        i += 1;
                    }
                    continue;
                }
                Step::Clear(t) => enc.clear_buffer(t.buffer(), t.byte_offset(), Some(t.byte_len())),
                Step::CopyBuffer { src, dst } => enc.copy_buffer_to_buffer(
                    src.buffer(),
                    src.byte_offset(),
                    dst.buffer(),
                    dst.byte_offset(),
                    src.byte_len(),
                ),
                Step::CopyToTexture {
                    src,
                    dst,
                    bytes_per_row,
                } => enc.copy_buffer_to_texture(
                    wgpu::TexelCopyBufferInfo {
                        buffer: src.buffer(),
                        layout: wgpu::TexelCopyBufferLayout {
                            offset: src.byte_offset(),
                            bytes_per_row: Some(*bytes_per_row),
                            rows_per_image: None,
                        },
                    },
                    wgpu::TexelCopyTextureInfo {
                        texture: &dst.texture,
                        mip_level: 0,
                        origin: wgpu::Origin3d::ZERO,
                        aspect: wgpu::TextureAspect::All,
                    },
                    wgpu::Extent3d {
                        width: dst.width,
                        height: dst.height,
                        depth_or_array_layers: 1,
                    },
                ),
            }
            i += 1;
        }
    }

    /// Runs each dispatch or copy in its own submit and returns (record index, seconds): a
    /// rough per-kernel profile (each time includes one submit + wait, ~0.1 ms on lavapipe).
    pub fn profile(&self, gpu: &super::Gpu) -> Vec<(usize, f64)> {
        let mut out = Vec::with_capacity(self.steps.len());
        for i in 0..self.steps.len() {
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            self.encode_steps(&self.steps[i..i + 1], &mut enc);
            let t = std::time::Instant::now();
            gpu.queue.submit([enc.finish()]);
            let _ = gpu.wait();
            out.push((i, t.elapsed().as_secs_f64()));
        }
        out
    }

    pub fn records(&self) -> &[StepRecord] {
        &self.records
    }
    /// Floating-point operations of the GEMMs and convolutions in the plan (2 per
    /// multiply-add; element-wise work is not counted, as PyTorch's FlopCounter does not).
    pub fn flops(&self) -> f64 {
        self.flops
    }

    pub fn dispatch_count(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Dispatch { .. }))
            .count()
    }
}

/// Plans timed dispatch by dispatch ([`Plan::profile`]): where the time of a step or of a
/// sampling evaluation goes (`bench --profile`, `sample --profile`).
pub struct PlanProfile {
    /// (shader::entry, dispatches, seconds), largest first.
    pub by_kernel: Vec<(String, usize, f64)>,
    /// (entry with its bindings and workgroups, seconds), largest first.
    pub dispatches: Vec<(String, f64)>,
}

impl PlanProfile {
    /// Runs each step of `plans` in its own submit and sums the times per kernel.
    pub fn of(gpu: &super::Gpu, plans: &[&Plan]) -> PlanProfile {
        let mut by_entry: std::collections::HashMap<String, (usize, f64)> = Default::default();
        let mut dispatches = Vec::new();
        for plan in plans {
            let records = plan.records();
            for (i, secs) in plan.profile(gpu) {
                let r = &records[i];
                let name = if r.kind == "dispatch" {
                    format!("{}::{}", r.shader, r.entry)
                } else {
                    r.kind.to_string()
                };
                dispatches.push((
                    format!("{name} [{}] {:?}", r.bindings.join(", "), r.workgroups),
                    secs,
                ));
                let e = by_entry.entry(name).or_default();
                e.0 += 1;
                e.1 += secs;
            }
        }
        let mut by_kernel: Vec<_> = by_entry.into_iter().map(|(k, (n, s))| (k, n, s)).collect();
        by_kernel.sort_by(|a, b| b.2.total_cmp(&a.2));
        dispatches.sort_by(|a, b| b.1.total_cmp(&a.1));
        PlanProfile {
            by_kernel,
            dispatches,
        }
    }

    /// Prints the `kernels` costliest kernels and the `largest` costliest single dispatches.
    pub fn print(&self, kernels: usize, largest: usize) {
        let total: f64 = self.by_kernel.iter().map(|p| p.2).sum();
        for (name, n, secs) in self.by_kernel.iter().take(kernels) {
            eprintln!(
                "{:>8.2} ms {:>5.1}% {n:>4}x {name}",
                secs * 1e3,
                100.0 * secs / total
            );
        }
        eprintln!(
            "{:>8.2} ms total over {} dispatches and copies (one submit each)",
            total * 1e3,
            self.dispatches.len()
        );
        eprintln!("largest single dispatches (bindings, workgroups):");
        for (what, secs) in self.dispatches.iter().take(largest) {
            eprintln!("{:>8.2} ms {what}", secs * 1e3);
        }
    }
}

/// Splits a 1-D count of workgroups into a 2-D grid within the 65535-per-dimension limit.
/// Kernels recover the linear index as `wid.x + wid.y * nwg.x`.
pub fn grid_1d(workgroups: usize) -> [u32; 3] {
    let w = workgroups.max(1);
    if w <= 65535 {
        [w as u32, 1, 1]
    } else {
        let y = w.div_ceil(65535);
        [w.div_ceil(y) as u32, y as u32, 1]
    }
}

/// Submitting recorded plans (here, beside [`Plan`], so that `gpu/mod.rs` needs nothing of this
/// file).
impl Gpu {
    /// Encodes the plans in order into one command buffer and submits it.
    pub fn submit(&self, plans: &[&Plan]) -> wgpu::SubmissionIndex {
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("step"),
            });
        for p in plans {
            p.encode(&mut enc);
        }
        self.submit_encoder(enc)
    }

    /// Submits and waits: for tests, benchmarks and one-off work. Nothing is submitted when a
    /// plan was built past the adapter's limits.
    pub fn run(&self, plans: &[&Plan]) -> Result<(), GpuError> {
        self.check()?;
        self.submit(plans);
        self.wait()
    }

    pub fn recorder(self: &Arc<Self>) -> Recorder {
        Recorder::new(self.clone())
    }
}
