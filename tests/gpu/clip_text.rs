//! The CLIP text encoder against transformers 5.23's `CLIPTextModel`: two small random models
//! transformers saved (`tests/fixtures/clip/`: quick_gelu as SD 1.x's encoder, gelu as SD 2.x's;
//! written by tools/make_clip_fixtures.py) over the tokenizer fixture's vocabulary. Our tokenizer
//! gives the fixture's ids for its two prompts, and our `last_hidden_state` for them matches
//! transformers' on both GEMM paths: relative L2 ≤ 1e-5 and max |diff| ≤ 1e-4 · max|ref| (two
//! layers of f32 GEMMs, LayerNorms and softmaxes; measured errors are printed).

use std::path::Path;

use crate::common::*;
use wgpu_diffusion::io::tensors::LoadedTensors;
use wgpu_diffusion::nn::clip_text::{ClipTextConfig, ClipTextModel};
use wgpu_diffusion::text::ClipTokenizer;

fn check(name: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let dir = root.join("clip").join(name);
    let config =
        ClipTextConfig::from_json(&std::fs::read_to_string(dir.join("config.json")).unwrap())
            .unwrap();
    let weights = LoadedTensors::read(&dir.join("model.safetensors")).unwrap();
    let results = LoadedTensors::read(&dir.join("results.safetensors")).unwrap();
    let (_, ids) = results.get("input_ids").unwrap();
    let ids: Vec<u32> = ids.iter().map(|&v| v as u32).collect();
    let tokenizer = ClipTokenizer::from_dir(&root.join("tokenizer/sd_layout")).unwrap();
    let prompts = results.metadata()["prompts"].clone();
    let ours_ids: Vec<u32> = prompts
        .lines()
        .flat_map(|p| tokenizer.encode_for_model(p).ids)
        .collect();
    assert_eq!(ours_ids, ids, "{name}: tokenizer ids");
    let (_, expected) = results.get("last_hidden_state").unwrap();
    for g in gemm_paths() {
        let model = ClipTextModel::new(&g, &config, 2).unwrap();
        let flat = model.weights(|n| weights.get(n).ok()).unwrap();
        g.write(&model.params.params, &flat).unwrap();
        model.set_input_ids(&g, &ids).unwrap();
        run(&g, |rec| model.forward(rec).unwrap());
        let ours = read(&g, &model.last_hidden_state);
        let err = rel_l2(&ours, &expected);
        let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = ours
            .iter()
            .zip(&expected)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!(
            "clip text {name} ({}): relative L2 {err:.2e}, max |diff| {worst:.2e} (max |ref| {scale:.3})",
            g.gemm_path
        );
        assert!(
            err <= 1e-5 && worst <= 1e-4 * scale,
            "{name} on {}: relative L2 {err:e}, max |diff| {worst:e}\n  ours[..6] = {:?}\n  transformers[..6] = {:?}",
            g.gemm_path,
            &ours[..6],
            &expected[..6]
        );
    }
}

#[test]
fn last_hidden_state_matches_transformers_quick_gelu() {
    check("quick_gelu");
}

#[test]
fn last_hidden_state_matches_transformers_gelu() {
    check("gelu");
}

#[test]
fn bad_configs_ids_and_weights_are_named() {
    let e = ClipTextConfig::from_json(r#"{"model_type": "bert"}"#).unwrap_err();
    assert!(e.contains("not a CLIP text encoder"), "{e}");
    let e = ClipTextConfig::from_json(r#"{"hidden_act": "relu"}"#).unwrap_err();
    assert!(e.contains("hidden_act `relu`"), "{e}");
    let e =
        ClipTextConfig::from_json(r#"{"hidden_size": 30, "num_attention_heads": 4}"#).unwrap_err();
    assert!(e.contains("multiple of num_attention_heads"), "{e}");
    let g = gpu();
    let config = ClipTextConfig::from_json(
        r#"{"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 4}"#,
    )
    .unwrap();
    let model = ClipTextModel::new(&g, &config, 1).unwrap();
    let e = model
        .set_input_ids(&g, &[0, 1, 2, 10])
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the text encoder's vocabulary"), "{e}");
    let e = model.weights(|_| None).unwrap_err();
    assert!(
        e.contains("`embeddings.token_embedding.weight` is missing"),
        "{e}"
    );
}
