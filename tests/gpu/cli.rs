//! The command line's promises (issue 20): every input — flags, files, output paths — is checked
//! before the GPU starts and before anything is created; no flag is silently ignored; outputs are
//! finite and never mixed with an earlier run's. Most cases fail before the GPU (no `device:`
//! line), so they run in milliseconds.

use std::path::{Path, PathBuf};

use crate::common::run_cli;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/samplers")
        .join(name)
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wgpu-diffusion-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs the tool, expects a failure whose message holds every needle; returns stderr.
fn fails(args: &[&str], needles: &[&str]) -> String {
    let (ok, err) = run_cli(args);
    assert!(!ok, "{args:?} should fail:\n{err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: expected `{n}` in:\n{err}");
    }
    err
}

/// As [`fails`], and the failure came before the GPU was opened.
fn fails_before_gpu(args: &[&str], needles: &[&str]) -> String {
    let err = fails(args, needles);
    assert!(
        !err.contains("device:") && !err.contains("adapter:"),
        "{args:?} opened the GPU before failing:\n{err}"
    );
    err
}

/// Writes a safetensors file holding one f32 tensor.
fn write_tensor(path: &Path, name: &str, shape: &[usize], values: &[f32]) {
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        shape.to_vec(),
        bytemuck::cast_slice(values),
    )
    .unwrap();
    std::fs::write(path, safetensors::serialize([(name, view)], None).unwrap()).unwrap();
}

/// A copy of the ε fixture model in `dir`.
fn copy_model(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for e in std::fs::read_dir(fixture("eps")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    dir.to_path_buf()
}

/// Finding 1: η > 1 is refused by name; a batch that comes out non-finite is an error, and no
/// (black) image is written.
#[test]
fn eta_past_one_and_non_finite_samples_are_errors() {
    let dir = scratch("finite");
    let eps = fixture("eps");
    let out = dir.join("out");
    for eta in ["--eta=1.01", "--eta=-0.5", "--eta=NaN"] {
        fails_before_gpu(
            &["sample", "--model", s(&eps), eta, "--out", s(&out)],
            &["--eta must be in [0, 1]"],
        );
    }
    // Noise near f32's largest value overflows at Euler's first scaling (σ_max ≈ 157).
    let noise = dir.join("huge.safetensors");
    write_tensor(&noise, "noise", &[1, 1, 8, 8], &[3e38; 64]);
    fails(
        &[
            "sample",
            "--model",
            s(&eps),
            "--sampler",
            "euler",
            "--steps",
            "2",
            "--noise",
            s(&noise),
            "--out",
            s(&out),
        ],
        &[
            "non-finite",
            "--sampler euler --steps 2",
            "nothing was written",
        ],
    );
    assert!(!out.join("grid.png").exists(), "a grid of NaN was written");
}

/// Finding 2: a reused --out holds this run's images only; a user's own files stay.
#[test]
fn a_reused_output_folder_keeps_no_stale_images() {
    let dir = scratch("stale");
    let eps = fixture("eps");
    let out = dir.join("out");
    let run = |num: &str| {
        let (ok, err) = run_cli(&[
            "sample",
            "--model",
            s(&eps),
            "--steps",
            "2",
            "--num",
            num,
            "--out",
            s(&out),
        ]);
        assert!(ok, "{err}");
        err
    };
    run("8");
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    std::fs::write(out.join("12.png"), "mine too").unwrap();
    std::fs::create_dir_all(out.join("00009.png")).unwrap();
    let err = run("2");
    assert!(
        err.contains("removed 6 image(s) of an earlier run"),
        "{err}"
    );
    let mut left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "00000.png",
            "00001.png",
            "00009.png",
            "12.png",
            "grid.png",
            "notes.txt"
        ]
    );
}

/// Finding 3: output paths are checked before the GPU starts, and nothing is left behind.
#[test]
fn output_paths_are_checked_before_the_gpu() {
    let dir = scratch("paths");
    let eps = fixture("eps");
    let out = dir.join("out");
    // --save-tensor naming a folder: refused up front, no `.DIR.tmp` left.
    let folder = dir.join("tensors");
    std::fs::create_dir_all(&folder).unwrap();
    fails_before_gpu(
        &[
            "sample",
            "--model",
            s(&eps),
            "--out",
            s(&out),
            "--save-tensor",
            s(&folder),
        ],
        &["--save-tensor", "is a folder: give a file path"],
    );
    assert!(!dir.join(".tensors.tmp").exists() && !out.exists());
    // --out under a file, or a file itself.
    let file = dir.join("file");
    std::fs::write(&file, "x").unwrap();
    fails_before_gpu(
        &["sample", "--model", s(&eps), "--out", s(&file.join("sub"))],
        &["is a file, so no folder can be made there"],
    );
    fails_before_gpu(
        &["sample", "--model", s(&eps), "--out", s(&file)],
        &["is a file, not a folder"],
    );
    // A folder that takes no files (read-only; /proc where the tests run as root).
    let read_only = dir.join("read-only");
    std::fs::create_dir_all(&read_only).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&read_only, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    let unwritable = if std::fs::write(read_only.join("probe"), "").is_err() {
        read_only.clone()
    } else {
        PathBuf::from("/proc")
    };
    fails_before_gpu(
        &["sample", "--model", s(&eps), "--out", s(&unwritable)],
        &["is not writable", "choose another --out"],
    );
    // eval-sr --picture naming a folder.
    fails_before_gpu(
        &["eval-sr", "--model", s(&eps), "--picture", s(&folder)],
        &["--picture", "is a folder"],
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&read_only, std::fs::Permissions::from_mode(0o755));
    }
}

/// Finding 4: an error found after the checks (the weights, the adapter, the sizes) leaves no
/// output folder; sampling's advice names sampling flags; a missing adapter lists those there
/// are.
#[test]
fn late_errors_leave_no_output_folder() {
    let dir = scratch("late");
    let eps = fixture("eps");
    let out = dir.join("out");
    let truncated = copy_model(&dir.join("truncated"));
    let weights = truncated.join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--model", s(&truncated)],
            vec!["not a valid safetensors file"],
        ),
        (
            vec!["--model", s(&eps), "--guidance-scale", "nan"],
            vec!["--guidance-scale must be a finite number"],
        ),
        (
            vec!["--model", s(&eps), "--adapter", "no-such-gpu"],
            vec!["`no-such-gpu`", "the adapters there are"],
        ),
        (
            vec![
                "--model",
                s(&eps),
                "--num",
                "100000",
                "--batch-size",
                "100000",
            ],
            vec!["does not fit this adapter", "--batch-size"],
        ),
    ];
    for (args, needles) in cases {
        let all = [&["sample", "--steps", "2", "--out", s(&out)], &args[..]].concat();
        let err = fails(&all, &needles);
        assert!(!err.contains("--grad-accum"), "training advice:\n{err}");
        assert!(!err.contains("Install a GPU driver"), "{err}");
        assert!(!out.exists(), "{all:?} left the output folder behind");
    }
}

/// Finding 5 (sample): flags that would be ignored are errors; bad noise is refused; inpainting
/// with --noise fails before the GPU.
#[test]
fn flags_that_would_be_ignored_are_errors() {
    let dir = scratch("ignored");
    let eps = fixture("eps");
    let (e, out) = (s(&eps), dir.join("out"));
    let o = s(&out);
    let results = fixture("eps").join("results.safetensors"); // noise [2, 1, 8, 8], step_noise [10, …]
    let r = s(&results);
    fails_before_gpu(
        &[
            "sample",
            "--model",
            e,
            "--noise",
            r,
            "--sampler",
            "ddim",
            "--num",
            "8",
            "--out",
            o,
        ],
        &["--num 8, but --noise", "holds 2 images"],
    );
    for sampler in [["--sampler", "ddim"], ["--sampler", "euler"]] {
        fails_before_gpu(
            &[
                &[
                    "sample",
                    "--model",
                    e,
                    "--noise",
                    r,
                    "--step-noise",
                    r,
                    "--steps",
                    "10",
                ][..],
                &sampler,
                &["--out", o],
            ]
            .concat(),
            &["--step-noise", "adds no noise between steps"],
        );
    }
    fails_before_gpu(
        &["sample", "--model", e, "--jump-length", "3", "--out", o],
        &["--inpaint"],
    );
    let nan = dir.join("nan.safetensors");
    let mut values = vec![0.5f32; 64];
    values[17] = f32::NAN;
    write_tensor(&nan, "noise", &[1, 1, 8, 8], &values);
    fails_before_gpu(
        &["sample", "--model", e, "--noise", s(&nan), "--out", o],
        &["non-finite"],
    );
    // Inpainting with --noise: refused before any GPU work.
    let (image, mask) = (dir.join("image.png"), dir.join("mask.png"));
    image::GrayImage::new(8, 8).save(&image).unwrap();
    image::GrayImage::from_pixel(8, 8, image::Luma([255]))
        .save(&mask)
        .unwrap();
    fails_before_gpu(
        &[
            "sample",
            "--model",
            e,
            "--inpaint",
            s(&image),
            "--mask",
            s(&mask),
            "--noise",
            r,
            "--out",
            o,
        ],
        &["inpainting draws fresh noise", "drop --noise"],
    );
    // --task generate on a super-resolution model.
    let sr = copy_model(&dir.join("sr"));
    let config = std::fs::read_to_string(sr.join("config.json"))
        .unwrap()
        .replace(
            "\"in_channels\": 1,",
            "\"in_channels\": 2, \"_sr_scale\": 2,",
        );
    std::fs::write(sr.join("config.json"), config).unwrap();
    fails_before_gpu(
        &[
            "sample",
            "--model",
            s(&sr),
            "--task",
            "generate",
            "--out",
            o,
        ],
        &["--task generate", "super-resolution model"],
    );
    assert!(!out.exists());
}

/// Findings 6–8 for sampling: `--sample-steps` (with `--steps` as its alias), eval-sr's
/// --checkpoint, described flags, a short schedule error, and an ETA in the progress lines.
#[test]
fn sampling_flags_spellings_help_and_progress() {
    let dir = scratch("spellings");
    let eps = fixture("eps");
    let out = dir.join("out");
    let (ok, err) = run_cli(&[
        "sample",
        "--model",
        s(&eps),
        "--sample-steps",
        "3",
        "--num",
        "1",
        "--out",
        s(&out),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("3 steps"), "{err}");
    assert!(
        err.contains(", ETA "),
        "no ETA in the progress lines:\n{err}"
    );
    fails_before_gpu(
        &["eval-sr", "--checkpoint", s(&dir.join("none.safetensors"))],
        &["none.safetensors"],
    );
    fails_before_gpu(
        &["eval-sr", "--model", s(&eps), "--steps", "0"],
        &["super-resolution"],
    );
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_wgpu-diffusion"))
        .args(["eval-sr", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for text in [
        "Denoising steps per digit",
        "Seed of the GPU noise",
        "Digits per U-Net batch",
        "--checkpoint <CHECKPOINT>",
    ] {
        assert!(
            help.contains(text),
            "eval-sr --help lacks `{text}`:\n{help}"
        );
    }
    let err = fails(
        &[
            "sample",
            "--model",
            s(&eps),
            "--sampler",
            "dpmpp-2m",
            "--steps",
            "1000",
            "--out",
            s(&out),
        ],
        &["give 1000 timesteps that are not distinct"],
    );
    assert!(err.len() < 1000, "a long error:\n{err}");
}

/// A run folder as `train` leaves it, without tensors worth training: config.toml and one
/// checkpoint whose header records `step` (resuming reads the header only).
fn fake_run(dir: &Path, steps: u64, step: u64) {
    std::fs::create_dir_all(dir.join("checkpoints")).unwrap();
    if step == steps {
        std::fs::write(dir.join("finished.json"), format!("{{\"step\": {step}}}")).unwrap();
    }
    std::fs::write(
        dir.join("config.toml"),
        format!("steps = {steps}\nbatch_size = 2\nsample_every = 0\n"),
    )
    .unwrap();
    let meta = std::collections::HashMap::from([("step".to_string(), step.to_string())]);
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        vec![1],
        bytemuck::cast_slice(&[0f32]),
    )
    .unwrap();
    std::fs::write(
        dir.join(format!("checkpoints/step-{step:08}.safetensors")),
        safetensors::serialize([("param.x", view)], Some(meta)).unwrap(),
    )
    .unwrap();
}

/// The bytes of every file under `dir`, by path.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(snapshot(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

/// Findings 5–6 (train): a finished run is said to be finished and left as it is; changed
/// options of a resumed run are noted (and those fixing the model refused); --cond-drop without
/// --class-conditional and a directory given to --model are errors; diffusers' spellings are
/// accepted. `--adapter no-such-gpu` stops each accepted command at the GPU, after its checks.
#[test]
fn train_flags_and_resuming() {
    let dir = scratch("train");
    let run = dir.join("run");
    fake_run(&run, 3, 3);
    let before = snapshot(&run);
    let r = s(&run);
    let (ok, err) = run_cli(&["train", "--resume", r]);
    assert!(ok, "{err}");
    assert!(
        err.contains("is finished (step 3 of 3)") && !err.contains("adapter:"),
        "{err}"
    );
    assert!(
        snapshot(&run) == before,
        "resuming a finished run changed its folder"
    );
    let no_gpu = ["--adapter", "no-such-gpu"];
    // At its last step but killed before its end was written: on to the GPU, to write it.
    let killed = dir.join("killed");
    fake_run(&killed, 3, 3);
    std::fs::remove_file(killed.join("finished.json")).unwrap();
    let err = fails(
        &[&["train", "--resume", s(&killed)][..], &no_gpu].concat(),
        &["the adapters there are"],
    );
    assert!(err.contains("stopped before writing its end"), "{err}");
    // More steps: past the check, on to the GPU; a changed option is noted.
    let err = fails(
        &[
            &["train", "--resume", r, "--steps", "5", "--lr", "0.5"][..],
            &no_gpu,
        ]
        .concat(),
        &["the adapters there are"],
    );
    assert!(
        err.contains("resuming with lr = 0.5 (the run had 0.001)")
            && err.contains("resuming with steps = 5"),
        "{err}"
    );
    assert!(!err.contains("is finished"), "{err}");
    assert!(snapshot(&run) == before);
    fails_before_gpu(
        &["train", "--resume", r, "--steps", "5", "--model", "mnist28"],
        &["`model` is fixed for a run"],
    );
    fails_before_gpu(
        &[
            "train",
            "--resume",
            r,
            "--steps",
            "5",
            "--out",
            s(&dir.join("other")),
        ],
        &["drop --out"],
    );
    let out = dir.join("new");
    let o = s(&out);
    fails_before_gpu(
        &["train", "--cond-drop", "0.2", "--out", o],
        &["--cond-drop applies to class-conditional runs"],
    );
    fails_before_gpu(
        &["train", "--model", r, "--out", o],
        &["not a model preset", "--init DIR", "--resume DIR"],
    );
    for schedule in ["scaled_linear", "scaled-linear", "squaredcos_cap_v2"] {
        fails(
            &[
                &["train", "--beta-schedule", schedule, "--out", o][..],
                &no_gpu,
            ]
            .concat(),
            &["the adapters there are"],
        );
    }
    fails(
        &[
            &[
                "train",
                "--prediction-type",
                "v_prediction",
                "--ema",
                "--hflip",
                "--out",
                o,
            ][..],
            &no_gpu,
        ]
        .concat(),
        &["the adapters there are"],
    );
    assert!(!out.exists());
}

/// `vae`: reconstruct a folder of images with the VAE diffusers saved (PSNR printed, originals
/// beside reconstructions), encode to latents and decode them back — decode(encode(x)) is the
/// reconstruction, byte for byte — and bad inputs fail before the GPU, naming what is wrong.
#[test]
fn vae_reconstructs_encodes_and_decodes() {
    let dir = scratch("vae");
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vae/model");
    let m = s(&model);
    let images = dir.join("in");
    std::fs::create_dir_all(&images).unwrap();
    for (i, v) in [40u8, 200].iter().enumerate() {
        let img = image::GrayImage::from_fn(20, 24, |x, y| {
            image::Luma([v.wrapping_add((x * 7 + y * 3) as u8)])
        });
        img.save(images.join(format!("{i}.png"))).unwrap();
    }
    let (rec, lat, dec) = (dir.join("rec"), dir.join("z.safetensors"), dir.join("dec"));
    let (ok, err) = run_cli(&[
        "vae",
        "--model",
        m,
        "reconstruct",
        "--input",
        s(&images),
        "--out",
        s(&rec),
    ]);
    assert!(ok && err.contains("PSNR"), "{err}");
    for f in ["grid.png", "00000.png", "00001.png"] {
        assert!(rec.join(f).is_file(), "{f} missing");
    }
    let (ok, err) = run_cli(&[
        "vae",
        "--model",
        m,
        "--batch-size",
        "1",
        "encode",
        "--input",
        s(&images),
        "--out",
        s(&lat),
    ]);
    assert!(ok, "{err}");
    let z = wgpu_diffusion::io::tensors::LoadedTensors::read(&lat).unwrap();
    assert_eq!(z.get("latent").unwrap().0, vec![2, 4, 8, 8]);
    let (ok, err) = run_cli(&[
        "vae",
        "--model",
        m,
        "decode",
        "--input",
        s(&lat),
        "--out",
        s(&dec),
    ]);
    assert!(ok, "{err}");
    for f in ["00000.png", "00001.png"] {
        assert_eq!(
            std::fs::read(dec.join(f)).unwrap(),
            std::fs::read(rec.join(f)).unwrap(),
            "decode(encode({f})) differs from its reconstruction"
        );
    }
    // A latent of the wrong shape, an image given as latents, a folder without images, a
    // directory that is no VAE, an unsupported block type.
    write_tensor(
        &dir.join("bad.safetensors"),
        "latent",
        &[1, 3, 8, 8],
        &[0.0; 192],
    );
    fails_before_gpu(
        &[
            "vae",
            "--model",
            m,
            "decode",
            "--input",
            s(&dir.join("bad.safetensors")),
            "--out",
            s(&dec),
        ],
        &["[1, 3, 8, 8]", "[N, 4, 8, 8]"],
    );
    fails_before_gpu(
        &[
            "vae",
            "--model",
            m,
            "decode",
            "--input",
            s(&images.join("0.png")),
            "--out",
            s(&dec),
        ],
        &["not a valid safetensors file"],
    );
    fails_before_gpu(
        &[
            "vae",
            "--model",
            m,
            "reconstruct",
            "--input",
            s(&dec.join("none")),
            "--out",
            s(&rec),
        ],
        &["--input"],
    );
    fails_before_gpu(
        &[
            "vae",
            "--model",
            s(&dir),
            "reconstruct",
            "--input",
            s(&images),
            "--out",
            s(&rec),
        ],
        &["config.json"],
    );
    let odd = dir.join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    let text = std::fs::read_to_string(model.join("config.json"))
        .unwrap()
        .replacen("\"DownEncoderBlock2D\"", "\"AttnDownEncoderBlock2D\"", 1);
    std::fs::write(odd.join("config.json"), text).unwrap();
    fails_before_gpu(
        &[
            "vae",
            "--model",
            s(&odd),
            "reconstruct",
            "--input",
            s(&images),
            "--out",
            s(&rec),
        ],
        &["AttnDownEncoderBlock2D", "not supported"],
    );
}

/// `train-vae`: a short mnist-vae run writes metrics.jsonl, reconstructions.png and a diffusers
/// VAE directory whose config records the measured scaling_factor and which `vae` loads; a preset
/// that does not exist and a VAE of 3 channels are refused before the GPU; `--precision f16`
/// trains with a loss scale and resumes in f16.
#[test]
fn train_vae_writes_a_vae_that_loads() {
    let dir = scratch("train-vae");
    let out = dir.join("run");
    let (ok, err) = run_cli(&[
        "train-vae",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--out",
        s(&out),
    ]);
    assert!(ok && err.contains("train-vae"), "{err}");
    // f16 (half-precision operands, a GradScaler): each metrics row has the loss scale, and a
    // resume continues in f16 without --precision (the checkpoint restores the scaler).
    let f16_out = dir.join("f16");
    let f16_run = [
        "train-vae",
        "--precision",
        "f16",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--sample-every",
        "0",
        "--out",
        s(&f16_out),
    ];
    let (ok, err) = run_cli(&f16_run);
    assert!(ok, "{err}");
    let (ok, err) = run_cli(&["train-vae", "--resume", s(&f16_out), "--steps", "3"]);
    assert!(ok && err.contains("continues in f16"), "{err}");
    let rows = std::fs::read_to_string(f16_out.join("metrics.jsonl")).unwrap();
    assert_eq!(rows.lines().count(), 3, "{rows}");
    for row in rows.lines() {
        let v: serde_json::Value = serde_json::from_str(row).unwrap();
        assert!(v["loss_scale"].as_f64().is_some_and(|s| s > 0.0), "{row}");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
    assert!(out.join("reconstructions.png").is_file());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("vae/config.json")).unwrap())
            .unwrap();
    let factor = config["scaling_factor"].as_f64().unwrap();
    assert!(
        factor.is_finite() && factor > 0.0 && factor != 0.18215,
        "{factor}"
    );
    let png = dir.join("digit.png");
    image::GrayImage::from_fn(32, 32, |x, y| image::Luma([((x * y) % 256) as u8]))
        .save(&png)
        .unwrap();
    let (ok, err) = run_cli(&[
        "vae",
        "--model",
        s(&out.join("vae")),
        "reconstruct",
        "--input",
        s(&png),
        "--out",
        s(&dir.join("rec")),
    ]);
    assert!(ok && err.contains("PSNR"), "{err}");
    fails_before_gpu(
        &["train-vae", "--model", "sd-vae", "--out", s(&dir.join("x"))],
        &["unknown VAE preset", "mnist-vae"],
    );
    let rgb = dir.join("rgb.json");
    let text = std::fs::read_to_string(out.join("vae/config.json"))
        .unwrap()
        .replace("\"in_channels\": 1", "\"in_channels\": 3");
    std::fs::write(&rgb, text).unwrap();
    fails_before_gpu(
        &[
            "train-vae",
            "--model-config",
            s(&rgb),
            "--out",
            s(&dir.join("y")),
        ],
        &["1 input and 1 output channel"],
    );
}

/// `train-vae` checkpoints and `--resume` (mnist-vae, batch 4, 4 steps, `--rec-loss l2`): a run
/// "killed" after step 3 (its step-4 checkpoint, export, end files and metrics rows past its
/// step-2 checkpoint gone, a torn row left) and resumed exports the same bytes as a run never
/// stopped, though only it drew held-out grids at every step (they touch nothing a step reads);
/// metrics.jsonl then has each step once, with the loss kind and `test_psnr`. A finished run,
/// a run resumed with changed options and a new run in its folder are refused before the GPU.
#[test]
fn train_vae_resumes_bit_for_bit() {
    let dir = scratch("train-vae-resume");
    let (whole, cut) = (dir.join("whole"), dir.join("cut"));
    let train = |out: &Path, sample_every: &str| {
        let (ok, err) = run_cli(&[
            "train-vae",
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--rec-loss",
            "l2",
            "--checkpoint-every",
            "2",
            "--sample-every",
            sample_every,
            "--out",
            s(out),
        ]);
        assert!(ok, "{err}");
    };
    train(&whole, "0");
    train(&cut, "1");
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names(&cut.join("checkpoints")),
        ["step-00000002.safetensors", "step-00000004.safetensors"]
    );
    assert_eq!(names(&cut.join("samples")).len(), 4);
    assert!(names(&whole.join("samples")).is_empty());
    std::fs::remove_file(cut.join("checkpoints/step-00000004.safetensors")).unwrap();
    std::fs::remove_dir_all(cut.join("vae")).unwrap();
    for f in ["finished.json", "reconstructions.png", "loss.png"] {
        std::fs::remove_file(cut.join(f)).unwrap();
    }
    let metrics = std::fs::read_to_string(cut.join("metrics.jsonl")).unwrap();
    let three: String = metrics.lines().take(3).map(|l| format!("{l}\n")).collect();
    std::fs::write(cut.join("metrics.jsonl"), three + "{\"step\":4,\"lo").unwrap();

    let (ok, err) = run_cli(&["train-vae", "--resume", s(&cut)]);
    assert!(ok && err.contains("resumed at step 2"), "{err}");
    for f in ["vae/diffusion_pytorch_model.safetensors", "vae/config.json"] {
        assert!(
            std::fs::read(whole.join(f)).unwrap() == std::fs::read(cut.join(f)).unwrap(),
            "{f}: the resumed run differs from the uninterrupted one"
        );
    }
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(cut.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        rows.iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    for r in &rows {
        assert_eq!(r["rec_loss_kind"], "l2", "{r}");
        assert!(r["test_psnr"].as_f64().is_some_and(f64::is_finite), "{r}");
        let (loss, rec, kl) = (r["loss"].as_f64(), r["rec_loss"].as_f64(), r["kl"].as_f64());
        let want = rec.unwrap() + 1e-6 * kl.unwrap();
        assert!((loss.unwrap() - want).abs() <= 1e-4 * want, "{r}");
    }
    let whole_rows = std::fs::read_to_string(whole.join("metrics.jsonl")).unwrap();
    assert!(!whole_rows.contains("test_psnr"), "{whole_rows}");

    fails_before_gpu(
        &["train-vae", "--resume", s(&cut)],
        &["finished (step 4 of 4)", "--steps above 4"],
    );
    fails_before_gpu(
        &["train-vae", "--resume", s(&cut), "--steps", "3"],
        &["past --steps 3"],
    );
    fails_before_gpu(
        &["train-vae", "--resume", s(&cut), "--lr", "0.1"],
        &["--lr", "--resume"],
    );
    fails_before_gpu(
        &["train-vae", "--steps", "4", "--out", s(&cut)],
        &["already holds a run", "--resume"],
    );
    fails_before_gpu(
        &["train-vae", "--resume", s(&dir.join("none"))],
        &["no train-vae run there"],
    );
    // A run killed before its first checkpoint resumes from its options file (from step 0):
    // read before the GPU, so an impossible --steps is refused there.
    let early = dir.join("early");
    std::fs::create_dir_all(&early).unwrap();
    for f in ["train-vae.toml", "vae-config.json"] {
        std::fs::copy(cut.join(f), early.join(f)).unwrap();
    }
    fails_before_gpu(
        &["train-vae", "--resume", s(&early), "--steps", "0"],
        &["--steps must be at least 1"],
    );
}

#[test]
fn edm_misfits_are_refused_before_the_gpu() {
    let edm = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/edm/model");
    let out = scratch("edm");
    let o = s(&out);
    for sampler in ["ddim", "ddpm", "dpmpp-2m"] {
        fails_before_gpu(
            &[
                "sample",
                "--model",
                s(&edm),
                "--sampler",
                sampler,
                "--out",
                o,
            ],
            &[
                &format!("--sampler {sampler} does not fit an EDM model"),
                "euler",
            ],
        );
    }
    fails_before_gpu(
        &["sample", "--model", s(&edm), "--eta", "0.5", "--out", o],
        &["--eta", "EDM"],
    );
    fails_before_gpu(
        &[
            "sample",
            "--model",
            s(&edm),
            "--sampler",
            "heun",
            "--steps",
            "1",
            "--out",
            o,
        ],
        &["at least 2", "Heun"],
    );
    let run_dir = out.join("run");
    let run = s(&run_dir);
    fails_before_gpu(
        &[
            "train",
            "--objective",
            "edm",
            "--prediction-type",
            "v_prediction",
            "--out",
            run,
        ],
        &["objective edm", "prediction_type v_prediction"],
    );
    fails_before_gpu(
        &[
            "train",
            "--objective",
            "edm",
            "--snr-gamma",
            "5",
            "--out",
            run,
        ],
        &["snr_gamma"],
    );
    fails_before_gpu(
        &[
            "train",
            "--objective",
            "edm",
            "--sigma-data",
            "0",
            "--out",
            run,
        ],
        &["sigma_data must be a finite number > 0"],
    );
}

#[test]
fn ve_sde_misfits_are_refused_before_the_gpu() {
    let ve = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ve/model");
    let eps = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/samplers/eps");
    let out = scratch("ve");
    let o = s(&out);
    fails_before_gpu(
        &["sample", "--model", s(&ve), "--sampler", "ddim", "--out", o],
        &["--sampler ddim does not fit a VE-SDE model", "pc"],
    );
    fails_before_gpu(
        &["sample", "--model", s(&eps), "--sampler", "pc", "--out", o],
        &["--sampler pc is for VE-SDE models", "DDPMScheduler"],
    );
    fails_before_gpu(
        &["sample", "--model", s(&ve), "--snr", "0", "--out", o],
        &["--snr must be a finite number > 0"],
    );
    fails_before_gpu(
        &[
            "sample",
            "--model",
            s(&ve),
            "--sampler",
            "ode",
            "--snr",
            "0.2",
            "--out",
            o,
        ],
        &["--snr and --correct-steps apply to", "--sampler pc"],
    );
    // A positional U-Net config cannot learn the score the VE-SDE needs.
    let run_dir = out.join("run");
    fails_before_gpu(
        &[
            "train",
            "--objective",
            "ve-sde",
            "--model-config",
            s(&eps.join("config.json")),
            "--out",
            s(&run_dir),
        ],
        &["objective ve-sde needs a U-Net with time_embedding_type \"fourier\""],
    );
}

/// A fourier U-Net directory whose weights lack the frozen `time_proj.weight` is refused by name.
#[test]
fn a_fourier_model_without_its_projection_weights_is_an_error() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ve/model");
    let dir = scratch("ve-no-proj");
    for f in ["config.json", "scheduler_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(name, _)| name != "time_proj.weight")
        .collect();
    assert_eq!(kept.len() + 1, st.len(), "the fixture has time_proj.weight");
    std::fs::write(
        dir.join("diffusion_pytorch_model.safetensors"),
        safetensors::serialize(kept, None).unwrap(),
    )
    .unwrap();
    let out = dir.join("out");
    fails(
        &["sample", "--model", s(&dir), "--num", "1", "--out", s(&out)],
        &["time_proj.weight"],
    );
}

/// A binary built without the `mpi` feature, started by an MPI launcher as one of several
/// ranks, refuses before the GPU (N copies would each train alone into the same folder).
#[cfg(not(feature = "mpi"))]
#[test]
fn launched_as_several_ranks_without_mpi_is_an_error() {
    let dir = scratch("mpi-less");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wgpu-diffusion"))
        .args(["train", "--steps", "1", "--out", s(&dir.join("run"))])
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .expect("run wgpu-diffusion");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail:\n{err}");
    for needle in ["one of 2 processes", "--features mpi"] {
        assert!(err.contains(needle), "expected `{needle}` in:\n{err}");
    }
    assert!(!err.contains("adapter:"), "opened the GPU first:\n{err}");
    assert!(!dir.join("run").exists(), "left a run folder behind");
}

/// Commands that do not spread over ranks refuse to run as N copies under a launcher.
#[test]
fn only_train_and_bench_run_under_an_mpi_launcher() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wgpu-diffusion"))
        .args(["sample", "--model", "nowhere", "--out", "nowhere.png"])
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .env("PMI_SIZE", "4")
        .output()
        .expect("run wgpu-diffusion");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail:\n{err}");
    assert!(
        err.contains("one of 4 processes") && err.contains("only `train` and `bench`"),
        "{err}"
    );
}
