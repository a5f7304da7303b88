//! The training loop end to end on tiny16: loss goes down, an interrupted run resumes to the
//! same bits as an uninterrupted one, checkpoints round-trip, bad inputs are clear errors.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use wgpu_diffusion::io::model_dir::{MODEL_WEIGHTS, read_model_config, read_model_weights};
use wgpu_diffusion::io::tensors::LoadedTensors;
use wgpu_diffusion::nn::{ParamStore, UNet, UNetConfig};
use wgpu_diffusion::train::{LrSchedule, Progress, TrainConfig, run};

use crate::common::*;

/// Raises `stop` once `step` reaches `stop_at` (simulates Ctrl-C at a known step).
struct StopAt {
    stop: Arc<AtomicBool>,
    stop_at: u64,
}

impl Progress for StopAt {
    fn start(&mut self, _: u64, _: u64) {}
    fn update(&mut self, step: u64, _: Option<f32>, _: f64, _: f64) {
        if step >= self.stop_at {
            self.stop.store(true, Ordering::SeqCst);
        }
    }
    fn message(&mut self, _: &str) {}
    fn finish(&mut self) {}
}

/// Runs training to its last step (no interruption).
fn run_to_end(
    g: Arc<wgpu_diffusion::gpu::Gpu>,
    cfg: TrainConfig,
) -> wgpu_diffusion::train::RunSummary {
    let never = Arc::new(AtomicBool::new(false));
    run(
        g,
        cfg,
        None,
        never.clone(),
        &mut StopAt {
            stop: never,
            stop_at: u64::MAX,
        },
    )
    .unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wgpu-diffusion-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn small_config(out: &Path, steps: u64) -> TrainConfig {
    TrainConfig {
        model: "tiny16".into(),
        steps,
        batch_size: 4,
        lr: 2e-3,
        lr_warmup_steps: 2,
        lr_schedule: LrSchedule::Cosine,
        sample_every: 0,
        sample_steps: 2,
        checkpoint_every: 1000,
        log_every: 1,
        out: Some(out.to_path_buf()),
        ..Default::default()
    }
}

fn params_of(dir: &Path) -> Vec<f32> {
    let last = wgpu_diffusion::train::RunDir {
        root: dir.to_path_buf(),
    }
    .list_checkpoints()
    .pop()
    .expect("a checkpoint");
    let ck = LoadedTensors::read(&last).unwrap();
    let mut all = Vec::new();
    let mut names = ck.names();
    names.sort();
    for name in names {
        if name.starts_with("param.") || name.starts_with("ema.") || name.starts_with("exp_avg") {
            all.extend(ck.get(&name).unwrap().1);
        }
    }
    all
}

/// A run killed after its final checkpoint but before the end of its end (here: the model
/// export and `finished.json` gone) is not finished: resuming writes the export again, with the
/// same weights; resuming it once more is refused as finished.
#[test]
fn a_run_killed_while_writing_its_end_finishes_on_resume() {
    let g = gpu();
    let out = temp_dir("end");
    let cfg = small_config(&out, 3);
    run_to_end(g.clone(), cfg.clone());
    let marker = out.join("finished.json");
    let weights = out.join("model").join(MODEL_WEIGHTS);
    assert!(marker.is_file() && weights.is_file());
    let exported = std::fs::read(&weights).unwrap();
    std::fs::remove_file(&marker).unwrap();
    std::fs::remove_dir_all(out.join("model")).unwrap();
    let never = Arc::new(AtomicBool::new(false));
    let mut quiet = StopAt {
        stop: never.clone(),
        stop_at: u64::MAX,
    };
    let summary = run(
        g.clone(),
        cfg.clone(),
        Some(&out),
        never.clone(),
        &mut quiet,
    )
    .unwrap();
    assert_eq!(summary.steps, 3);
    assert!(marker.is_file(), "finished.json written again");
    assert_eq!(
        std::fs::read(&weights).unwrap(),
        exported,
        "the same export"
    );
    let e = run(g, cfg, Some(&out), never, &mut quiet)
        .expect_err("a finished run is refused")
        .to_string();
    assert!(e.contains("is finished"), "{e}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn interrupted_run_resumes_to_identical_parameters() {
    resume_matches_straight_run("plain", |c| c);
}

/// The same with a GradScaler: its scale continues across the resume (growth every 2 clean
/// steps: the resumed run must start from the checkpoint's scale and growth tracker, not a
/// fresh scaler) and metrics.jsonl logs it.
#[test]
fn a_run_with_a_grad_scaler_resumes_identically_and_logs_its_scale() {
    let (_, b) = resume_matches_straight_run("scaler", |mut c| {
        c.grad_scaler = true;
        c.grad_scaler_growth_interval = 2;
        c
    });
    let scales = |d: &Path| -> Vec<(u64, f64, u64)> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let field = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {l}"));
                (
                    v["step"].as_u64().unwrap(),
                    field("loss_scale"),
                    field("skipped_steps") as u64,
                )
            })
            .collect()
    };
    let want: Vec<(u64, f64, u64)> = [65536.0, 131072.0, 131072.0, 262144.0, 262144.0, 524288.0]
        .iter()
        .enumerate()
        .map(|(i, &s)| (i as u64 + 1, s, 0))
        .collect();
    assert_eq!(scales(&b), want, "the resumed run");
    let _ = std::fs::remove_dir_all(&b);
}

/// A GradScaler run whose weights blow up: each step with inf/NaN gradients is skipped, logged
/// (null loss, the scale halving) and the run goes on, until 100 in a row stop it with a clear
/// error; the rows before the stop survive a resume's truncation of metrics.jsonl.
#[test]
fn a_run_whose_gradients_stay_non_finite_stops_after_100_skipped_steps() {
    let g = gpu();
    let out = temp_dir("skips");
    let cfg = TrainConfig {
        grad_scaler: true,
        // High enough that halving 100 times stays above the 2^-24 floor: the in-a-row rule
        // stops the run, not the floor.
        grad_scaler_init_scale: 2f64.powi(127),
        lr: 1e30,
        lr_warmup_steps: 0,
        lr_schedule: LrSchedule::Constant,
        max_grad_norm: 0.0,
        ..small_config(&out, 400)
    };
    let never = Arc::new(AtomicBool::new(false));
    let mut quiet = StopAt {
        stop: never.clone(),
        stop_at: u64::MAX,
    };
    let e = run(g, cfg, None, never, &mut quiet).expect_err("the run stops");
    let e = format!("{e:#}");
    assert!(e.contains("100 steps in a row"), "{e}");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let skipped = rows.iter().filter(|r| r["loss"].is_null()).count();
    assert!(
        skipped >= 100,
        "{skipped} rows with a null loss of {}",
        rows.len()
    );
    let last = rows.last().unwrap();
    assert_eq!(
        last["skipped_steps"].as_u64(),
        Some(skipped as u64),
        "{last}"
    );
    let kept =
        wgpu_diffusion::train::run_dir::truncate_metrics(&out.join("metrics.jsonl"), 1000).unwrap();
    assert_eq!(
        kept.len(),
        rows.len() - skipped,
        "finite losses in the history"
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// The same with class labels and label dropout (drawn per step from the host's Philox stream).
#[test]
fn class_conditional_run_resumes_and_samples_every_class() {
    let (_, b) = resume_matches_straight_run("classes", |mut c| {
        c.class_conditional = true;
        c.cond_drop = 0.5;
        c
    });
    let model = b.join("model");
    let config = read_model_config(&model).unwrap();
    assert_eq!(
        (config.num_class_embeds, config.null_class),
        (Some(11), Some(10))
    );
    let names: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(model.join("class_names.json")).unwrap())
            .unwrap();
    assert_eq!(names.len(), 10);
    // Guidance algebra on the real batched path: s = 1 is the conditional branch alone, s = 0 the
    // unconditional (null-class) branch alone.
    {
        use wgpu_diffusion::diffusion::scheduler::{SamplerKind, SamplingSchedule};
        use wgpu_diffusion::sample::{ModelSource, Noise, Sampler, SamplerOptions};
        let g = gpu();
        let source = ModelSource::from_dir(&model).unwrap();
        let run_with = |guidance: Option<f32>, label: u32| {
            let schedule =
                SamplingSchedule::new(&source.scheduler, SamplerKind::Ddim, 3, None, 0.0).unwrap();
            let opts = SamplerOptions {
                guidance,
                inpaint: None,
                vae: None,
                context_tokens: None,
                size: None,
            };
            let mut s = Sampler::new(&g, &source.config, schedule, 2, &opts).unwrap();
            s.set_weights(&source.weights(&s.unet.params).unwrap())
                .unwrap();
            s.sample_batch(0, &Noise::Seeded(5), Some(&[label, label]), &mut |_| {})
                .unwrap()
        };
        let max_diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        };
        let cond = run_with(None, 3);
        let d1 = max_diff(&run_with(Some(1.0), 3), &cond);
        let d0 = max_diff(&run_with(Some(0.0), 3), &run_with(None, 10));
        assert!(
            d1 < 1e-4 && d0 < 1e-4,
            "guidance 1 vs conditional {d1}, 0 vs null class {d0}"
        );
        assert!(max_diff(&run_with(Some(3.0), 3), &cond) > 1e-3);
    }
    let m = model.to_str().unwrap();
    let out = b.join("grid");
    let o = out.to_str().unwrap();
    let (ok, err) = run_cli(&[
        "sample",
        "--model",
        m,
        "--class",
        "all",
        "--num",
        "2",
        "--guidance-scale",
        "3",
        "--steps",
        "2",
        "--batch-size",
        "5",
        "--out",
        o,
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("guidance scale 3"), "{err}");
    let grid = image::open(out.join("grid.png")).unwrap();
    assert!(
        grid.height() > 4 * grid.width(),
        "one row per class: {}x{}",
        grid.width(),
        grid.height()
    );
    assert!(out.join("00019.png").exists() && !out.join("00020.png").exists());
    for (args, needle) in [
        (
            vec!["sample", "--model", m, "--out", o],
            "is class-conditional: choose --class",
        ),
        (
            vec!["sample", "--model", m, "--class", "10", "--out", o],
            "out of range",
        ),
        (
            vec!["sample", "--model", m, "--class", "seven", "--out", o],
            "not a class index or name",
        ),
    ] {
        let (ok, err) = run_cli(&args);
        assert!(!ok && err.contains(needle), "{args:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&b);
}

fn resume_matches_straight_run(
    name: &str,
    adjust: impl Fn(TrainConfig) -> TrainConfig,
) -> (PathBuf, PathBuf) {
    let small_config = |d: &Path, steps| adjust(small_config(d, steps));
    let g = gpu();
    let (a, b) = (
        temp_dir(&format!("straight-{name}")),
        temp_dir(&format!("resumed-{name}")),
    );
    let straight = run_to_end(g.clone(), small_config(&a, 6));
    assert_eq!(straight.steps, 6);

    let stop = Arc::new(AtomicBool::new(false));
    let first = run(
        g.clone(),
        small_config(&b, 6),
        None,
        stop.clone(),
        &mut StopAt {
            stop: stop.clone(),
            stop_at: 3,
        },
    )
    .unwrap();
    assert!(
        first.interrupted && first.steps == 3,
        "stopped at {} (interrupted {})",
        first.steps,
        first.interrupted
    );
    // Rows a killed process logged after its last checkpoint, and a torn one: the resumed run
    // must drop them, not log those steps twice.
    {
        use std::io::Write;
        let mut m = std::fs::OpenOptions::new()
            .append(true)
            .open(b.join("metrics.jsonl"))
            .unwrap();
        write!(
            m,
            "{{\"step\":4,\"loss\":9.0}}\n{{\"step\":5,\"loss\":9.0}}\n{{\"step\":6,\"lo"
        )
        .unwrap();
    }
    let again = Arc::new(AtomicBool::new(false));
    let resumed = run(
        g.clone(),
        small_config(&b, 6),
        Some(&b),
        again.clone(),
        &mut StopAt {
            stop: again,
            stop_at: u64::MAX,
        },
    )
    .unwrap();
    assert_eq!(resumed.steps, 6);

    let (pa, pb) = (params_of(&a), params_of(&b));
    assert_eq!(pa.len(), pb.len());
    let differing = pa
        .iter()
        .zip(&pb)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    assert_eq!(
        differing,
        0,
        "{differing} of {} values differ between the straight and the resumed run",
        pa.len()
    );
    let steps_logged = |d: &Path| -> Vec<(u64, u32)> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["step"].as_u64().unwrap(),
                    (v["loss"].as_f64().unwrap() as f32).to_bits(),
                )
            })
            .collect()
    };
    assert_eq!(
        steps_logged(&b),
        steps_logged(&a),
        "metrics.jsonl of the resumed run differs from the straight run's (steps, loss bits)"
    );
    for d in [&a, &b] {
        assert!(
            d.join("model/config.json").exists()
                && d.join("model/diffusion_pytorch_model.safetensors").exists()
        );
        let leftovers: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
        assert!(d.join("metrics.jsonl").exists() && d.join("loss.png").exists());
    }
    let _ = std::fs::remove_dir_all(&a);
    (a, b)
}

/// EDM (`objective = "edm"`): its σ draws come from their own RNG purpose, so a resumed run is
/// bit-identical too; the export names EDMEulerScheduler and samples with EDM Euler.
#[test]
fn edm_run_resumes_identically_and_exports_an_edm_scheduler() {
    let (_, b) = resume_matches_straight_run("edm", |c| TrainConfig {
        objective: wgpu_diffusion::diffusion::Objective::Edm,
        ..c
    });
    let text = std::fs::read_to_string(b.join("model/scheduler_config.json")).unwrap();
    assert!(text.contains("EDMEulerScheduler"), "{text}");
    let source = wgpu_diffusion::sample::ModelSource::from_dir(&b.join("model")).unwrap();
    assert!(source.scheduler.edm().unwrap().is_some());
    let _ = std::fs::remove_dir_all(&b);
}

/// The VE-SDE (`objective = "ve-sde"`): the preset becomes a fourier U-Net, σ_max is measured
/// from the data and recorded, a resumed run is bit-identical, and the export names
/// ScoreSdeVeScheduler with that σ_max.
#[test]
fn ve_sde_run_measures_sigma_max_resumes_identically_and_exports() {
    let (_, b) = resume_matches_straight_run("ve", |c| TrainConfig {
        objective: wgpu_diffusion::diffusion::Objective::VeSde,
        ..c
    });
    let cfg: TrainConfig =
        toml::from_str(&std::fs::read_to_string(b.join("config.toml")).unwrap()).unwrap();
    // tiny16's 16×16 MNIST digits are at most ~8 apart in [0, 1].
    assert!(
        (4.0..12.0).contains(&cfg.ve_sigma_max),
        "σ_max {}",
        cfg.ve_sigma_max
    );
    let source = wgpu_diffusion::sample::ModelSource::from_dir(&b.join("model")).unwrap();
    let ve = source
        .scheduler
        .ve()
        .unwrap()
        .expect("a ScoreSdeVeScheduler");
    assert_eq!(ve.sigma_max, cfg.ve_sigma_max);
    assert!(source.config.is_fourier());
    let _ = std::fs::remove_dir_all(&b);
}

#[test]
fn training_lowers_the_loss_on_mnist() {
    let g = gpu();
    let dir = temp_dir("loss");
    let mut cfg = small_config(&dir, 60);
    cfg.batch_size = 8;
    cfg.lr_warmup_steps = 5;
    // A log window that does not divide the run: the tail's losses are read too.
    cfg.log_every = 7;
    // One DDIM grid, at the end.
    cfg.sample_every = 60;
    let s = run_to_end(g, cfg);
    let losses: Vec<f32> = s.losses.iter().map(|(_, l)| *l).collect();
    assert_eq!(losses.len(), 60);
    let first: f32 = losses[..10].iter().sum::<f32>() / 10.0;
    let last: f32 = losses[50..].iter().sum::<f32>() / 10.0;
    eprintln!("mean loss, first 10 steps {first:.4}, last 10 {last:.4}");
    assert!(
        last < 0.5 * first,
        "loss did not halve: first 10 steps {first}, last 10 {last}"
    );
    assert!(
        dir.join("samples").read_dir().unwrap().count() >= 1,
        "no sample grid written"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_checkpoints_and_model_dirs_are_clear_errors() {
    let g = gpu();
    let dir = temp_dir("bad");
    std::fs::create_dir_all(&dir).unwrap();
    // A truncated checkpoint.
    let unet = UNet::new(&g, &UNetConfig::preset("tiny16").unwrap(), 1).unwrap();
    let store: &ParamStore = &unet.params;
    let flat = store.flatten(|s| Ok(vec![0.5f32; s.numel()])).unwrap();
    let model = dir.join("model");
    let schedule = wgpu_diffusion::diffusion::NoiseSchedule::new(
        wgpu_diffusion::diffusion::BetaSchedule::Linear,
        1000,
        1e-4,
        0.02,
    )
    .unwrap();
    wgpu_diffusion::io::model_dir::save_model_dir(
        &model,
        &unet.config,
        store,
        &flat,
        &schedule.scheduler_config_json(wgpu_diffusion::diffusion::PredictionType::Epsilon, true),
        &[],
    )
    .unwrap();
    // Round trip.
    assert_eq!(read_model_config(&model).unwrap(), unet.config);
    assert!(
        read_model_weights(&model, store).unwrap() == flat,
        "model directory weights did not round-trip"
    );
    // Truncated file.
    let weights = model.join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let e = read_model_weights(&model, store).unwrap_err().to_string();
    assert!(e.contains("truncated or corrupt"), "{e}");
    // Weights of another config.
    std::fs::write(&weights, &bytes).unwrap();
    let other = UNet::new(&g, &UNetConfig::preset("mnist28").unwrap(), 1).unwrap();
    let e = format!(
        "{:#}",
        read_model_weights(&model, &other.params).unwrap_err()
    );
    assert!(
        e.contains("missing") || e.contains("does not have") || e.contains("shape"),
        "{e}"
    );
    // Resuming a folder killed before its first checkpoint starts from step 0.
    let never = Arc::new(AtomicBool::new(false));
    let s = run(
        g,
        small_config(&dir, 2),
        Some(&dir),
        never.clone(),
        &mut StopAt {
            stop: never,
            stop_at: u64::MAX,
        },
    )
    .unwrap();
    assert_eq!(s.steps, 2);
    assert_eq!(s.losses.iter().map(|l| l.0).collect::<Vec<_>>(), vec![1, 2]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Destroys the device at a step: what a lost GPU (driver reset, eGPU unplugged) looks like.
struct LoseDeviceAt {
    gpu: Arc<wgpu_diffusion::gpu::Gpu>,
    at: u64,
}

impl Progress for LoseDeviceAt {
    fn start(&mut self, _: u64, _: u64) {}
    fn update(&mut self, step: u64, _: Option<f32>, _: f64, _: f64) {
        if step == self.at {
            self.gpu.device.destroy();
        }
    }
    fn message(&mut self, _: &str) {}
    fn finish(&mut self) {}
}

/// A device lost mid-run ends the run with an error (not a panic) that names the last complete
/// checkpoint and the command to resume; that checkpoint stays loadable.
#[test]
fn a_lost_device_is_an_error_naming_the_checkpoint_to_resume() {
    // A device of its own: the shared one must outlive this test.
    let g = wgpu_diffusion::gpu::Gpu::new(&Default::default()).unwrap();
    let dir = temp_dir("lost");
    let cfg = TrainConfig {
        checkpoint_every: 2,
        ..small_config(&dir, 8)
    };
    let never = Arc::new(AtomicBool::new(false));
    let e = run(
        g.clone(),
        cfg,
        None,
        never,
        &mut LoseDeviceAt { gpu: g, at: 3 },
    )
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("lost"), "{e}");
    assert!(
        e.contains("step-00000002.safetensors") && e.contains("--resume"),
        "{e}"
    );
    let last = wgpu_diffusion::train::RunDir { root: dir.clone() }
        .list_checkpoints()
        .pop()
        .unwrap();
    LoadedTensors::read(&last).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sizes past the adapter's limits are refused with the tensor and the way out named, before
/// anything is dispatched and before the run folder exists.
#[test]
fn impossible_sizes_are_refused_before_any_dispatch() {
    let dir = temp_dir("impossible");
    let out = dir.to_str().unwrap();
    // (flags, what the message must name besides the way out): activations past the largest
    // buffer, and an activation past one storage binding (the portable path binds buffers).
    let cases: [(&[&str], &[&str]); 2] = [
        (
            &["--model", "cifar32", "--batch-size", "100000"],
            &["max_buffer_size"],
        ),
        (
            &[
                "--model",
                "tiny16",
                "--batch-size",
                "5000",
                "--gemm-path",
                "portable",
            ],
            &["max_storage_buffer_binding_size", "tensor `"],
        ),
    ];
    for (flags, names) in cases {
        let mut all = vec!["train"];
        all.extend(flags);
        all.extend(["--steps", "1", "--out", out]);
        let (ok, err) = run_cli(&all);
        assert!(!ok, "{all:?} succeeded");
        assert!(
            err.contains("does not fit this adapter") && err.contains("--batch-size"),
            "{all:?}: {err}"
        );
        for name in names {
            assert!(err.contains(name), "{all:?}: no `{name}` in\n{err}");
        }
        assert!(!dir.exists(), "{all:?} left a run folder behind");
    }
    // In-process: a build past the limits is refused, and the device stays usable after it.
    let g = gpu();
    let e = g
        .checked_build(|| -> Result<(), wgpu_diffusion::gpu::GpuError> {
            let _huge = g.tensor(&[1 << 40], "huge activation");
            Ok(())
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("huge activation") && e.contains("max_buffer_size"),
        "{e}"
    );
    g.check().unwrap();
}

#[test]
fn presets_have_pytorchs_parameter_counts() {
    let g = gpu();
    for (name, count) in [
        ("tiny16", 701_345),
        ("tiny28", 701_345),
        ("mnist28", 1_707_009),
        ("cifar32", 35_746_307),
    ] {
        let unet = UNet::new(&g, &UNetConfig::preset(name).unwrap(), 1).unwrap();
        assert_eq!(unet.params.count(), count, "{name}");
    }
}

#[test]
fn a_non_finite_loss_stops_the_run_with_a_clear_error() {
    let g = gpu();
    let dir = temp_dir("nan");
    let mut cfg = small_config(&dir, 20);
    cfg.lr = 1e30;
    cfg.lr_warmup_steps = 0;
    cfg.max_grad_norm = 0.0;
    let never = Arc::new(AtomicBool::new(false));
    let e = run(
        g,
        cfg,
        None,
        never.clone(),
        &mut StopAt {
            stop: never,
            stop_at: u64::MAX,
        },
    )
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("non-finite"), "{e}");
    assert!(e.contains("no checkpoint was written yet"), "{e}");
    assert!(
        wgpu_diffusion::train::RunDir { root: dir.clone() }
            .list_checkpoints()
            .is_empty(),
        "no checkpoint may be written after a non-finite loss"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A super-resolution run (×2 on tiny16: 8×8 → 16×16) trains, exports `_sr_scale`, samples from
/// low-resolution PNGs, and refuses what does not fit.
#[test]
fn super_resolution_run_samples_from_lowres_inputs() {
    let g = gpu();
    let dir = temp_dir("sr");
    let mut cfg = small_config(&dir, 3);
    cfg.task = wgpu_diffusion::train::config::Task::Sr;
    cfg.scale = 2;
    run_to_end(g, cfg);
    let model = dir.join("model");
    let config = read_model_config(&model).unwrap();
    assert_eq!(
        (config.sr_scale, config.in_channels, config.out_channels),
        (Some(2), 2, 1)
    );
    let lowres = dir.join("low");
    std::fs::create_dir_all(&lowres).unwrap();
    for i in 0..3u8 {
        image::GrayImage::from_fn(8, 8, |x, y| {
            image::Luma([(x as u8 * 30) ^ (y as u8 * 20 + i)])
        })
        .save(lowres.join(format!("{i}.png")))
        .unwrap();
    }
    let (m, l, o) = (
        model.to_str().unwrap().to_string(),
        lowres.to_str().unwrap().to_string(),
        dir.join("out").to_str().unwrap().to_string(),
    );
    let (ok, err) = run_cli(&[
        "sample", "--model", &m, "--lowres", &l, "--steps", "2", "--out", &o,
    ]);
    assert!(ok, "{err}");
    let img = image::open(dir.join("out/00002.png")).unwrap();
    assert_eq!((img.width(), img.height()), (16, 16));
    let big = dir.join("big.png");
    image::GrayImage::new(16, 16).save(&big).unwrap();
    let eps = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/samplers/eps");
    for (args, needle) in [
        (
            vec!["sample", "--model", &m, "--out", &o],
            "give the low-resolution input with --lowres",
        ),
        (
            vec![
                "sample",
                "--model",
                &m,
                "--lowres",
                big.to_str().unwrap(),
                "--out",
                &o,
            ],
            "needs 8x8 inputs",
        ),
        (
            vec![
                "sample",
                "--model",
                eps.to_str().unwrap(),
                "--lowres",
                &l,
                "--out",
                &o,
            ],
            "not a super-resolution model",
        ),
        (
            vec!["eval-sr", "--model", &m, "--limit", "2"],
            "MNIST test digits (28x28",
        ),
        (
            vec!["eval-sr", "--model", eps.to_str().unwrap()],
            "not a super-resolution model",
        ),
    ] {
        let (ok, err) = run_cli(&args);
        assert!(!ok && err.contains(needle), "{args:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A folder left by a run that stopped before its first checkpoint and logged loss is free: the
/// same command with the same --out starts over instead of being refused.
#[test]
fn an_abandoned_run_folder_is_reused() {
    let g = gpu();
    let dir = temp_dir("abandoned");
    std::fs::create_dir_all(dir.join("checkpoints")).unwrap();
    std::fs::create_dir_all(dir.join("samples")).unwrap();
    std::fs::write(dir.join("config.toml"), "steps = 1\n").unwrap();
    let s = run_to_end(g, small_config(&dir, 1));
    assert_eq!(s.steps, 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM (what `timeout`, systemd and cluster schedulers send) stops a run like Ctrl-C: a
/// checkpoint at the step reached, a clean exit, and the run resumes from it.
#[test]
fn sigterm_writes_a_checkpoint_and_exits() {
    let dir = temp_dir("sigterm");
    let out = dir.to_str().unwrap().to_string();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_wgpu-diffusion"))
        .args([
            "train",
            "--steps",
            "100000",
            "--batch-size",
            "2",
            "--sample-every",
            "0",
            "--log-every",
            "1",
            "--checkpoint-every",
            "100000",
            "--out",
            &out,
        ])
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it trains (a logged loss), then send SIGTERM.
    let t0 = std::time::Instant::now();
    while std::fs::metadata(dir.join("metrics.jsonl")).map_or(true, |m| m.len() == 0) {
        assert!(
            t0.elapsed().as_secs() < 120,
            "the run did not start training"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let result = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        result.status.success(),
        "exit {:?}:\n{stderr}",
        result.status
    );
    assert!(stderr.contains("stopped at step"), "{stderr}");
    let last = wgpu_diffusion::train::RunDir { root: dir.clone() }
        .list_checkpoints()
        .pop()
        .expect("a checkpoint written on SIGTERM");
    let step: u64 = LoadedTensors::read(&last).unwrap().metadata()["step"]
        .parse()
        .unwrap();
    assert!(step >= 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `train --text-conditional`: MNIST captioned by templates (dropped with caption_drop), a CLIP
/// text encoder trained from scratch in the U-Net's store. Its template and dropout draws are
/// keyed by (seed, step, sample), so a resumed run is bit-identical, text encoder and optimizer
/// moments included; the export is a pipeline directory `sample --prompt` reads, and the run's
/// checkpoint samples as the export does.
#[test]
fn text_conditional_run_resumes_identically_and_exports_a_pipeline() {
    let (_, b) = resume_matches_straight_run("text", |c| TrainConfig {
        model: "mnist28-text".into(),
        text_conditional: true,
        caption_drop: 0.3,
        ..c
    });
    let last = wgpu_diffusion::train::RunDir { root: b.clone() }
        .list_checkpoints()
        .pop()
        .unwrap();
    let ck = LoadedTensors::read(&last).unwrap();
    for name in [
        "param.text_encoder.embeddings.token_embedding.weight",
        "exp_avg.text_encoder.final_layer_norm.weight",
    ] {
        assert!(ck.get(name).is_ok(), "the checkpoint lacks {name}");
    }
    let model = b.join("model");
    for file in [
        "unet/config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
    ] {
        assert!(model.join(file).is_file(), "the export lacks {file}");
    }
    let index = std::fs::read_to_string(model.join("model_index.json")).unwrap();
    assert!(
        index.contains("WgpuDiffusionTextPipeline") && index.contains("UNet2DConditionModel"),
        "{index}"
    );
    // transformers' names, without the joint store's prefix.
    let text = LoadedTensors::read(&model.join("text_encoder/model.safetensors")).unwrap();
    assert!(
        text.get("text_model.embeddings.token_embedding.weight")
            .is_ok()
    );
    // The export and the last checkpoint (its EMA weights, the text encoder's from the joint
    // store, the tokenizer from the run folder) sample the same images.
    let sample_from = |source: [&str; 2], name: &str| {
        let out = b.join(name);
        let tensor = out.join("raw.safetensors");
        let (ok, log) = run_cli(&[
            "sample",
            source[0],
            source[1],
            "--prompt",
            "a handwritten three",
            "--guidance-scale",
            "2",
            "--num",
            "2",
            "--steps",
            "2",
            "--out",
            out.to_str().unwrap(),
            "--save-tensor",
            tensor.to_str().unwrap(),
        ]);
        assert!(ok, "{log}");
        // Without --sampler, the exported DDPMScheduler: ancestral, as StableDiffusionPipeline.
        assert!(log.contains("sampler: DDPMScheduler"), "{log}");
        assert!(out.join("grid.png").is_file());
        LoadedTensors::read(&tensor)
            .unwrap()
            .get("sample")
            .unwrap()
            .1
    };
    let exported = sample_from(["--model", model.to_str().unwrap()], "samples-cli");
    let from_checkpoint = sample_from(["--checkpoint", last.to_str().unwrap()], "samples-ck");
    assert_eq!(
        exported, from_checkpoint,
        "checkpoint and export sample differently"
    );
    let _ = std::fs::remove_dir_all(&b);
}

/// A UNet2DConditionModel preset without --text-conditional, and text flags on other runs,
/// are refused by name before anything is written.
#[test]
fn text_options_are_checked() {
    let (ok, log) = run_cli(&["train", "--caption-drop", "0.2", "--steps", "1"]);
    assert!(!ok && log.contains("--text-conditional"), "{log}");
    let (ok, log) = run_cli(&[
        "train",
        "--text-conditional",
        "--class-conditional",
        "--steps",
        "1",
    ]);
    assert!(!ok && log.contains("exclude each other"), "{log}");
    let out = temp_dir("text-preset");
    let (ok, log) = run_cli(&[
        "train",
        "--model",
        "mnist28-text",
        "--steps",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && log.contains("--text-conditional"), "{log}");
    assert!(!out.exists(), "a refused run wrote {}", out.display());
}

/// `--data DIR` with a metadata.jsonl (diffusers' image-folder convention): each image's `text`
/// is its caption, the tokenizer is learned from them; an image without a row is an error that
/// names it, before anything is written.
#[test]
fn captioned_folder_trains_and_a_missing_caption_is_named() {
    let data = temp_dir("captioned");
    std::fs::create_dir_all(data.join("shapes")).unwrap();
    let files = ["bright.png", "shapes/stripes.png", "shapes/dark.png"];
    for (i, f) in files.iter().enumerate() {
        image::GrayImage::from_fn(20, 20, |x, y| {
            image::Luma([((x * (i as u32 + 1) + y) * 9) as u8])
        })
        .save(data.join(f))
        .unwrap();
    }
    let rows = [
        ("bright.png", "a bright square"),
        ("./shapes/stripes.png", "diagonal stripes"),
        ("shapes/dark.png", "a dark square"),
    ];
    let jsonl: String = rows
        .iter()
        .map(|(f, t)| format!("{{\"file_name\": \"{f}\", \"text\": \"{t}\"}}\n"))
        .collect();
    std::fs::write(data.join("metadata.jsonl"), &jsonl).unwrap();
    let out = temp_dir("captioned-run");
    let args = |out: &Path| {
        vec![
            "train".to_string(),
            "--text-conditional".into(),
            "--data".into(),
            data.to_str().unwrap().into(),
            "--steps".into(),
            "2".into(),
            "--batch-size".into(),
            "2".into(),
            "--sample-every".into(),
            "0".into(),
            "--out".into(),
            out.to_str().unwrap().into(),
        ]
    };
    let argv = args(&out);
    let (ok, log) = run_cli(&argv.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{log}");
    let vocab = std::fs::read_to_string(out.join("model/tokenizer/vocab.json")).unwrap();
    assert!(
        vocab.contains("square</w>"),
        "the learned vocabulary lacks the captions' words"
    );
    // An image with no row.
    std::fs::write(
        data.join("metadata.jsonl"),
        jsonl.lines().take(2).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let refused = temp_dir("captioned-refused");
    let argv = args(&refused);
    let (ok, log) = run_cli(&argv.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && log.contains("shapes/dark.png"), "{log}");
    assert!(
        !refused.exists(),
        "a refused run wrote {}",
        refused.display()
    );
    for d in [&data, &out] {
        let _ = std::fs::remove_dir_all(d);
    }
}
