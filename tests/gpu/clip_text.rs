//! The CLIP text encoder against transformers 5.23's `CLIPTextModel`: two small random models
//! transformers saved (`tests/fixtures/clip/`: quick_gelu as SD 1.x's encoder, gelu as SD 2.x's;
//! written by tools/make_clip_fixtures.py) over the tokenizer fixture's vocabulary. Our tokenizer
//! gives the fixture's ids for its two prompts, and our `last_hidden_state` for them matches
//! transformers' on both GEMM paths: relative L2 ≤ 1e-5 and max |diff| ≤ 1e-4 · max|ref| (two
//! layers of f32 GEMMs, LayerNorms and softmaxes; measured errors are printed). The backward (a
//! text encoder trained jointly with the U-Net) gives transformers' gradient of
//! Σ last_hidden_state · w for every parameter: relative L2 ≤ 1e-5, and `k_proj.bias`, whose
//! gradient is analytically zero (softmax is shift-invariant along keys), ≤ 1e-6 · the largest
//! |gradient| of its `k_proj.weight`.

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
        model.params.write_values(&g, &flat).unwrap();
        model.set_input_ids(&g, &ids).unwrap();
        let (_, w) = results.get("loss_weight").unwrap();
        let d_last = g.tensor(model.last_hidden_state.shape(), "d last");
        g.write(&d_last, &w).unwrap();
        g.write(&model.params.grads, &vec![0.0; model.params.len])
            .unwrap();
        run(&g, |rec| {
            model.forward(rec).unwrap();
            model.backward(rec, &d_last).unwrap();
        });
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
        check_grads(
            name,
            &g.gemm_path.to_string(),
            &model,
            &read(&g, &model.params.grads),
            &results,
        );
    }
}

fn check_grads(
    name: &str,
    path: &str,
    model: &ClipTextModel,
    grads: &[f32],
    results: &LoadedTensors,
) {
    let mut worst = (String::new(), 0.0f64);
    for (spec, ours) in model.params.unflatten(grads) {
        let (_, r) = results.get(&format!("grad.{}", spec.name)).unwrap();
        if spec.name.ends_with("k_proj.bias") {
            let m = ours.iter().fold(0f32, |m, v| m.max(v.abs()));
            // Rounding noise only (transformers' own is ~1e-6): bounded by the weight's scale.
            let weight = spec.name.replace(".bias", ".weight");
            let (_, rw) = results.get(&format!("grad.{weight}")).unwrap();
            let scale = rw.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                m <= 1e-6 * scale,
                "{name}: grad.{} max |g| {m:e}",
                spec.name
            );
            continue;
        }
        let e = rel_l2(ours, &r);
        assert!(
            e <= 1e-5,
            "{name} on {path}: grad.{} relative L2 {e:e}\n  ours[..4] = {:?}\n  transformers[..4] = {:?}",
            spec.name,
            &ours[..4.min(ours.len())],
            &r[..4.min(r.len())]
        );
        if e > worst.1 {
            worst = (spec.name.clone(), e);
        }
    }
    eprintln!(
        "clip text {name} ({path}): worst gradient {} relative L2 {:.2e}",
        worst.0, worst.1
    );
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
