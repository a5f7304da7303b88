//! Text-to-image sampling against diffusers 0.42.1's `StableDiffusionPipeline`: a tiny random
//! pipeline diffusers saved (`tests/fixtures/sd_pipeline/`, SD 1.x's layout and component
//! classes, written by tools/make_sd_pipeline_fixtures.py). From the same initial latents, the
//! prompt "a handwritten seven" with the negative prompt "blurry" at guidance 7.5, 4 steps of
//! PNDM (the pipeline's own scheduler, SD 1.5's settings), DDIM and DPM-Solver++ 2M (from its
//! config): our prompt embeddings equal transformers' (relative L2 ≤ 1e-5), and the final
//! latents and decoded images equal diffusers' within issue 10's bound, max |ours − diffusers| ≤
//! 2e-3 · max(1, max |diffusers|) (measured values printed), on both GEMM paths.

use std::path::Path;

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

#[test]
fn prompt_to_image_matches_stable_diffusion_pipeline() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd_pipeline");
    let source = ModelSource::from_dir(&dir).unwrap();
    let text = TextConditioning::from_pipeline(&dir).unwrap().unwrap();
    text.check_fits(&source.config).unwrap();
    let r = LoadedTensors::read(&dir.join("results.safetensors")).unwrap();
    let meta = r.metadata();
    let steps: usize = meta["steps"].parse().unwrap();
    let guidance: f32 = meta["guidance_scale"].parse().unwrap();
    let (ls, latents) = r.get("latents").unwrap();
    let lshape = [ls[0], ls[1], ls[2], ls[3]];
    let latents = nchw_to_nhwc(&latents, lshape);
    for g in gemm_paths() {
        let encoder = text.load(&g, 2).unwrap();
        let prompts = [meta["prompt"].as_str(), meta["negative_prompt"].as_str()];
        assert!(encoder.encode(&prompts).unwrap().is_empty());
        let embeds = read(&g, encoder.output());
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
        let cond = out.view(0, &[1, row[0], row[1]], "prompt");
        let uncond = out.view(per, &[1, row[0], row[1]], "negative prompt");
        for (case, kind) in CASES {
            let schedule =
                SamplingSchedule::new(&source.scheduler, kind, steps, None, 0.0).unwrap();
            let options = SamplerOptions {
                guidance: Some(guidance),
                vae: source.vae.clone(),
                context_tokens: Some(text.context_tokens()),
                ..Default::default()
            };
            let mut sampler = Sampler::new(&g, &source.config, schedule, 1, &options).unwrap();
            sampler
                .set_weights(&source.weights(&sampler.unet.params).unwrap())
                .unwrap();
            sampler.set_context(&cond, Some(&uncond)).unwrap();
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
            let (di, _) = max_diff(&image, &r.get(&format!("image.{case}")).unwrap().1);
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
        }
    }
}
