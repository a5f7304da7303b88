//! `wgpu-diffusion sample` as a user runs it: outputs on disk, and a clear error (no panic)
//! for each kind of bad input.

use std::path::{Path, PathBuf};

use crate::common::run_cli;
use wgpu_diffusion::io::tensors::LoadedTensors;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/samplers")
        .join(name)
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "wgpu-diffusion-sample-cli-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sample(args: &[&str]) -> (bool, String) {
    run_cli(&[&["sample"], args].concat())
}

fn expect_error(args: &[&str], needle: &str) {
    let (ok, stderr) = sample(args);
    assert!(!ok, "{args:?} should fail");
    assert!(
        stderr.contains(needle),
        "{args:?}: expected `{needle}` in:\n{stderr}"
    );
}

#[test]
fn sample_writes_grid_images_and_tensor() {
    let out = scratch("outputs");
    let tensor = out.join("raw.safetensors");
    let model = fixture("eps");
    let (ok, stderr) = sample(&[
        "--model",
        model.to_str().unwrap(),
        "--sampler",
        "euler",
        "--steps",
        "3",
        "--num",
        "3",
        "--batch-size",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--save-tensor",
        tensor.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("images/s"), "{stderr}");
    for f in ["grid.png", "00000.png", "00001.png", "00002.png"] {
        assert!(out.join(f).is_file(), "{f} missing; stderr:\n{stderr}");
    }
    let img = image::open(out.join("00002.png")).unwrap();
    assert_eq!((img.width(), img.height()), (8, 8));
    let (shape, values) = LoadedTensors::read(&tensor).unwrap().get("sample").unwrap();
    assert_eq!(shape, vec![3, 1, 8, 8]);
    assert!(values.iter().all(|v| v.is_finite()));
}

/// `--height/--width` on a pixel-space model: the U-Net is built for that size (any multiple of
/// 2 for this two-level model), the raw tensor and every image have it; a size the U-Net cannot
/// halve back is refused by name.
#[test]
fn height_and_width_set_the_image_size() {
    let out = scratch("size");
    let tensor = out.join("raw.safetensors");
    let model = fixture("eps");
    let m = model.to_str().unwrap();
    let o = out.to_str().unwrap();
    let t = tensor.to_str().unwrap();
    let args = ["--model", m, "--steps", "2", "--num", "2", "--out", o];
    let (ok, stderr) = sample(
        &[
            &args[..],
            &["--height", "6", "--width", "10", "--save-tensor", t],
        ]
        .concat(),
    );
    assert!(ok, "{stderr}");
    let img = image::open(out.join("00001.png")).unwrap();
    assert_eq!((img.width(), img.height()), (10, 6));
    let (shape, values) = LoadedTensors::read(&tensor).unwrap().get("sample").unwrap();
    assert_eq!(shape, vec![2, 1, 6, 10]);
    assert!(values.iter().all(|v| v.is_finite()));
    let (ok, stderr) = sample(&[&args[..], &["--width", "12"]].concat());
    assert!(ok, "{stderr}");
    let img = image::open(out.join("00000.png")).unwrap();
    assert_eq!((img.width(), img.height()), (12, 8));
    expect_error(
        &[&args[..], &["--height", "7"]].concat(),
        "height 7 does not fit",
    );
    expect_error(&[&args[..], &["--width", "0"]].concat(), "multiple of 2");
}

#[test]
fn bad_sample_inputs_are_clear_errors() {
    let dir = scratch("errors");
    let eps = fixture("eps");
    let eps = eps.to_str().unwrap();
    let out = dir.join("out");
    let out = out.to_str().unwrap();
    expect_error(
        &["--model", eps, "--sampler", "plms"],
        "invalid value 'plms'",
    );
    expect_error(
        &["--model", eps, "--steps", "0", "--out", out],
        "--steps must be in 1..=1000",
    );
    expect_error(
        &["--model", eps, "--steps", "1001", "--out", out],
        "--steps must be in 1..=1000",
    );
    expect_error(
        &["--model", "/nonexistent/model", "--out", out],
        "is not a directory",
    );
    expect_error(
        &["--model", eps, "--no-ema", "--out", out],
        "--no-ema applies to --checkpoint",
    );
    expect_error(&["--out", out], "required");
    expect_error(
        &["--model", eps, "--class", "3", "--out", out],
        "is not class-conditional",
    );
    expect_error(
        &["--model", eps, "--guidance-scale", "2", "--out", out],
        "nothing to guide",
    );

    // --noise of the wrong shape, and DDPM with --noise but no --step-noise.
    let noise = dir.join("noise.safetensors");
    let values = vec![0.5f32; 2 * 3 * 8 * 8];
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        vec![2, 3, 8, 8],
        bytemuck::cast_slice(&values),
    )
    .unwrap();
    std::fs::write(
        &noise,
        safetensors::serialize([("noise", view)], None).unwrap(),
    )
    .unwrap();
    expect_error(
        &[
            "--model",
            eps,
            "--noise",
            noise.to_str().unwrap(),
            "--out",
            out,
        ],
        "tensor `noise` has shape [2, 3, 8, 8]; expected [N, 1, 8, 8]",
    );
    let results = fixture("eps").join("results.safetensors");
    expect_error(
        &[
            "--model",
            eps,
            "--sampler",
            "ddpm",
            "--noise",
            results.to_str().unwrap(),
            "--out",
            out,
        ],
        "--step-noise",
    );

    // A directory with config.json only; mismatched weights; unsupported scheduler settings.
    let partial = dir.join("partial");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::copy(
        fixture("eps").join("config.json"),
        partial.join("config.json"),
    )
    .unwrap();
    expect_error(
        &["--model", partial.to_str().unwrap(), "--out", out],
        "diffusion_pytorch_model.safetensors is missing",
    );
    let mismatched = dir.join("mismatched");
    std::fs::create_dir_all(&mismatched).unwrap();
    let config = std::fs::read_to_string(fixture("eps").join("config.json"))
        .unwrap()
        .replace("\"layers_per_block\": 1", "\"layers_per_block\": 2");
    std::fs::write(mismatched.join("config.json"), config).unwrap();
    std::fs::copy(
        fixture("eps").join("diffusion_pytorch_model.safetensors"),
        mismatched.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    expect_error(
        &[
            "--model",
            mismatched.to_str().unwrap(),
            "--steps",
            "2",
            "--out",
            out,
        ],
        "is missing",
    );
    for (key, value, needle) in [
        (
            "thresholding",
            "true",
            "`thresholding` = true is not supported",
        ),
        ("beta_schedule", "\"sigmoid\"", "sigmoid"),
        ("variance_type", "\"learned_range\"", "learned_range"),
    ] {
        let d = dir.join(format!("sched-{key}"));
        std::fs::create_dir_all(&d).unwrap();
        for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
            std::fs::copy(fixture("eps").join(f), d.join(f)).unwrap();
        }
        let mut sched: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture("eps").join("scheduler_config.json")).unwrap(),
        )
        .unwrap();
        sched[key] = serde_json::from_str(value).unwrap();
        std::fs::write(d.join("scheduler_config.json"), sched.to_string()).unwrap();
        expect_error(
            &[
                "--model",
                d.to_str().unwrap(),
                "--sampler",
                "euler",
                "--out",
                out,
            ],
            needle,
        );
    }
}

/// RePaint end to end: the kept half comes back exactly as the original (the last step lands
/// on ᾱ = 1), the regenerated half is new; bad masks and samplers are clear errors.
#[test]
fn inpainting_keeps_the_known_region() {
    let dir = scratch("inpaint");
    let eps = fixture("eps");
    let eps = eps.to_str().unwrap();
    let (image, mask) = (dir.join("image.png"), dir.join("mask.png"));
    image::GrayImage::from_fn(8, 8, |x, y| image::Luma([(x * 30 + y * 3) as u8]))
        .save(&image)
        .unwrap();
    // Right half white: regenerate it; keep the left half.
    image::GrayImage::from_fn(8, 8, |x, _| image::Luma([if x >= 4 { 255 } else { 0 }]))
        .save(&mask)
        .unwrap();
    let out = dir.join("out");
    let raw = dir.join("raw.safetensors");
    let (i, m, o, rw) = (
        image.to_str().unwrap(),
        mask.to_str().unwrap(),
        out.to_str().unwrap(),
        raw.to_str().unwrap(),
    );
    for sampler in ["ddim", "ddpm"] {
        let (ok, err) = sample(&[
            "--model",
            eps,
            "--sampler",
            sampler,
            "--steps",
            "6",
            "--jump-length",
            "2",
            "--jump-n-sample",
            "2",
            "--inpaint",
            i,
            "--mask",
            m,
            "--num",
            "2",
            "--out",
            o,
            "--save-tensor",
            rw,
        ]);
        assert!(ok, "{err}");
        let (_, values) = LoadedTensors::read(&raw).unwrap().get("sample").unwrap();
        for img in values.chunks(64) {
            for y in 0..8 {
                for x in 0..8 {
                    let v = img[y * 8 + x];
                    let original = (x * 30 + y * 3) as f32 / 127.5 - 1.0;
                    if x < 4 {
                        assert!(
                            (v - original).abs() < 1e-5,
                            "{sampler}: kept pixel ({x},{y}) = {v}, original {original}"
                        );
                    }
                }
            }
            let changed = (0..8)
                .flat_map(|y| (4..8).map(move |x| (x, y)))
                .filter(|&(x, y)| {
                    (img[y * 8 + x] - ((x * 30 + y * 3) as f32 / 127.5 - 1.0)).abs() > 1e-3
                });
            assert!(
                changed.count() > 16,
                "{sampler}: the masked half was not regenerated"
            );
        }
    }
    let small = dir.join("small.png");
    image::GrayImage::new(4, 4).save(&small).unwrap();
    expect_error(
        &[
            "--model",
            eps,
            "--inpaint",
            i,
            "--mask",
            small.to_str().unwrap(),
            "--out",
            o,
        ],
        "must cover the image",
    );
    expect_error(
        &[
            "--model",
            eps,
            "--sampler",
            "euler",
            "--inpaint",
            i,
            "--mask",
            m,
            "--out",
            o,
        ],
        "ddpm or ddim",
    );
    expect_error(&["--model", eps, "--inpaint", i, "--out", o], "--mask");
    // In diffusers' convention (--mask-invert) a white mask keeps everything.
    let white = dir.join("white.png");
    image::GrayImage::from_pixel(8, 8, image::Luma([255]))
        .save(&white)
        .unwrap();
    let w = white.to_str().unwrap();
    expect_error(
        &[
            "--model",
            eps,
            "--inpaint",
            i,
            "--mask",
            w,
            "--mask-invert",
            "--out",
            o,
        ],
        "--mask-invert is set",
    );
    let black = dir.join("black.png");
    image::GrayImage::new(8, 8).save(&black).unwrap();
    expect_error(
        &[
            "--model",
            eps,
            "--inpaint",
            i,
            "--mask",
            black.to_str().unwrap(),
            "--out",
            o,
        ],
        "nothing to regenerate",
    );
}
