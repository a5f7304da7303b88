//! Hostile files: the regression cases of the loader fuzzer, and damaged variants of a model
//! directory diffusers wrote, each refused with a message naming the file and the problem —
//! never a panic — while the untouched control trains a step.

use std::path::{Path, PathBuf};

use wgpu_diffusion::nn::UNetConfig;
use wgpu_diffusion::robustness::{LoaderFixture, TARGETS, exercise};

use crate::common::*;

fn fixture_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/samplers/eps")
}

/// Every input the fuzzer (examples/fuzz_loaders.rs) found a panic, hang or oversized
/// allocation with runs through the same loaders again, and is refused.
#[test]
fn fuzz_findings_stay_fixed() {
    let g = gpu();
    let cfg = UNetConfig::from_json(
        &std::fs::read_to_string(fixture_model().join("config.json")).unwrap(),
    )
    .unwrap();
    let fx = LoaderFixture::new(&g, &cfg).unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no regression cases in {}",
        dir.display()
    );
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let target = TARGETS
            .iter()
            .find(|t| name.starts_with(&format!("{t}-")))
            .unwrap_or_else(|| panic!("{name}: the file name must start with a target"));
        let input = std::fs::read(f).unwrap();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            exercise(target, &input, &fx)
        }));
        assert!(outcome.is_ok(), "{name}: the {target} loaders panicked");
        // These inputs are all invalid: the first loader refuses them.
        let text = String::from_utf8_lossy(&input);
        let refused = match *target {
            "config" => UNetConfig::from_json(&text).is_err(),
            "scheduler" => {
                wgpu_diffusion::diffusion::scheduler::SchedulerConfig::from_json(&text).is_err()
            }
            _ => true,
        };
        assert!(refused, "{name} was accepted");
    }
}

type Header = serde_json::Map<String, serde_json::Value>;

/// A safetensors file as (header JSON, data), to damage one part and write it back.
fn split_safetensors(bytes: &[u8]) -> (Header, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header.as_object().unwrap().clone(), bytes[8 + n..].to_vec())
}

fn join_safetensors(header: &Header, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

/// The tensor whose data starts at offset 0 (the first in the data section).
fn first_tensor(header: &Header) -> String {
    header
        .iter()
        .find(|(k, v)| *k != "__metadata__" && v["data_offsets"][0] == 0)
        .map(|(k, _)| k.clone())
        .unwrap()
}

#[test]
fn hostile_model_directories_are_refused_by_name() {
    let root = std::env::temp_dir().join(format!("wgpu-diffusion-hostile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let weights =
        std::fs::read(fixture_model().join("diffusion_pytorch_model.safetensors")).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture_model().join("config.json")).unwrap())
            .unwrap();
    const W: &str = "diffusion_pytorch_model.safetensors";
    const C: &str = "config.json";

    // (name, weights bytes or None to delete, config text, file the message must name, words
    // that must appear in it)
    type Variant = (
        &'static str,
        Option<Vec<u8>>,
        String,
        &'static str,
        &'static [&'static str],
    );
    let cfg_text = serde_json::to_string_pretty(&config).unwrap();
    let with_config = |f: &dyn Fn(&mut Header)| {
        let mut c = config.as_object().unwrap().clone();
        f(&mut c);
        serde_json::to_string(&c).unwrap()
    };
    let with_header = |f: &dyn Fn(&mut Header, &mut Vec<u8>)| {
        let (mut h, mut d) = split_safetensors(&weights);
        f(&mut h, &mut d);
        join_safetensors(&h, &d)
    };
    let first = first_tensor(&split_safetensors(&weights).0);
    let mut variants: Vec<Variant> = vec![
        (
            "empty weights",
            Some(Vec::new()),
            cfg_text.clone(),
            W,
            &["not a valid safetensors"],
        ),
        (
            "truncated weights",
            Some(weights[..weights.len() / 2].to_vec()),
            cfg_text.clone(),
            W,
            &["truncated or corrupt"],
        ),
        (
            "huge header length",
            Some({
                let mut w = weights.clone();
                w[..8].copy_from_slice(&u64::MAX.to_le_bytes());
                w
            }),
            cfg_text.clone(),
            W,
            &["not a valid safetensors"],
        ),
        (
            "header length past the end",
            Some({
                let mut w = weights.clone();
                w[..8].copy_from_slice(&(weights.len() as u64).to_le_bytes());
                w
            }),
            cfg_text.clone(),
            W,
            &["not a valid safetensors"],
        ),
        (
            "header not JSON",
            Some({
                let mut w = weights.clone();
                for b in &mut w[8..40] {
                    *b = b'#';
                }
                w
            }),
            cfg_text.clone(),
            W,
            &["not a valid safetensors"],
        ),
        (
            "offsets past the end",
            Some(with_header(&|h, _| {
                h[&first]["data_offsets"][1] = serde_json::json!(1u64 << 40);
            })),
            cfg_text.clone(),
            W,
            &["not a valid safetensors"],
        ),
        (
            "overlapping offsets",
            Some(with_header(&|h, _| {
                let end = h[&first]["data_offsets"][1].as_u64().unwrap();
                h[&first]["data_offsets"][1] = serde_json::json!(end + 4);
            })),
            cfg_text.clone(),
            W,
            &["not a valid safetensors"],
        ),
        (
            "wrong dtype",
            Some(with_header(&|h, _| {
                h[&first]["dtype"] = serde_json::json!("I32");
            })),
            cfg_text.clone(),
            W,
            &["dtype", "I32"],
        ),
        (
            "wrong shape, same byte count",
            Some(with_header(&|h, _| {
                let n: u64 = h["conv_in.weight"]["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap())
                    .product();
                h["conv_in.weight"]["shape"] = serde_json::json!([n]);
            })),
            cfg_text.clone(),
            W,
            &["conv_in.weight", "shape"],
        ),
        (
            "shape product overflows",
            Some(with_header(&|h, _| {
                h[&first]["shape"] = serde_json::json!([1u64 << 32, 1u64 << 32, 16]);
            })),
            cfg_text.clone(),
            W,
            &["not a valid safetensors"],
        ),
        (
            "missing tensor",
            Some({
                let st = safetensors::SafeTensors::deserialize(&weights).unwrap();
                let kept: Vec<_> = st
                    .tensors()
                    .into_iter()
                    .filter(|(n, _)| n != "conv_out.bias")
                    .collect();
                safetensors::serialize(kept, None).unwrap()
            }),
            cfg_text.clone(),
            W,
            &["conv_out.bias", "missing"],
        ),
        (
            "unknown tensor",
            Some({
                let st = safetensors::SafeTensors::deserialize(&weights).unwrap();
                let extra = [0u8; 8];
                let mut all = st.tensors();
                all.push((
                    "extra.weight".into(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &extra)
                        .unwrap(),
                ));
                safetensors::serialize(all, None).unwrap()
            }),
            cfg_text.clone(),
            W,
            &["extra.weight"],
        ),
        (
            "NaN weights",
            Some(with_header(&|_, d| {
                d[..4].copy_from_slice(&f32::NAN.to_le_bytes());
            })),
            cfg_text.clone(),
            "",
            &["non-finite", "`"],
        ),
        ("missing weights", None, cfg_text.clone(), W, &[]),
        (
            "config not JSON",
            Some(weights.clone()),
            "{\"sample_size\": 8,".into(),
            C,
            &["JSON"],
        ),
        (
            "config without a needed key",
            Some(weights.clone()),
            with_config(&|c| {
                // diffusers' default (4 levels) then disagrees with the block types.
                c.remove("block_out_channels");
            }),
            C,
            &["block_out_channels"],
        ),
        (
            "config value of the wrong type",
            Some(weights.clone()),
            with_config(&|c| {
                c.insert("sample_size".into(), serde_json::json!("eight"));
            }),
            C,
            &["sample_size"],
        ),
        (
            "unsupported value",
            Some(weights.clone()),
            with_config(&|c| {
                c.insert("act_fn".into(), serde_json::json!("gelu"));
            }),
            C,
            &["act_fn", "gelu"],
        ),
        (
            "config and weights disagree",
            Some(weights.clone()),
            with_config(&|c| {
                c.insert("block_out_channels".into(), serde_json::json!([16, 48]));
            }),
            W,
            &["shape"],
        ),
        (
            "groups do not divide channels",
            Some(weights.clone()),
            with_config(&|c| {
                c.insert("norm_num_groups".into(), serde_json::json!(7));
            }),
            C,
            &["norm_num_groups", "divisible"],
        ),
        (
            "huge sizes",
            Some(weights.clone()),
            with_config(&|c| {
                c.insert(
                    "block_out_channels".into(),
                    serde_json::json!([16, 1u64 << 40]),
                );
            }),
            C,
            &["block_out_channels"],
        ),
    ];
    // The control: the same directory untouched.
    variants.push(("control", Some(weights.clone()), cfg_text.clone(), "", &[]));
    assert!(variants.len() >= 16);

    for (name, w, c, file, words) in &variants {
        let dir = root.join(name.replace([' ', ','], "-"));
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(w) = w {
            std::fs::write(dir.join(W), w).unwrap();
        }
        std::fs::write(dir.join(C), c).unwrap();
        std::fs::copy(
            fixture_model().join("scheduler_config.json"),
            dir.join("scheduler_config.json"),
        )
        .unwrap();
        let out = root.join(format!("{}-run", name.replace([' ', ','], "-")));
        let (ok, err) = run_cli(&[
            "train",
            "--init",
            dir.to_str().unwrap(),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--sample-every",
            "0",
            "--out",
            out.to_str().unwrap(),
        ]);
        if *name == "control" {
            assert!(ok, "the untouched model directory failed to train:\n{err}");
            continue;
        }
        assert!(!ok, "{name}: accepted\n{err}");
        let last = err
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        let needle = if file.is_empty() {
            dir.display().to_string()
        } else {
            dir.join(file).display().to_string()
        };
        let dir_text = dir.display().to_string();
        assert!(
            last.contains(&needle)
                || (last.contains(&dir_text) && (file.is_empty() || last.contains(file)))
                || (file.is_empty() && last.contains(W)),
            "{name}: the message does not name {needle}:\n{last}"
        );
        for w in *words {
            assert!(last.contains(w), "{name}: the message lacks `{w}`:\n{last}");
        }
        assert!(
            !out.join("checkpoints").exists(),
            "{name}: a run folder was created for a refused model"
        );
    }
    let _ = std::fs::remove_dir_all(&root);
}
