//! `nn::transformer::Transformer2D` against diffusers 0.42.1's `Transformer2DModel`: two small
//! random models diffusers saved (`tests/fixtures/transformer2d/`, written by
//! tools/make_transformer_fixtures.py): 1×1-conv projections with one block (SD 1.x) and linear
//! projections with two (SD 2.x); 3 heads of width 8, 15 query tokens, 7 context tokens of width
//! 20. Output, the input's and the context's gradients and every parameter's gradient of
//! Σ sample · w match on both GEMM paths: relative L2 ≤ 1e-5 (measured: ≤ 6e-7).

use std::path::Path;

use serde_json::Value;

use crate::common::*;
use wgpu_diffusion::io::tensors::LoadedTensors;
use wgpu_diffusion::nn::layers::ParamDecls;
use wgpu_diffusion::nn::transformer::{Transformer2D, TransformerSettings};
use wgpu_diffusion::nn::{Act, GradTracker, ParamStore};
use wgpu_diffusion::sample::{nchw_to_nhwc, nhwc_to_nchw};

fn settings(config: &Value) -> TransformerSettings {
    let get = |k: &str| config[k].as_u64().unwrap() as usize;
    TransformerSettings {
        heads: get("num_attention_heads"),
        head_dim: get("attention_head_dim"),
        context_dim: get("cross_attention_dim"),
        layers: get("num_layers"),
        groups: get("norm_num_groups"),
        linear_projection: config["use_linear_projection"].as_bool().unwrap(),
    }
}

fn check_close(what: &str, ours: &[f32], reference: &[f32]) -> f64 {
    let e = rel_l2(ours, reference);
    assert!(
        e <= 1e-5,
        "{what}: relative L2 {e:e}\n  ours[..4] = {:?}\n  diffusers[..4] = {:?}",
        &ours[..4.min(ours.len())],
        &reference[..4.min(reference.len())]
    );
    e
}

fn check(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/transformer2d")
        .join(name);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let s = settings(&config);
    let weights = LoadedTensors::read(&dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let r = LoadedTensors::read(&dir.join("results.safetensors")).unwrap();
    let (xs, x) = r.get("x").unwrap();
    let (cs, context) = r.get("encoder_hidden_states").unwrap();
    let nchw = [xs[0], xs[1], xs[2], xs[3]];
    let nhwc = [xs[0], xs[2], xs[3], xs[1]];
    for g in gemm_paths() {
        let mut decls = ParamDecls::default();
        let model = Transformer2D::new(&g, &mut decls, "t", &nhwc, cs[1], &s);
        let store = ParamStore::new(&g, &decls.0).unwrap();
        let flat = store
            .flatten(|spec| {
                let name = spec.name.strip_prefix("t.").unwrap();
                let (shape, v) = weights.get(name).map_err(|e| e.to_string())?;
                assert_eq!(shape, spec.shape, "{name}");
                Ok(v)
            })
            .unwrap();
        store.write_values(&g, &flat).unwrap();
        g.write(&store.grads, &vec![0.0; store.len]).unwrap();
        let x_act = Act::new(&g, &nhwc, "x");
        let out = Act::new(&g, &nhwc, "out");
        let ctx = Act::new(&g, &[cs[0] * cs[1], cs[2]], "context");
        g.write(&x_act.value, &nchw_to_nhwc(&x, nchw)).unwrap();
        g.write(&ctx.value, &context).unwrap();
        let (_, w) = r.get("loss_weight").unwrap();
        g.write(&out.grad, &nchw_to_nhwc(&w, nchw)).unwrap();
        run(&g, |rec| {
            model
                .forward(rec, &store, &x_act, &ctx.value, &out)
                .unwrap();
            let mut gt = GradTracker::default();
            model
                .backward(rec, &store, &mut gt, (&x_act, &ctx), &out)
                .unwrap();
        });
        let path = g.gemm_path.to_string();
        let sample = nhwc_to_nchw(&read(&g, &out.value), nhwc);
        let e_out = check_close(
            &format!("{name} {path} sample"),
            &sample,
            &r.get("sample").unwrap().1,
        );
        let dx = nhwc_to_nchw(&read(&g, &x_act.grad), nhwc);
        let e_dx = check_close(
            &format!("{name} {path} grad.x"),
            &dx,
            &r.get("grad.x").unwrap().1,
        );
        let dctx = read(&g, &ctx.grad);
        let reference = r.get("grad.encoder_hidden_states").unwrap().1;
        let e_ctx = check_close(&format!("{name} {path} grad.context"), &dctx, &reference);
        let grads = read(&g, &store.grads);
        let mut worst = (String::new(), 0.0);
        for (spec, ours) in store.unflatten(&grads) {
            let n = spec.name.strip_prefix("t.").unwrap();
            let (_, reference) = r.get(&format!("grad.{n}")).unwrap();
            let e = check_close(&format!("{name} {path} grad.{n}"), ours, &reference);
            if e > worst.1 {
                worst = (n.to_string(), e);
            }
        }
        eprintln!(
            "transformer2d {name} ({path}): sample {e_out:.2e}, grad.x {e_dx:.2e}, grad.context {e_ctx:.2e}, worst parameter {} {:.2e}",
            worst.0, worst.1
        );
    }
}

#[test]
fn transformer2d_matches_diffusers_conv_projection() {
    check("conv_proj");
}

#[test]
fn transformer2d_matches_diffusers_linear_projection() {
    check("linear_proj");
}
