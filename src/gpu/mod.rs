//! The runtime: adapter choice, device, buffers, the pipeline cache and the step plan.
//!
//! Everything a training step does is recorded once into a [`Plan`] (a plain list of dispatches
//! and copies, see `plan.rs`) and replayed with one queue submit per step. Buffers are allocated
//! when a plan is built, never while it runs.

mod kernels;
mod plan;
mod tensor;

pub use kernels::{
    INCLUDES, KernelKey, Kernels, SHADERS, binding_prelude, binding_takes_f16, entry_points,
    expand_template, f16_capable_bindings, shader_source,
};
pub use plan::{Binding, Plan, PlanProfile, Recorder, StepRecord, grid_1d};
pub use tensor::{
    Dtype, F32ActivationsGuard, NoGradGuard, Tensor, Texture2d, UnusedActivationsGuard,
    f32_activations, grad_enabled, no_grad, unused_activations,
};

use std::sync::Arc;

use thiserror::Error;

/// Which wgpu back end to look for adapters on.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// Vulkan, Metal or DX12, whichever the platform has (GL only as a last resort).
    #[default]
    Auto,
    Vulkan,
    Metal,
    Dx12,
    Gl,
}

impl BackendChoice {
    pub fn backends(self) -> wgpu::Backends {
        match self {
            BackendChoice::Auto => wgpu::Backends::PRIMARY | wgpu::Backends::GL,
            BackendChoice::Vulkan => wgpu::Backends::VULKAN,
            BackendChoice::Metal => wgpu::Backends::METAL,
            BackendChoice::Dx12 => wgpu::Backends::DX12,
            BackendChoice::Gl => wgpu::Backends::GL,
        }
    }
}

/// How the GEMM-shaped kernels (conv2d, linear, attention matmuls) run on this adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GemmPath {
    /// Storage buffers with workgroup-memory tiles: what real GPUs want.
    Portable,
    /// Operands packed into `rgba32float` storage textures and a register tile shared across a
    /// subgroup by `subgroupBroadcast` (docs/ARCHITECTURE.md, "Fast GEMM on lavapipe"): ~7x faster on
    /// lavapipe, where buffer loads are scalarised and barriers are coroutines.
    Subgroup { lanes: u32 },
}

/// The precision of GEMM and convolution operands (`--precision`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in float32.
    #[default]
    F32,
    /// Half-precision operands, as `torch.autocast(dtype=torch.float16)` gives a GEMM or a
    /// convolution on a GPU: each operand rounded to f16, products accumulated in f32. On the
    /// subgroup path the packed operand textures are `rgba16float` (half the memory); the
    /// portable path rounds the operands as it loads them. Activations stay f32 (issue 21 goes
    /// on from here).
    F16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Precision::F32 => write!(f, "f32"),
            Precision::F16 => write!(f, "f16"),
        }
    }
}

impl std::fmt::Display for GemmPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GemmPath::Portable => write!(f, "portable"),
            GemmPath::Subgroup { lanes } => write!(f, "subgroup{lanes}"),
        }
    }
}

#[derive(Debug, Error)]
pub enum GpuError {
    #[error("{}", no_adapter_message(*.backend, .filter, .available))]
    NoAdapter {
        backend: BackendChoice,
        filter: String,
        /// The adapters there are (name, backend, type) when `filter` matched none of them.
        available: Vec<String>,
    },
    #[error("could not open the device on adapter `{adapter}`: {source}")]
    RequestDevice {
        adapter: String,
        #[source]
        source: wgpu::RequestDeviceError,
    },
    #[error("GPU readback failed: {0}")]
    Readback(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the step does not fit this adapter:\n{0}")]
    TooLarge(String),
    #[error("this adapter cannot run the step:\n{0}")]
    Unsupported(String),
    #[error("the GPU ran out of memory: {0}\n{FIT_ADVICE}")]
    OutOfMemory(String),
    #[error("the GPU device was lost ({0})")]
    Lost(String),
    #[error("the GPU reported an error: {0}")]
    Device(String),
}

/// No adapter at all: how to get one. Adapters there, none matching `--adapter`: which there are.
fn no_adapter_message(backend: BackendChoice, filter: &str, available: &[String]) -> String {
    if available.is_empty() {
        format!(
            "no GPU adapter found for backend `{backend:?}`{filter}.\n\
             Install a GPU driver with Vulkan (Linux/Windows), Metal (macOS) or DX12 (Windows) support.\n\
             On Linux without a GPU, Mesa's software Vulkan driver works: `apt-get install mesa-vulkan-drivers` (lavapipe).\n\
             `wgpu-diffusion devices --backend auto` lists what wgpu can see."
        )
    } else {
        format!(
            "no GPU adapter{filter} for backend `{backend:?}`; the adapters there are:\n  {}\n\
             Give --adapter a part of one of these names, or leave --adapter out to take the best.",
            available.join("\n  ")
        )
    }
}

/// The error for sizes past the adapter's limits, with the way out.
fn too_large(problems: &[String]) -> GpuError {
    GpuError::TooLarge(format!("{}\n{FIT_ADVICE}", problems.join("\n")))
}

/// Bytes for messages: "1.5 GiB".
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Options for picking an adapter.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    pub backend: BackendChoice,
    /// Case-insensitive substring of the adapter name.
    pub adapter: Option<String>,
    /// A data-parallel rank's place on its host: with several adapters of the best kind (four
    /// discrete GPUs, say), local rank r takes the r-th of them (modulo their number).
    pub local_rank: usize,
    /// Force a GEMM path instead of choosing it from the adapter.
    pub gemm_path: Option<GemmPathChoice>,
    /// Treat storage bindings and buffers as ending at these sizes (bytes) when below the
    /// adapter's: how the tests exercise the code that splits large tensors and models
    /// (row bands, split parameter stores) on tiny shapes.
    pub cap_binding: Option<u64>,
    pub cap_buffer: Option<u64>,
    /// As the caps above, for the side of a 2-D texture (the subgroup path's packed operands).
    pub cap_texture: Option<u32>,
    /// GEMM and convolution operands in f32 or f16 ([`Precision`]).
    pub precision: Precision,
    /// Open the adapter as if it lacked `SHADER_F16`: how the tests reach the error a user of
    /// such an adapter gets.
    pub without_f16: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GemmPathChoice {
    Auto,
    Portable,
    Subgroup,
}

/// On CPUs with AVX-512, Mesa's llvmpipe (lavapipe) runs 16 lanes wide when
/// `LP_NATIVE_VECTOR_WIDTH=512`, which makes the GEMM kernels ~40 % faster. It must be set
/// before the Vulkan instance loads the driver; it changes nothing on real GPUs. A value the user
/// set is kept. Mesa's shader cache key does not include the width, so each width gets its own
/// cache directory unless `MESA_SHADER_CACHE_DIR` is set.
pub fn configure_llvmpipe_environment() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut width = std::env::var("LP_NATIVE_VECTOR_WIDTH").ok();
        #[cfg(target_arch = "x86_64")]
        if width.is_none() && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: called once, before the wgpu instance (and any driver thread) exists; the
            // CLI calls it first thing in main, tests through the one shared GPU context.
            unsafe { std::env::set_var("LP_NATIVE_VECTOR_WIDTH", "512") };
            width = Some("512".into());
        }
        if std::env::var_os("MESA_SHADER_CACHE_DIR").is_none() {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(std::path::PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache"))
                });
            if let Some(base) = base {
                let dir = base.join(format!(
                    "wgpu-diffusion/mesa-w{}",
                    width.as_deref().unwrap_or("default")
                ));
                if std::fs::create_dir_all(&dir).is_ok() {
                    // SAFETY: as above.
                    unsafe { std::env::set_var("MESA_SHADER_CACHE_DIR", &dir) };
                }
            }
        }
        if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
            // Silences a harmless Mesa warning on headless machines.
            // SAFETY: as above.
            unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
        }
    });
}

pub fn create_instance(backend: BackendChoice) -> wgpu::Instance {
    configure_llvmpipe_environment();
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = backend.backends();
    wgpu::Instance::new(desc)
}

/// Summary of an adapter for the `devices` listing and logs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub features: Vec<&'static str>,
    pub subgroup_sizes: (u32, u32),
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_texture_dimension_2d: u32,
}

/// Optional features this project uses when present.
const USEFUL_FEATURES: [(wgpu::Features, &str); 4] = [
    (wgpu::Features::SHADER_F16, "SHADER_F16"),
    (wgpu::Features::SUBGROUP, "SUBGROUP"),
    (wgpu::Features::TIMESTAMP_QUERY, "TIMESTAMP_QUERY"),
    (wgpu::Features::SHADER_F64, "SHADER_F64"),
];

pub fn summarize(adapter: &wgpu::Adapter) -> AdapterSummary {
    let info = adapter.get_info();
    let limits = adapter.limits();
    let features = adapter.features();
    AdapterSummary {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: info.driver.clone(),
        driver_info: info.driver_info.clone(),
        features: USEFUL_FEATURES
            .iter()
            .filter(|(f, _)| features.contains(*f))
            .map(|(_, n)| *n)
            .collect(),
        subgroup_sizes: (info.subgroup_min_size, info.subgroup_max_size),
        max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
        max_buffer_size: limits.max_buffer_size,
        max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
        max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
        max_texture_dimension_2d: limits.max_texture_dimension_2d,
    }
}

pub fn list_adapters(backend: BackendChoice) -> Vec<wgpu::Adapter> {
    let instance = create_instance(backend);
    pollster::block_on(instance.enumerate_adapters(backend.backends()))
}

/// The device, its queue and everything chosen for this adapter.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub adapter: AdapterSummary,
    pub features: wgpu::Features,
    pub limits: wgpu::Limits,
    pub gemm_path: GemmPath,
    /// GEMM and convolution operands ([`Precision`]).
    pub precision: Precision,
    pub kernels: Kernels,
    /// Problems found while building plans (a tensor past a limit of the adapter), wgpu errors
    /// nobody captured, and device loss: reported as errors by [`Gpu::check`], never panics.
    health: Arc<Health>,
}

/// What can go wrong with the device outside a call that returns a `Result`.
#[derive(Default)]
struct Health {
    /// Sizes past the adapter's limits, found when a tensor, texture or dispatch was recorded.
    limits: std::sync::Mutex<Vec<String>>,
    /// What the step asks of the adapter that it cannot do, whatever the sizes (f16 storage
    /// without `SHADER_F16`, an f16 tensor where a kernel reads f32), each with its own advice.
    unsupported: std::sync::Mutex<Vec<String>>,
    /// Errors wgpu reported outside any error scope (validation, out of memory, internal).
    uncaptured: std::sync::Mutex<Vec<String>>,
    /// Set by the device-lost callback.
    lost: std::sync::Mutex<Option<String>>,
    /// Bytes of every buffer and texture allocated through [`Gpu`] so far.
    allocated: std::sync::atomic::AtomicU64,
    /// Queue submits so far (the benchmark's submits per step).
    submits: std::sync::atomic::AtomicU64,
}

/// How to make a step fit when a tensor is past the adapter's limits.
pub const FIT_ADVICE: &str = "use a smaller --batch-size (with --grad-accum to keep the effective batch), or a smaller model";

fn adapter_rank(info: &wgpu::AdapterInfo) -> u32 {
    let ty = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    // Prefer Vulkan/Metal/DX12 over GL for the same device type.
    let be = if info.backend == wgpu::Backend::Gl {
        1
    } else {
        0
    };
    ty * 2 + be
}

impl Gpu {
    /// Picks the best adapter matching `opts` (discrete > integrated > CPU; GL last) and opens
    /// it with the adapter's own limits and the useful optional features it has.
    pub fn new(opts: &GpuOptions) -> Result<Arc<Gpu>, GpuError> {
        let mut adapters = list_adapters(opts.backend);
        let available: Vec<String> = adapters
            .iter()
            .map(|a| {
                let i = a.get_info();
                format!("{} [{:?} / {:?}]", i.name, i.backend, i.device_type)
            })
            .collect();
        if let Some(filter) = &opts.adapter {
            let f = filter.to_lowercase();
            adapters.retain(|a| a.get_info().name.to_lowercase().contains(&f));
        }
        adapters.sort_by_key(|a| adapter_rank(&a.get_info()));
        // Only adapters of the best kind are shared out among a host's ranks: one discrete GPU
        // beside lavapipe serves every rank rather than sending one rank to the CPU.
        if let Some(best) = adapters.first().map(|a| adapter_rank(&a.get_info())) {
            adapters.retain(|a| adapter_rank(&a.get_info()) == best);
        }
        let pick = opts.local_rank % adapters.len().max(1);
        let adapter = adapters
            .into_iter()
            .nth(pick)
            .ok_or_else(|| GpuError::NoAdapter {
                backend: opts.backend,
                filter: opts
                    .adapter
                    .as_ref()
                    .map(|f| format!(" whose name contains `{f}`"))
                    .unwrap_or_default(),
                available,
            })?;
        let summary = summarize(&adapter);
        let info = adapter.get_info();
        let wanted = USEFUL_FEATURES
            .iter()
            .fold(wgpu::Features::empty(), |acc, (f, _)| acc | *f);
        let mut features = adapter.features() & wanted;
        if opts.without_f16 {
            features.remove(wgpu::Features::SHADER_F16);
        }
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("wgpu-diffusion"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|source| GpuError::RequestDevice {
            adapter: info.name.clone(),
            source,
        })?;

        let gemm_path = choose_gemm_path(&info, features, opts.gemm_path)?;
        // wgpu's default handler panics on any error outside an error scope; record them instead,
        // so the next `check` turns them into an error value with context.
        let health = Arc::new(Health::default());
        let h = health.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = h.uncaptured.lock()
                && v.len() < 8
            {
                v.push(e.to_string());
            }
        }));
        let h = health.clone();
        device.set_device_lost_callback(move |reason, message| {
            if let Ok(mut lost) = h.lost.lock() {
                *lost = Some(format!("{reason:?}: {message}"));
            }
        });
        let mut limits = limits;
        if let Some(cap) = opts.cap_binding {
            limits.max_storage_buffer_binding_size =
                limits.max_storage_buffer_binding_size.min(cap);
        }
        if let Some(cap) = opts.cap_buffer {
            limits.max_buffer_size = limits.max_buffer_size.min(cap);
        }
        if let Some(cap) = opts.cap_texture {
            limits.max_texture_dimension_2d = limits.max_texture_dimension_2d.min(cap);
        }
        Ok(Arc::new(Gpu {
            kernels: Kernels::new(&device),
            device,
            queue,
            adapter: summary,
            features,
            limits,
            gemm_path,
            precision: opts.precision,
            health,
        }))
    }

    /// Records a size past the adapter's limits (the allocation or dispatch is replaced by a
    /// harmless one; [`Gpu::check`] reports it before anything runs).
    fn limit_problem(&self, what: String) {
        if let Ok(mut v) = self.health.limits.lock()
            && v.len() < 8
        {
            v.push(what);
        }
    }

    /// Records something the step asks that this adapter cannot do (see `Health::unsupported`).
    fn unsupported_problem(&self, what: String) {
        if let Ok(mut v) = self.health.unsupported.lock()
            && v.len() < 8
            && !v.contains(&what)
        {
            v.push(what);
        }
    }

    /// Whether a buffer of `bytes` can be allocated on this adapter; records the problem if not.
    pub(crate) fn admit_buffer(&self, bytes: u64, label: &str, shape: &[usize]) -> bool {
        if bytes > self.limits.max_buffer_size {
            self.limit_problem(format!(
                "tensor `{label}` {shape:?} needs {} and this adapter's largest buffer is {} (max_buffer_size)",
                human_bytes(bytes),
                human_bytes(self.limits.max_buffer_size)
            ));
            return false;
        }
        self.health
            .allocated
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Whether a `width` x `height` texture of `texel_bytes` per texel fits; records the
    /// problem if not.
    pub(crate) fn admit_texture(
        &self,
        (width, height): (u32, u32),
        texel_bytes: u64,
        label: &str,
    ) -> bool {
        let max = self.limits.max_texture_dimension_2d;
        if width > max || height > max {
            self.limit_problem(format!(
                "texture `{label}` is {width} x {height} texels and this adapter allows {max} per side (max_texture_dimension_2d)"
            ));
            return false;
        }
        self.health.allocated.fetch_add(
            width.max(1) as u64 * height.max(1) as u64 * texel_bytes,
            std::sync::atomic::Ordering::Relaxed,
        );
        true
    }

    /// Whether a dispatch's workgroup counts are within the adapter's limit.
    pub(crate) fn admit_workgroups(&self, groups: [u32; 3], entry: &str) -> bool {
        let max = self.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > max) {
            self.limit_problem(format!(
                "kernel `{entry}` needs {groups:?} workgroups and this adapter allows {max} per dimension"
            ));
            return false;
        }
        true
    }

    /// Bytes of all buffers and textures allocated so far (our own accounting).
    pub fn allocated_bytes(&self) -> u64 {
        self.health
            .allocated
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every problem recorded so far, as one error: sizes past the adapter's limits (found when
    /// plans were built, before anything ran), wgpu errors, device loss.
    pub fn check(&self) -> Result<(), GpuError> {
        // Called before every step: nothing is copied unless something went wrong.
        if let Some(reason) = self.health.lost.lock().ok().and_then(|l| l.clone()) {
            return Err(GpuError::Lost(reason));
        }
        if let Ok(problems) = self.health.unsupported.lock()
            && !problems.is_empty()
        {
            return Err(GpuError::Unsupported(problems.join("\n")));
        }
        if let Ok(limits) = self.health.limits.lock()
            && !limits.is_empty()
        {
            return Err(too_large(&limits));
        }
        if let Ok(errors) = self.health.uncaptured.lock()
            && !errors.is_empty()
        {
            return Err(GpuError::Device(errors.join("\n")));
        }
        Ok(())
    }

    /// Runs `build` (allocations, pipelines, plans) inside out-of-memory and validation error
    /// scopes and turns what they caught, and any size past the adapter's limits, into an error.
    pub fn checked_build<T, E: From<GpuError>>(
        &self,
        build: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let built = build();
        let validation = pollster::block_on(validation.pop());
        let oom = pollster::block_on(oom.pop());
        // Sizes past the limits belong to this build: reported here (before the build's own
        // error, which they usually cause) and cleared, so the device stays usable for a
        // smaller build.
        let limits = self
            .health
            .limits
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default();
        if !limits.is_empty() {
            return Err(too_large(&limits).into());
        }
        let built = built?;
        self.check()?;
        if let Some(e) = oom {
            return Err(GpuError::OutOfMemory(e.to_string()).into());
        }
        if let Some(e) = validation {
            return Err(GpuError::Device(e.to_string()).into());
        }
        Ok(built)
    }

    pub fn describe(&self) -> String {
        format!(
            "{} ({}, {}, {}; gemm path {}{})",
            self.adapter.name,
            self.adapter.backend,
            self.adapter.device_type,
            self.adapter.driver_info,
            self.gemm_path,
            match self.precision {
                Precision::F32 => "",
                Precision::F16 => ", f16 operands",
            }
        )
    }

    pub(crate) fn read_bytes(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, GpuError> {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: len.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buffer, offset, &staging, 0, len);
        self.submit_encoder(enc);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|e| GpuError::Readback(e.to_string()))?
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        let view = staging
            .slice(..)
            .get_mapped_range()
            .map_err(|e| GpuError::Readback(e.to_string()))?;
        let out = view[..len as usize].to_vec();
        drop(view);
        staging.unmap();
        Ok(out)
    }

    /// Blocks until every submitted command has finished.
    pub fn wait(&self) -> Result<(), GpuError> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: None,
            })
            .map_err(|e| GpuError::Readback(format!("device poll failed: {e}")))?;
        self.check()
    }

    /// Finishes and submits a command encoder (every submit goes through here and is counted).
    pub fn submit_encoder(&self, enc: wgpu::CommandEncoder) -> wgpu::SubmissionIndex {
        self.health
            .submits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.queue.submit([enc.finish()])
    }

    /// The threads that run workgroups when the adapter is a CPU (lavapipe: `LP_NUM_THREADS`,
    /// by default one per core); None on a GPU. Work split into a handful of workgroups is
    /// balanced over them ([`crate::ops::conv2d::conv2d_backward_weight`]).
    pub fn cpu_workers(&self) -> Option<usize> {
        if self.adapter.device_type != "Cpu" {
            return None;
        }
        let env = std::env::var("LP_NUM_THREADS").ok();
        let threads = env.and_then(|v| v.trim().parse::<usize>().ok());
        Some(
            threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
                .max(1),
        )
    }

    /// Queue submits so far.
    pub fn submit_count(&self) -> u64 {
        self.health
            .submits
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn has_subgroups(&self) -> bool {
        self.features.contains(wgpu::Features::SUBGROUP)
    }
}

/// The subgroup path is the fast one on lavapipe (a CPU adapter, 8 or 16 lanes); real GPUs get
/// the portable workgroup-memory path unless asked otherwise.
fn choose_gemm_path(
    info: &wgpu::AdapterInfo,
    features: wgpu::Features,
    choice: Option<GemmPathChoice>,
) -> Result<GemmPath, GpuError> {
    let lanes = info.subgroup_min_size;
    let fixed_small = features.contains(wgpu::Features::SUBGROUP)
        && info.subgroup_min_size == info.subgroup_max_size
        && (lanes == 8 || lanes == 16);
    let env_choice = std::env::var("WGPU_DIFFUSION_GEMM_PATH").ok();
    let choice = match (choice, env_choice.as_deref()) {
        (Some(c), _) if c != GemmPathChoice::Auto => c,
        (_, Some("portable")) => GemmPathChoice::Portable,
        (_, Some("subgroup")) => GemmPathChoice::Subgroup,
        _ => GemmPathChoice::Auto,
    };
    match choice {
        GemmPathChoice::Portable => Ok(GemmPath::Portable),
        GemmPathChoice::Subgroup if fixed_small => Ok(GemmPath::Subgroup { lanes }),
        GemmPathChoice::Subgroup => Err(GpuError::Invalid(format!(
            "the subgroup GEMM path needs SUBGROUP with a fixed subgroup size of 8 or 16; adapter `{}` has {}..{} lanes{}",
            info.name,
            info.subgroup_min_size,
            info.subgroup_max_size,
            if features.contains(wgpu::Features::SUBGROUP) {
                ""
            } else {
                " and no SUBGROUP feature"
            }
        ))),
        GemmPathChoice::Auto => Ok(
            if fixed_small && info.device_type == wgpu::DeviceType::Cpu {
                GemmPath::Subgroup { lanes }
            } else {
                GemmPath::Portable
            },
        ),
    }
}
