//! Text-to-image sampling against diffusers 0.42.1's `StableDiffusionPipeline`: a tiny random
//! pipeline diffusers saved (`tests/fixtures/sd_pipeline/`, SD 1.x's layout and component
//! classes, written by tools/make_sd_pipeline_fixtures.py). From the same initial latents, the
//! prompt "a handwritten seven" with the negative prompt "blurry" at guidance 7.5, 4 steps of
//! PNDM (the pipeline's own scheduler, SD 1.5's settings), DDIM and DPM-Solver++ 2M (from its
//! config): our prompt embeddings equal transformers' (relative L2 ≤ 1e-5), and the final
//! latents and decoded images equal diffusers' within issue 10's bound, max |ours − diffusers| ≤
//! 2e-3 · max(1, max |diffusers|) (measured values printed), on both GEMM paths; and a
//! non-square image (`height` 16, `width` 24) with DDIM.

use std::path::{Path, PathBuf};

use crate::common::*;
use wgpu_diffusion::diffusion::scheduler::{SamplerKind, SamplingSchedule};
use wgpu_diffusion::io::tensors::LoadedTensors;
use wgpu_diffusion::sample::{
    ModelSource, Noise, Sampler, SamplerOptions, TextConditioning, nchw_to_nhwc,
};

const CASES: [(&str, SamplerKind); 3] = [
    ("pndm", SamplerKind::Pndm),
    ("ddim", SamplerKind::Ddim),
    ("dpmpp_2m", SamplerKind::DpmSolverPp2m),
];

fn max_diff(ours: &[f32], theirs: &[f32]) -> (f32, f32) {
    let d = ours
        .iter()
        .zip(theirs)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    let scale = theirs.iter().fold(1f32, |m, v| m.max(v.abs()));
    (d, scale)
}

/// The pipeline's prompt embeddings on `g`, checked against transformers': (cond, uncond).
fn prompt_context(
    g: &std::sync::Arc<wgpu_diffusion::gpu::Gpu>,
    text: &TextConditioning,
    r: &LoadedTensors,
) -> (wgpu_diffusion::gpu::Tensor, wgpu_diffusion::gpu::Tensor) {
    let meta = r.metadata();
    let encoder = text.load(g, 2).unwrap();
    let prompts = [meta["prompt"].as_str(), meta["negative_prompt"].as_str()];
    assert!(encoder.encode(&prompts).unwrap().is_empty());
    let embeds = read(g, encoder.output());
    let per = embeds.len() / 2;
    for (i, name) in ["prompt_embeds", "negative_prompt_embeds"]
        .iter()
        .enumerate()
    {
        let e = rel_l2(&embeds[i * per..(i + 1) * per], &r.get(name).unwrap().1);
        assert!(e <= 1e-5, "{name}: relative L2 {e:e}");
    }
    let out = encoder.output();
    let row = &out.shape()[1..];
    (
        out.view(0, &[1, row[0], row[1]], "prompt"),
        out.view(per, &[1, row[0], row[1]], "negative prompt"),
    )
}

/// Samples the fixture pipeline from the result file's `latents_key` with `kind` (images of
/// `size` when given) and compares the final latents and the image with diffusers'
/// `latents.{case}` and `image.{case}`. Returns how many buffers hold the U-Net's weights.
#[allow(clippy::too_many_arguments)]
fn check_case(
    g: &std::sync::Arc<wgpu_diffusion::gpu::Gpu>,
    (source, text, r): (&ModelSource, &TextConditioning, &LoadedTensors),
    context: &(wgpu_diffusion::gpu::Tensor, wgpu_diffusion::gpu::Tensor),
    latents_key: &str,
    case: &str,
    kind: SamplerKind,
    size: Option<(usize, usize)>,
) -> usize {
    let meta = r.metadata();
    let steps: usize = meta["steps"].parse().unwrap();
    let guidance: f32 = meta["guidance_scale"].parse().unwrap();
    let (ls, latents) = r.get(latents_key).unwrap();
    let lshape = [ls[0], ls[1], ls[2], ls[3]];
    let latents = nchw_to_nhwc(&latents, lshape);
    let schedule = SamplingSchedule::new(&source.scheduler, kind, steps, None, 0.0).unwrap();
    let options = SamplerOptions {
        guidance: Some(guidance),
        vae: source.vae.clone(),
        context_tokens: Some(text.context_tokens()),
        size,
        ..Default::default()
    };
    let mut sampler = Sampler::new(g, &source.config, schedule, 1, &options).unwrap();
    sampler
        .set_weights(&source.weights(&sampler.unet.params).unwrap())
        .unwrap();
    sampler.set_context(&context.0, Some(&context.1)).unwrap();
    let noise = Noise::Given {
        initial: &latents,
        steps: None,
    };
    let decoded = sampler.sample_batch(0, &noise, None, &mut |_| {}).unwrap();
    let ours = sampler.read_latents().unwrap();
    let theirs = nchw_to_nhwc(&r.get(&format!("latents.{case}")).unwrap().1, lshape);
    let (d, scale) = max_diff(&ours, &theirs);
    // diffusers' output_type "np": (x / 2 + 0.5).clamp(0, 1), NHWC.
    let image: Vec<f32> = decoded
        .iter()
        .map(|v| (v / 2.0 + 0.5).clamp(0.0, 1.0))
        .collect();
    let want = r.get(&format!("image.{case}")).unwrap().1;
    assert_eq!(image.len(), want.len(), "{case}: image size");
    let (di, _) = max_diff(&image, &want);
    eprintln!(
        "sd pipeline {case} ({}): latents max |diff| {d:.2e} (max |ref| {scale:.2}), image max |diff| {di:.2e}",
        g.gemm_path
    );
    assert!(
        d <= 2e-3 * scale && di <= 2e-3,
        "{case} on {}: latents max |diff| {d:e} (scale {scale}), image {di:e}\n  ours[..4] {:?}\n  diffusers[..4] {:?}",
        g.gemm_path,
        &ours[..4],
        &theirs[..4]
    );
    sampler.unet.params.value_buffers().len()
}

fn fixture() -> (ModelSource, TextConditioning, LoadedTensors) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd_pipeline");
    let source = ModelSource::from_dir(&dir).unwrap();
    let text = TextConditioning::from_pipeline(&dir).unwrap().unwrap();
    text.check_fits(&source.config).unwrap();
    let r = LoadedTensors::read(&dir.join("results.safetensors")).unwrap();
    (source, text, r)
}

#[test]
fn prompt_to_image_matches_stable_diffusion_pipeline() {
    let (source, text, r) = fixture();
    for g in gemm_paths() {
        let context = prompt_context(&g, &text, &r);
        for (case, kind) in CASES {
            let f = (&source, &text, &r);
            check_case(&g, f, &context, "latents", case, kind, None);
        }
    }
}

/// `--height 16 --width 24` (the model's images are 16 x 16): latents 8 x 12 through the U-Net
/// and the VAE built for that size, as diffusers' pipeline takes `height`/`width`.
#[test]
fn a_non_square_image_matches_stable_diffusion_pipeline() {
    let (source, text, r) = fixture();
    for g in gemm_paths() {
        let context = prompt_context(&g, &text, &r);
        let f = (&source, &text, &r);
        let size = Some((16, 24));
        check_case(
            &g,
            f,
            &context,
            "latents_16x24",
            "ddim_16x24",
            SamplerKind::Ddim,
            size,
        );
    }
}

/// What SD 1.5 at 512 × 512 needs on lavapipe, at the fixture's size: its U-Net's 835 KB of
/// weights on a device whose buffers end at 256 KiB are split over several buffers (a sampling
/// store), and with bindings capped at 96 KiB the CLIP token table (830 × 32, 104 KiB) is read
/// in parts. The samples still equal diffusers'.
#[test]
fn a_pipeline_split_over_small_buffers_matches_stable_diffusion_pipeline() {
    let (source, text, r) = fixture();
    for g in capped_gpus(96 << 10, Some(256 << 10)) {
        let context = prompt_context(&g, &text, &r);
        let f = (&source, &text, &r);
        let buffers = check_case(&g, f, &context, "latents", "ddim", SamplerKind::Ddim, None);
        assert!(buffers >= 3, "the U-Net's weights sit in {buffers} buffers");
    }
}

/// A copy of the fixture pipeline in a scratch folder, with `edit` applied.
fn pipeline_copy(name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd_pipeline");
    let dst = std::env::temp_dir().join(format!("wgpu-diffusion-sd-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    for sub in ["", "unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(dst.join(sub)).unwrap();
        for e in std::fs::read_dir(src.join(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                std::fs::copy(&p, dst.join(sub).join(p.file_name().unwrap())).unwrap();
            }
        }
    }
    edit(&dst);
    dst
}

fn edit_json(path: &Path, key: &str, value: serde_json::Value) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v[key] = value;
    std::fs::write(path, v.to_string()).unwrap();
}

fn sample_fails(dir: &Path, extra: &[&str], needle: &str) {
    let out = std::env::temp_dir().join(format!("wgpu-diffusion-sd-out-{}", std::process::id()));
    let d = dir.to_str().unwrap();
    let o = out.to_str().unwrap();
    let (ok, stderr) = run_cli(&[&["sample", "--model", d, "--out", o], extra].concat());
    assert!(!ok, "{extra:?} on {d} should fail");
    assert!(stderr.contains(needle), "expected `{needle}` in:\n{stderr}");
}

/// `sample --model PIPELINE --prompt` as a user runs it, and a clear error for each input that
/// does not fit.
#[test]
fn sample_cli_takes_a_prompt_and_names_what_does_not_fit() {
    let dir = pipeline_copy("ok", |_| {});
    let out = dir.join("samples");
    let long = "seven ".repeat(90);
    let (d, o) = (dir.to_str().unwrap(), out.to_str().unwrap());
    let (ok, stderr) = run_cli(&[
        "sample", "--model", d, "--prompt", &long, "--num", "2", "--steps", "2", "--out", o,
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("truncated"), "{stderr}");
    assert!(out.join("grid.png").is_file() && out.join("00001.png").is_file());
    // --height/--width: a wide image, and a height the U-Net cannot halve back.
    let wide = dir.join("wide");
    let (ok, stderr) = run_cli(&[
        "sample",
        "--model",
        d,
        "--prompt",
        "a seven",
        "--num",
        "1",
        "--steps",
        "2",
        "--width",
        "24",
        "--height",
        "8",
        "--out",
        wide.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let img = image::open(wide.join("00000.png")).unwrap();
    assert_eq!((img.width(), img.height()), (24, 8));
    sample_fails(&dir, &["--prompt", "a", "--height", "18"], "--height 18");
    sample_fails(&dir, &[], "give --prompt");
    sample_fails(&dir, &["--prompt", "a seven", "--class", "3"], "--class");
    let eps = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/samplers/eps");
    sample_fails(&eps, &["--prompt", "a seven"], "no cross-attention");
    let no_tokenizer = pipeline_copy("no-tokenizer", |p| {
        std::fs::remove_dir_all(p.join("tokenizer")).unwrap()
    });
    sample_fails(&no_tokenizer, &["--prompt", "a"], "no tokenizer/");
    let small_vocab = pipeline_copy("vocab", |p| {
        edit_json(
            &p.join("text_encoder/config.json"),
            "vocab_size",
            100.into(),
        )
    });
    sample_fails(&small_vocab, &["--prompt", "a"], "does not fit");
    let width = pipeline_copy("width", |p| {
        edit_json(
            &p.join("text_encoder/config.json"),
            "hidden_size",
            16.into(),
        )
    });
    sample_fails(&width, &["--prompt", "a"], "cross_attention_dim");
    let sdxl = pipeline_copy("sdxl", |p| {
        let index = p.join("model_index.json");
        edit_json(
            &index,
            "text_encoder_2",
            serde_json::json!(["transformers", "CLIPTextModelWithProjection"]),
        )
    });
    sample_fails(&sdxl, &["--prompt", "a"], "second text encoder");
    let scheduler = pipeline_copy("scheduler", |p| {
        edit_json(
            &p.join("scheduler/scheduler_config.json"),
            "_class_name",
            "MysteryScheduler".into(),
        )
    });
    sample_fails(&scheduler, &["--prompt", "a"], "MysteryScheduler");
    for d in [dir, no_tokenizer, small_vocab, width, sdxl, scheduler] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A pipeline whose scheduler config is outdated (steps_offset 0, as our exports before
/// 2026-12-07 and old SD repositories have it) samples as StableDiffusionPipeline does, which
/// amends it to 1 when it is built: the same images as the diffusers-saved config (steps_offset
/// 1), with a note; DDIM chosen with --sampler starts from the amended config too.
#[test]
fn an_outdated_scheduler_config_is_amended_as_stable_diffusion_pipeline_does() {
    let current = pipeline_copy("offset-1", |_| {});
    let outdated = pipeline_copy("offset-0", |p| {
        edit_json(
            &p.join("scheduler/scheduler_config.json"),
            "steps_offset",
            0.into(),
        )
    });
    for sampler in ["pndm", "ddim"] {
        let run = |dir: &Path| {
            let out = dir.join(format!("samples-{sampler}"));
            let tensor = dir.join(format!("samples-{sampler}.safetensors"));
            let (ok, stderr) = run_cli(&[
                "sample",
                "--model",
                dir.to_str().unwrap(),
                "--prompt",
                "a seven",
                "--sampler",
                sampler,
                "--steps",
                "3",
                "--save-tensor",
                tensor.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ]);
            assert!(ok, "{stderr}");
            let tensors = LoadedTensors::read(&tensor).unwrap();
            (tensors.get("sample").unwrap().1, stderr)
        };
        let (want, quiet) = run(&current);
        let (got, noted) = run(&outdated);
        assert!(!quiet.contains("steps_offset"), "{quiet}");
        assert!(noted.contains("steps_offset 0 is set to 1"), "{noted}");
        let (worst, _) = max_diff(&got, &want);
        assert!(
            worst == 0.0,
            "{sampler}: the amended config samples differently (max |diff| {worst}; first values {:?} vs {:?})",
            &got[..4],
            &want[..4]
        );
    }
    for d in [current, outdated] {
        let _ = std::fs::remove_dir_all(d);
    }
}
