//! Data-parallel training under `mpirun` (the `mpi` feature): CI's MPI step runs
//! `cargo test --release --features mpi --test mpi` (`.ci/mpi`). Every job runs the real binary
//! on lavapipe, 2 ranks oversubscribed on one machine, one llvmpipe thread each; the one-process
//! runs it is compared with get the same thread count, because the conv backward's split-K
//! count (and so its summation order) follows the adapter's worker count.
//!
//! What is proven, on the checkpoints the runs write (parameters, EMA, both AdamW moments):
//! * 2 ranks × 1 micro-batch = 1 process × `--grad-accum 2`, bit for bit, over 4 steps with
//!   dropout on: the same micro-batches, noise, timesteps and dropout masks, and the rank-order
//!   all-reduce adds g₀ + g₁ exactly as gradient accumulation does.
//! * 2 ranks × batch b ≈ 1 process × batch 2b: the gradients of the first step (read from the
//!   AdamW first moment, m₁ = (1 − β₁)·g) agree to 1e-5 of the largest |g| (the batch
//!   sums are ordered differently).
//! * A job stopped at a checkpoint and resumed under mpirun ends bit-identical to one that ran
//!   through (and the ranks' parameter fingerprints, compared at every checkpoint, agreed).
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::Command;

use wgpu_diffusion::io::tensors::LoadedTensors;
use wgpu_diffusion::nn::UNetConfig;
use wgpu_diffusion::train::RunDir;

const BIN: &str = env!("CARGO_BIN_EXE_wgpu-diffusion");

fn scratch(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("wgpu-diffusion-mpi-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `wgpu-diffusion ARGS` as `ranks` MPI ranks (or alone when `ranks` is 0) and fails the
/// test with both output streams when it does not succeed.
fn run(ranks: usize, args: &[&str]) -> String {
    let mut cmd = if ranks == 0 {
        let mut c = Command::new(BIN);
        c.env("LP_NUM_THREADS", "1");
        c
    } else {
        let mut c = Command::new("mpirun");
        c.args([
            "--allow-run-as-root",
            "--oversubscribe",
            "--bind-to",
            "none",
        ])
        .args(["-np", &ranks.to_string()])
        .args(["-x", "LP_NUM_THREADS=1", "-x", "XDG_RUNTIME_DIR"])
        .arg(BIN);
        c
    };
    let out = cmd
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::var("XDG_RUNTIME_DIR").unwrap_or("/tmp".into()))
        .output()
        .unwrap_or_else(|e| {
            panic!("could not start {} (Open MPI's mpirun is needed: apt-get install openmpi-bin): {e}", if ranks == 0 { BIN } else { "mpirun" })
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{ranks} rank(s) {args:?} failed:\n{text}"
    );
    text
}

/// The training options every job here shares: tiny16 at `batch`, `steps` steps, a checkpoint
/// every 2 steps, no sample grids.
fn train_args<'a>(out: &'a str, config: &'a str, batch: &'a str, steps: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model-config",
        config,
        "--batch-size",
        batch,
        "--steps",
        steps,
        "--lr",
        "1e-3",
        "--checkpoint-every",
        "2",
        "--log-every",
        "2",
        "--sample-every",
        "0",
        "--out",
        out,
    ]
}

/// tiny16 with the given dropout, as a model config file.
fn model_config(dir: &Path, dropout: f64) -> String {
    let mut c = UNetConfig::preset("tiny16").unwrap();
    c.dropout = dropout;
    let path = dir.join(format!("tiny16-dropout{dropout}.json"));
    std::fs::write(&path, c.to_json()).unwrap();
    path.to_string_lossy().into_owned()
}

fn checkpoint(dir: &Path, step: u64) -> LoadedTensors {
    let run = RunDir {
        root: dir.to_path_buf(),
    };
    let path = run
        .checkpoints()
        .join(format!("step-{step:08}.safetensors"));
    LoadedTensors::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every tensor of two checkpoints, bit for bit; the first differing values on failure.
fn assert_bit_identical(what: &str, a: &LoadedTensors, b: &LoadedTensors) {
    let names = a.names();
    assert_eq!(names, b.names(), "{what}: different tensors");
    for name in &names {
        let (x, y) = (a.get(name).unwrap().1, b.get(name).unwrap().1);
        let differ: Vec<usize> = (0..x.len())
            .filter(|&i| x[i].to_bits() != y[i].to_bits())
            .collect();
        assert!(
            differ.is_empty(),
            "{what}: {name}: {} of {} values differ, first at {}: {} vs {}",
            differ.len(),
            x.len(),
            differ[0],
            x[differ[0]],
            y[differ[0]]
        );
    }
    for key in ["step", "data_position"] {
        assert_eq!(
            a.metadata().get(key),
            b.metadata().get(key),
            "{what}: {key}"
        );
    }
}

#[test]
fn two_ranks_equal_one_process_accumulating_their_two_micro_batches_bit_for_bit() {
    let dir = scratch("accum");
    let config = model_config(&dir, 0.1);
    let (ranks, accum) = (dir.join("ranks"), dir.join("accum"));
    // 0.1 MB buckets: tiny16's 2.8 MB of gradients in 27 buckets, most read back and reduced
    // while the backward pass still runs (the overlapped path; the other tests use one bucket).
    let mut job = train_args(ranks.to_str().unwrap(), &config, "4", "4");
    job.extend(["--bucket-mb", "0.1"]);
    let log = run(2, &job);
    assert!(
        log.contains("rank 0 of 2") && log.contains("rank 1 of 2"),
        "{log}"
    );
    let shape = log
        .split("gradients all-reduced in ")
        .nth(1)
        .unwrap_or_else(|| panic!("no all-reduce line in:\n{log}"));
    let count = |s: &str| -> usize { s.split(' ').next().unwrap().parse().unwrap() };
    let buckets = count(shape);
    let segments = count(shape.split("submitted in ").nth(1).unwrap());
    assert!(
        buckets >= 20 && segments >= 10,
        "{buckets} buckets, {segments} segments:\n{log}"
    );
    let mut single = train_args(accum.to_str().unwrap(), &config, "4", "4");
    single.extend(["--grad-accum", "2"]);
    run(0, &single);
    for step in [2, 4] {
        assert_bit_identical(
            &format!("step {step}: 2 ranks vs --grad-accum 2"),
            &checkpoint(&ranks, step),
            &checkpoint(&accum, step),
        );
    }
    // The job's metrics: the loss averaged over both ranks, and the communication time.
    let metrics = std::fs::read_to_string(ranks.join("metrics.jsonl")).unwrap();
    let accum_metrics = std::fs::read_to_string(accum.join("metrics.jsonl")).unwrap();
    let loss = |text: &str| -> Vec<f64> {
        text.lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(loss(&metrics), loss(&accum_metrics), "logged losses");
    assert!(metrics.contains("\"ranks\":2") && metrics.contains("comm_s_per_step"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_ranks_of_batch_b_match_one_process_of_batch_2b() {
    let dir = scratch("batch");
    let config = model_config(&dir, 0.0);
    // After AdamW's first step m = (1 − β₁)·g (clipping scales both alike): the first step's
    // checkpoint holds the gradients.
    let (ranks1, wide1) = (dir.join("ranks"), dir.join("wide"));
    run(2, &train_args(ranks1.to_str().unwrap(), &config, "4", "1"));
    run(0, &train_args(wide1.to_str().unwrap(), &config, "8", "1"));
    let (a, b) = (checkpoint(&ranks1, 1), checkpoint(&wide1, 1));
    // 1e-5 of the largest |g| of the whole model (a gradient that is zero in exact arithmetic,
    // like an attention key bias's, holds only rounding noise and no scale of its own).
    let moments: Vec<(String, Vec<f32>, Vec<f32>)> = a
        .names()
        .into_iter()
        .filter(|n| n.starts_with("exp_avg."))
        .map(|n| (n.clone(), a.get(&n).unwrap().1, b.get(&n).unwrap().1))
        .collect();
    let max_g = moments
        .iter()
        .flat_map(|(_, _, y)| y.iter())
        .fold(0f32, |m, v| m.max(v.abs()));
    let mut checked = 0;
    for (name, x, y) in &moments {
        let worst = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(
            worst <= 1e-5 * max_g,
            "{name}: max |Δm| {worst:e} > 1e-5 · max |m| ({max_g:e}); first values {:?} vs {:?}",
            &x[..x.len().min(4)],
            &y[..y.len().min(4)]
        );
        checked += 1;
    }
    assert!(checked > 50, "only {checked} moment tensors found");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_job_resumed_under_mpirun_ends_bit_identical() {
    let dir = scratch("resume");
    let config = model_config(&dir, 0.1);
    let (through, stopped) = (dir.join("through"), dir.join("stopped"));
    run(2, &train_args(through.to_str().unwrap(), &config, "4", "4"));
    run(2, &train_args(stopped.to_str().unwrap(), &config, "4", "2"));
    let log = run(
        2,
        &[
            "train",
            "--resume",
            stopped.to_str().unwrap(),
            "--steps",
            "4",
        ],
    );
    assert!(log.contains("resumed from"), "{log}");
    assert_bit_identical(
        "resumed vs straight through",
        &checkpoint(&through, 4),
        &checkpoint(&stopped, 4),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Ranks started with different options (MPMD: `mpirun -np 1 A : -np 1 B`) are refused before
/// the first step, and the error on the ranks ends the job instead of leaving it waiting.
#[test]
fn ranks_with_other_options_are_refused_and_the_job_ends() {
    let dir = scratch("mismatch");
    let config = model_config(&dir, 0.0);
    let out = dir.join("run");
    let args = |bucket: &'static str| {
        let mut a = train_args(out.to_str().unwrap(), &config, "4", "2");
        a.extend(["--bucket-mb", bucket]);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let mut cmd = Command::new("timeout");
    cmd.args([
        "300",
        "mpirun",
        "--allow-run-as-root",
        "--oversubscribe",
        "--bind-to",
        "none",
    ])
    .args([
        "-x",
        "LP_NUM_THREADS=1",
        "-x",
        "XDG_RUNTIME_DIR",
        "-np",
        "1",
        BIN,
    ])
    .args(args("1"))
    .args([":", "-np", "1", BIN])
    .args(args("2"))
    .env(
        "XDG_RUNTIME_DIR",
        std::env::var("XDG_RUNTIME_DIR").unwrap_or("/tmp".into()),
    );
    let result = cmd.output().expect("start timeout/mpirun");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    assert_ne!(result.status.code(), Some(124), "the job hung:\n{text}");
    assert!(!result.status.success(), "should fail:\n{text}");
    assert!(
        text.contains("other training options than rank 0"),
        "expected the options error in:\n{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
