//! Latent diffusion (issue 22): the frozen VAE's encode and decode around the U-Net scale and
//! shift latents as diffusers' pipelines do; a latent run trains, resumes bit-identically,
//! exports a directory with unet/, vae/ and scheduler/ that `sample` reads, and inputs that do
//! not fit (a VAE whose latents are not the U-Net's, a VAE config we do not build, inpainting in
//! latent space, a checkpoint whose VAE is gone) are clear errors.
//!
//! The VAE is the diffusers-saved fixture of tests/gpu/vae.rs (16×16 → 4×8×8 latents), the
//! U-Net a small one on those latents, so each run takes seconds.

use std::path::{Path, PathBuf};

use wgpu_diffusion::ops::noise::{purpose, random_normal, write_rng_state};
use wgpu_diffusion::sample::LatentVae;

use crate::common::*;

fn vae_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vae/model")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wgpu-diffusion-ldm-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The fixture VAE in `dir` with its config's keys changed as `edit` says.
fn vae_copy(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let weights = "diffusion_pytorch_model.safetensors";
    std::fs::copy(vae_fixture().join(weights), dir.join(weights)).unwrap();
    let text = std::fs::read_to_string(vae_fixture().join("config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    dir.to_path_buf()
}

/// A small UNet2DModel config on `channels`×`size`×`size` latents.
fn unet_config(dir: &Path, size: usize, channels: usize) -> PathBuf {
    let config = serde_json::json!({
        "_class_name": "UNet2DModel",
        "sample_size": size,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 8,
    });
    let path = dir.join(format!("unet-{size}-{channels}.json"));
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

fn fails(args: &[&str], needles: &[&str]) -> String {
    let (ok, err) = run_cli(args);
    assert!(!ok, "{args:?} should fail:\n{err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: expected `{n}` in:\n{err}");
    }
    err
}

fn succeeds(args: &[&str]) -> String {
    let (ok, err) = run_cli(args);
    assert!(ok, "{args:?} failed:\n{err}");
    err
}

/// Encode: x0 = (z − shift_factor) · scaling_factor with z the posterior's sample of the same ε;
/// decode: decode(x0 / scaling_factor + shift_factor) — against the VAE's own passes with the
/// scaling done on the CPU.
#[test]
fn latent_codec_scales_and_shifts_like_diffusers() {
    let g = gpu();
    let dir = vae_copy(&scratch("codec").join("vae"), |c| {
        c["scaling_factor"] = 0.37.into();
        c["shift_factor"] = 0.3.into();
    });
    let source = LatentVae::from_dir(&dir).unwrap();
    let b = 3;
    let codec = source.load(&g, b, None, false).unwrap();
    let vae = &codec.vae;
    let images: Vec<f32> = random(vae.sample.value.numel(), 7)
        .iter()
        .map(|v| *v as f32)
        .collect();
    let input = g
        .tensor_from(vae.sample.value.shape(), &images, "images")
        .unwrap();
    let rng = g.tensor(&[4], "rng");
    write_rng_state(&g, &rng, 11, 5).unwrap();
    let x0 = g.tensor(vae.latent.value.shape(), "x0");
    let offset = 17;
    g.run(&[&run(&g, |rec| {
        codec.record_encode(rec, &input, &rng, offset, &x0).unwrap()
    })])
    .unwrap();
    let ours = read(&g, &x0);
    // The same posterior sample, by the VAE's own passes.
    g.write(&vae.sample.value, &images).unwrap();
    g.run(&[&run(&g, |rec| {
        random_normal(rec, &rng, purpose::VAE_EPS, offset, &vae.eps).unwrap();
        vae.encode(rec).unwrap();
        vae.sample_latent(rec).unwrap();
    })])
    .unwrap();
    let z = read(&g, &vae.latent.value);
    let want: Vec<f32> = z.iter().map(|v| (v - 0.3f32) * 0.37f32).collect();
    assert_eq!(ours, want, "encode: (z − shift) · scale");

    g.run(&[&run(&g, |rec| codec.record_decode(rec, &x0).unwrap())])
        .unwrap();
    let decoded = read(&g, codec.output());
    let unscaled: Vec<f32> = ours.iter().map(|v| v * (1.0 / 0.37f32) + 0.3).collect();
    g.write(&vae.latent.value, &unscaled).unwrap();
    g.run(&[&run(&g, |rec| vae.decode(rec).unwrap())]).unwrap();
    let want = read(&g, &vae.output.value);
    let want64: Vec<f64> = want.iter().map(|v| *v as f64).collect();
    assert_close("decode(x0 / scale + shift)", &decoded, &want64, 1e-6, 1e-6);
}

/// A sampler's decode-only VAE (`load(.., decode_only)`): the encoder's activations have no
/// storage (the build allocates less than the whole VAE), decoding gives the whole VAE's bits,
/// and recording the encoder is refused with the tensor's name.
#[test]
fn a_decode_only_vae_skips_the_encoders_activations() {
    let g = &capped_gpus(u64::MAX, None)[0];
    let source = LatentVae::from_dir(&vae_fixture()).unwrap();
    let before = g.allocated_bytes();
    let whole = source.load(g, 2, None, false).unwrap();
    let whole_bytes = g.allocated_bytes() - before;
    let decoder = source.load(g, 2, None, true).unwrap();
    let decoder_bytes = g.allocated_bytes() - before - whole_bytes;
    assert!(
        decoder_bytes < whole_bytes,
        "decode-only {decoder_bytes} B, whole {whole_bytes} B"
    );
    let latents: Vec<f32> = random(whole.vae.latent.value.numel(), 9)
        .iter()
        .map(|v| *v as f32)
        .collect();
    let x0 = g
        .tensor_from(whole.vae.latent.value.shape(), &latents, "x0")
        .unwrap();
    let decode = |codec: &wgpu_diffusion::sample::LatentCodec| {
        g.run(&[&run(g, |rec| codec.record_decode(rec, &x0).unwrap())])
            .unwrap();
        read(g, codec.output())
    };
    assert_eq!(
        decode(&decoder),
        decode(&whole),
        "decode-only decodes differently"
    );
    g.check().unwrap();
    let mut rec = g.recorder();
    decoder.vae.encode(&mut rec).unwrap();
    let err = g.check().unwrap_err().to_string();
    assert!(err.contains("has no storage"), "{err}");
}

/// A sampling batch whose decoder activations would not fit one storage binding is decoded one
/// image after another (row bands split one image, not a batch): with bindings capped at
/// 76 KiB (the U-Net's widest weights take 72 KiB), five 16×16 images (the fixture VAE's
/// widest activation is 16 KiB each) decode one by one into what the uncapped device decodes
/// for the whole batch at once.
#[test]
fn a_batch_too_wide_for_one_binding_decodes_image_by_image() {
    use wgpu_diffusion::diffusion::scheduler::{SamplerKind, SamplingSchedule, SchedulerConfig};
    use wgpu_diffusion::nn::config::UNetConfig;
    use wgpu_diffusion::sample::{Noise, Sampler, SamplerOptions};
    let root = scratch("per-image");
    let text = std::fs::read_to_string(unet_config(&root, 8, 4)).unwrap();
    let config = UNetConfig::from_json(&text).unwrap();
    let vae = LatentVae::from_dir(&vae_fixture()).unwrap();
    assert_eq!(
        vae.config.largest_decoder_activation((16, 16)) * 4,
        16 << 10
    );
    let sample = |g: &std::sync::Arc<wgpu_diffusion::gpu::Gpu>| {
        let schedule = SamplingSchedule::new(
            &SchedulerConfig::ddpm_default(),
            SamplerKind::Ddim,
            3,
            None,
            0.0,
        )
        .unwrap();
        let opts = SamplerOptions {
            guidance: None,
            inpaint: None,
            vae: Some(vae.clone()),
            context_tokens: None,
            size: None,
        };
        let mut s = Sampler::new(g, &config, schedule, 5, &opts).unwrap();
        s.set_weights(&wgpu_diffusion::nn::init::default_init(&s.unet.params, 0))
            .unwrap();
        assert_eq!(s.image_shape(), [5, 16, 16, 1]);
        s.sample_batch(0, &Noise::Seeded(4), None, &mut |_| {})
            .unwrap()
    };
    // Each capped device against an uncapped one of its GEMM path (the same sums).
    for capped in capped_gpus(76 << 10, None) {
        let path = capped.gemm_path;
        let uncapped = capped_gpus(u64::MAX, None)
            .into_iter()
            .find(|g| g.gemm_path == path)
            .unwrap();
        let whole = sample(&uncapped);
        let by_image = sample(&capped);
        let want: Vec<f64> = whole.iter().map(|v| *v as f64).collect();
        let what = format!("{path}: decoded image by image");
        assert_close(&what, &by_image, &want, 1e-6, 1e-5);
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// A latent run: trains, is killed after its first checkpoint and resumed to the same bits as
/// an uninterrupted run, exports unet/ + vae/ + scheduler/ (the VAE listed in
/// model_index.json), and `sample` decodes its samples into the VAE's 16×16 grey images from
/// the export, the unet/ sub-folder and a checkpoint.
#[test]
fn latent_runs_resume_bit_identically_and_sample_images() {
    let root = scratch("run");
    let unet = unet_config(&root, 8, 4);
    let vae = vae_copy(&root.join("given-vae"), |_| {});
    let train = |out: &Path, steps: &str| {
        succeeds(&[
            "train",
            "--vae",
            s(&vae),
            "--model-config",
            s(&unet),
            "--steps",
            steps,
            "--batch-size",
            "4",
            "--checkpoint-every",
            "2",
            "--sample-every",
            "0",
            "--log-every",
            "1",
            "--out",
            s(out),
        ])
    };
    let whole = root.join("whole");
    let err = train(&whole, "4");
    assert!(err.contains("latent diffusion"), "{err}");
    let killed = root.join("killed");
    train(&killed, "2");
    // The run keeps its own copy of the VAE: the original may move.
    std::fs::remove_dir_all(&vae).unwrap();
    succeeds(&["train", "--resume", s(&killed), "--steps", "4"]);
    let weights = |run: &Path| std::fs::read(run.join("model/diffusion_pytorch_model.safetensors"));
    assert!(
        weights(&whole).unwrap() == weights(&killed).unwrap(),
        "a resumed latent run differs from an uninterrupted one"
    );
    let index = std::fs::read_to_string(whole.join("model/model_index.json")).unwrap();
    assert!(index.contains("AutoencoderKL"), "{index}");
    // Latents range wider than [-1, 1]: the exported scheduler must not clip x0 to it.
    for f in ["scheduler_config.json", "scheduler/scheduler_config.json"] {
        let text = std::fs::read_to_string(whole.join("model").join(f)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v["clip_sample"],
            serde_json::Value::Bool(false),
            "model/{f}: {text}"
        );
    }
    for file in ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"] {
        assert!(whole.join("model").join(file).is_file(), "model/{file}");
    }

    for (flag, source) in [
        ("--model", whole.join("model")),
        ("--model", whole.join("model/unet")),
        (
            "--checkpoint",
            whole.join("checkpoints/step-00000004.safetensors"),
        ),
    ] {
        let out = root.join("samples");
        let err = succeeds(&[
            "sample",
            flag,
            s(&source),
            "--num",
            "3",
            "--steps",
            "3",
            "--out",
            s(&out),
        ]);
        assert!(err.contains("decoding with the VAE"), "{err}");
        let img = image::open(out.join("00002.png")).unwrap();
        assert_eq!((img.width(), img.height()), (16, 16), "{flag} {source:?}");
        assert_eq!(img.color().channel_count(), 1, "{flag} {source:?}");
    }
}

/// Misfits are errors that name what does not fit, and nothing is written.
#[test]
fn latent_inputs_that_do_not_fit_are_refused() {
    let root = scratch("misfit");
    let vae = vae_fixture();
    let out = root.join("out");
    let train = |extra: &[&str], needles: &[&str]| {
        let mut args = vec!["train", "--steps", "2", "--out", s(&out)];
        args.extend_from_slice(extra);
        let err = fails(&args, needles);
        assert!(!out.exists(), "{args:?} left {}", out.display());
        err
    };
    // The U-Net's size is not the latents'.
    let wrong_size = unet_config(&root, 4, 4);
    train(
        &["--vae", s(&vae), "--model-config", s(&wrong_size)],
        &["sample_size is 4", "4×8×8 latents"],
    );
    // Nor its channels.
    let wrong_channels = unet_config(&root, 8, 3);
    train(
        &["--vae", s(&vae), "--model-config", s(&wrong_channels)],
        &["latent_channels 4", "in_channels = out_channels = 4"],
    );
    // A pixel-space preset.
    train(
        &["--vae", s(&vae), "--model", "tiny16"],
        &["sample_size is 16"],
    );
    // A super-resolution model cannot run on latents.
    let fits = unet_config(&root, 8, 4);
    train(
        &["--vae", s(&vae), "--model-config", s(&fits), "--task", "sr"],
        &["super-resolution"],
    );
    // A VAE directory with a block type or a key value we do not build.
    let attn = vae_copy(&root.join("attn-vae"), |c| {
        c["down_block_types"] = serde_json::json!(["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]);
    });
    train(
        &["--vae", s(&attn), "--model-config", s(&fits)],
        &["AttnDownEncoderBlock2D", "not supported"],
    );
    let gelu = vae_copy(&root.join("gelu-vae"), |c| c["act_fn"] = "gelu".into());
    train(
        &["--vae", s(&gelu), "--model-config", s(&fits)],
        &["act_fn", "gelu"],
    );
    // An empty folder.
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    train(
        &["--vae", s(&empty), "--model-config", s(&fits)],
        &["not an AutoencoderKL directory", "config.json"],
    );
    // Sampling: a VAE given by hand must fit the U-Net too, and inpainting is refused.
    let pixel = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/samplers/eps");
    fails(
        &[
            "sample",
            "--model",
            s(&pixel),
            "--vae",
            s(&vae),
            "--out",
            s(&out),
        ],
        &["latent_channels 4", "in_channels = out_channels = 4"],
    );
}

/// A latent checkpoint whose run folder lost its vae/ asks for `--vae`, and takes it; inpainting
/// in latent space is refused.
#[test]
fn a_latent_checkpoint_without_its_vae_asks_for_one() {
    let root = scratch("lost-vae");
    let unet = unet_config(&root, 8, 4);
    let run_dir = root.join("run");
    succeeds(&[
        "train",
        "--vae",
        s(&vae_fixture()),
        "--model-config",
        s(&unet),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--sample-every",
        "0",
        "--out",
        s(&run_dir),
    ]);
    std::fs::remove_dir_all(run_dir.join("vae")).unwrap();
    let ck = run_dir.join("checkpoints/step-00000001.safetensors");
    let out = root.join("samples");
    fails(
        &["sample", "--checkpoint", s(&ck), "--out", s(&out)],
        &["latent diffusion model", "--vae DIR"],
    );
    succeeds(&[
        "sample",
        "--checkpoint",
        s(&ck),
        "--vae",
        s(&vae_fixture()),
        "--num",
        "1",
        "--steps",
        "2",
        "--out",
        s(&out),
    ]);
    let digit = root.join("digit.png");
    image::GrayImage::new(16, 16).save(&digit).unwrap();
    fails(
        &[
            "sample",
            "--model",
            s(&run_dir.join("model")),
            "--inpaint",
            s(&digit),
            "--mask",
            s(&digit),
            "--out",
            s(&out),
        ],
        &["inpaint", "latent"],
    );
}

/// Text to image in latent space (`train --text-conditional --vae`): the default preset is
/// mnist-sd (a UNet2DConditionModel on the VAE's 4×8×8 latents); the export is a Stable
/// Diffusion pipeline directory whose `model_index.json` names what the one diffusers 0.42.1
/// saved for tests/fixtures/sd_pipeline names, component by component, with every
/// component's files; `sample --prompt` reads it and decodes 16×16 images, and a resumed run
/// equals an uninterrupted one.
#[test]
fn latent_text_runs_export_a_stable_diffusion_pipeline() {
    let root = scratch("text");
    let vae = vae_fixture();
    let train = |out: &Path, steps: &str| {
        succeeds(&[
            "train",
            "--text-conditional",
            "--vae",
            s(&vae),
            "--steps",
            steps,
            "--batch-size",
            "2",
            "--checkpoint-every",
            "1",
            "--sample-every",
            "0",
            "--out",
            s(out),
        ])
    };
    let whole = root.join("whole");
    train(&whole, "2");
    let config = std::fs::read_to_string(whole.join("model/unet/config.json")).unwrap();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["_class_name"], "UNet2DConditionModel", "{config}");
    assert_eq!(config["sample_size"], 8, "{config}");
    let killed = root.join("killed");
    train(&killed, "1");
    succeeds(&["train", "--resume", s(&killed), "--steps", "2"]);
    let unet_weights = "model/unet/diffusion_pytorch_model.safetensors";
    assert!(
        std::fs::read(whole.join(unet_weights)).unwrap()
            == std::fs::read(killed.join(unet_weights)).unwrap(),
        "a resumed latent text run differs from an uninterrupted one"
    );

    let index = |dir: &Path| -> serde_json::Value {
        let text = std::fs::read_to_string(dir.join("model_index.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    };
    let ours = index(&whole.join("model"));
    let saved = index(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd_pipeline"));
    for (key, value) in saved.as_object().unwrap() {
        if key.starts_with('_') || key == "scheduler" {
            continue; // versions; our scheduler is DDPM's, the fixture's PNDM
        }
        assert_eq!(&ours[key], value, "model_index.json `{key}`: {ours}");
    }
    assert_eq!(ours["_class_name"], "StableDiffusionPipeline", "{ours}");
    // SD's scheduler settings: no deprecation amendments when diffusers builds the pipeline.
    let scheduler = whole.join("model/scheduler/scheduler_config.json");
    let scheduler: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(scheduler).unwrap()).unwrap();
    assert_eq!(scheduler["steps_offset"], 1, "{scheduler}");
    assert_eq!(scheduler["clip_sample"], false, "{scheduler}");
    for file in [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
    ] {
        assert!(whole.join("model").join(file).is_file(), "model/{file}");
    }

    let out = root.join("samples");
    let err = succeeds(&[
        "sample",
        "--model",
        s(&whole.join("model")),
        "--prompt",
        "a handwritten seven",
        "--num",
        "2",
        "--steps",
        "2",
        "--out",
        s(&out),
    ]);
    assert!(err.contains("decoding with the VAE"), "{err}");
    let img = image::open(out.join("00001.png")).unwrap();
    assert_eq!((img.width(), img.height()), (16, 16));
    let _ = std::fs::remove_dir_all(&root);
}
