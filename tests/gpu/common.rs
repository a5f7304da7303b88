//! Shared test helpers: the one GPU context, tolerance checks that print what differs.

use std::sync::{Arc, OnceLock};

use wgpu_diffusion::gpu::{GemmPathChoice, Gpu, GpuOptions, Plan, Recorder, Tensor};
pub use wgpu_diffusion::reference::test_data;

/// The GPU every test uses, opened once. Panics (failing the test) with the "how to get an
/// adapter" message when there is none.
pub fn gpu() -> Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| match Gpu::new(&GpuOptions::default()) {
        Ok(g) => {
            eprintln!("GPU tests run on: {}", g.describe());
            g
        }
        Err(e) => panic!("GPU tests need an adapter and none could be opened:\n{e}"),
    })
    .clone()
}

/// A GPU forced onto one GEMM path, so both paths are tested on the same adapter.
pub fn gpu_with_path(path: GemmPathChoice) -> Arc<Gpu> {
    static PORTABLE: OnceLock<Arc<Gpu>> = OnceLock::new();
    static SUBGROUP: OnceLock<Arc<Gpu>> = OnceLock::new();
    let cell = if path == GemmPathChoice::Subgroup {
        &SUBGROUP
    } else {
        &PORTABLE
    };
    cell.get_or_init(|| {
        gpu(); // report the adapter (and fail with the install hint) first
        let opts = GpuOptions {
            gemm_path: Some(path),
            ..Default::default()
        };
        Gpu::new(&opts)
            .unwrap_or_else(|e| panic!("GEMM path {path:?} unavailable on this adapter: {e}"))
    })
    .clone()
}

/// GPUs with half-precision GEMM and conv operands (`Precision::F16`), one per GEMM path.
pub fn half_gpus() -> Vec<Arc<Gpu>> {
    static HALF: OnceLock<Vec<Arc<Gpu>>> = OnceLock::new();
    HALF.get_or_init(|| {
        gemm_paths()
            .iter()
            .map(|g| {
                let path = match g.gemm_path {
                    wgpu_diffusion::gpu::GemmPath::Portable => GemmPathChoice::Portable,
                    _ => GemmPathChoice::Subgroup,
                };
                let opts = GpuOptions {
                    gemm_path: Some(path),
                    precision: wgpu_diffusion::gpu::Precision::F16,
                    ..Default::default()
                };
                Gpu::new(&opts).unwrap_or_else(|e| panic!("half-precision operands: {e}"))
            })
            .collect()
    })
    .clone()
}

/// Each value rounded to the nearest f16 (ties to even), as `tensor.half()` does.
pub fn f16_round(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| half::f16::from_f64(x).to_f64()).collect()
}

/// A fresh device per GEMM path (both where the adapter has the subgroup one) whose storage
/// bindings end at `binding` bytes and buffers at `buffer` (`GpuOptions::cap_binding`): how
/// tests reach the code for tensors and models past an adapter's limits on tiny shapes.
pub fn capped_gpus(binding: u64, buffer: Option<u64>) -> Vec<Arc<Gpu>> {
    let mut paths = vec![GemmPathChoice::Portable];
    if gemm_paths().len() > 1 {
        paths.push(GemmPathChoice::Subgroup);
    }
    paths
        .into_iter()
        .map(|p| {
            Gpu::new(&GpuOptions {
                gemm_path: Some(p),
                cap_binding: Some(binding),
                cap_buffer: buffer,
                ..Default::default()
            })
            .unwrap()
        })
        .collect()
}

/// Both GEMM paths where the adapter has the subgroup one, else the portable one alone.
pub fn gemm_paths() -> Vec<Arc<Gpu>> {
    let mut v = vec![gpu_with_path(GemmPathChoice::Portable)];
    if matches!(
        gpu().gemm_path,
        wgpu_diffusion::gpu::GemmPath::Subgroup { .. }
    ) {
        v.push(gpu_with_path(GemmPathChoice::Subgroup));
    }
    v
}

pub fn upload(g: &Arc<Gpu>, shape: &[usize], data: &[f64], label: &str) -> Tensor {
    let v: Vec<f32> = data.iter().map(|&x| x as f32).collect();
    g.tensor_from(shape, &v, label).expect("upload")
}

/// Rounds test inputs to f32 so the f64 reference sees exactly what the GPU sees.
/// The geometry of a reference conv (stride, padding [top, left, bottom, right]).
pub fn conv_geometry(
    c: &wgpu_diffusion::reference::conv2d::Conv,
) -> wgpu_diffusion::ops::conv2d::Conv2dGeometry {
    wgpu_diffusion::ops::conv2d::Conv2dGeometry {
        stride: c.stride,
        pad_top: c.pad[0],
        pad_left: c.pad[1],
        pad_bottom: c.pad[2],
        pad_right: c.pad[3],
    }
}

pub fn f32_round(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| x as f32 as f64).collect()
}

pub fn random(n: usize, seed: u64) -> Vec<f64> {
    f32_round(&test_data(n, seed))
}

pub fn run(g: &Arc<Gpu>, record: impl FnOnce(&mut Recorder)) -> Plan {
    let mut rec = g.recorder();
    record(&mut rec);
    let plan = rec.finish();
    g.run(&[&plan]).expect("run");
    plan
}

pub fn read(g: &Arc<Gpu>, t: &Tensor) -> Vec<f32> {
    g.read(t).expect("readback")
}

/// Asserts |gpu − ref| ≤ atol + rtol·|ref| elementwise; on failure prints the first values, the
/// worst element and the max difference.
pub fn assert_close(what: &str, gpu: &[f32], reference: &[f64], atol: f64, rtol: f64) {
    assert_eq!(
        gpu.len(),
        reference.len(),
        "{what}: length {} vs reference {}",
        gpu.len(),
        reference.len()
    );
    let mut worst = (0usize, 0.0f64, 0.0f64); // index, excess over tolerance, abs diff
    let mut max_diff = 0.0f64;
    let mut bad = 0usize;
    for (i, (&g, &r)) in gpu.iter().zip(reference).enumerate() {
        let d = (g as f64 - r).abs();
        let tol = atol + rtol * r.abs();
        if d.is_nan() || d > tol {
            bad += 1;
            let excess = if d.is_nan() { f64::INFINITY } else { d - tol };
            if excess > worst.1 || worst.1 == 0.0 {
                worst = (i, excess, d);
            }
        }
        if d > max_diff || d.is_nan() {
            max_diff = d;
        }
    }
    if bad > 0 {
        let n = gpu.len().min(8);
        panic!(
            "{what}: {bad} of {} elements out of tolerance (atol {atol:e}, rtol {rtol:e}); max |diff| {max_diff:e}; \
             worst at {}: gpu {} vs ref {}\n  gpu[..{n}] = {:?}\n  ref[..{n}] = {:?}",
            gpu.len(),
            worst.0,
            gpu[worst.0],
            reference[worst.0],
            &gpu[..n],
            &reference[..n]
        );
    }
}

/// Max |ref| of a reference, for tolerances scaled to the data.
pub fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

/// Runs the `wgpu-diffusion` binary with `args`; returns (success, stderr). Fails the test if
/// the tool panicked: every bad input must be an error message.
pub fn run_cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wgpu-diffusion"))
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .expect("run wgpu-diffusion");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "the CLI panicked:\n{stderr}");
    (out.status.success(), stderr)
}

/// Relative L2 distance ‖ours − reference‖ / ‖reference‖ (in f64).
pub fn rel_l2(ours: &[f32], reference: &[f32]) -> f64 {
    let num: f64 = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Every parameter gradient of `store` (flat `grads`) against `reference(name)`: relative L2
/// ≤ 1e-3; attention `to_k.bias`, analytically zero (softmax is shift-invariant along keys),
/// max |g| ≤ 1e-6·max(1, max |reference|); a parameter without a reference (a frozen one)
/// must have no gradient at all. Returns the worst (name, relative L2), for the log.
pub fn assert_param_grads(
    store: &wgpu_diffusion::nn::ParamStore,
    grads: &[f32],
    reference: impl Fn(&str) -> Option<Vec<f32>>,
) -> (String, f64) {
    let mut worst = (String::new(), 0.0f64);
    for (spec, ours) in store.unflatten(grads) {
        let Some(r) = reference(&spec.name) else {
            assert!(
                ours.iter().all(|&v| v == 0.0),
                "grad.{}: a parameter without a reference gradient (frozen) got one",
                spec.name
            );
            continue;
        };
        if spec.name.ends_with("to_k.bias") {
            let m = ours.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = r.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            assert!(m <= 1e-6 * scale, "grad.{}: max |g| {m:e}", spec.name);
            continue;
        }
        let e = rel_l2(ours, &r);
        if e > worst.1 {
            worst = (spec.name.clone(), e);
        }
        assert!(
            e <= 1e-3,
            "grad.{}: rel L2 {e:e}; ours[..4] {:?} ref[..4] {:?}",
            spec.name,
            &ours[..4.min(ours.len())],
            &r[..4.min(r.len())]
        );
    }
    worst
}
