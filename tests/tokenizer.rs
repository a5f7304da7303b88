//! CLIP's tokenizer against transformers 5.23's `CLIPTokenizer` (tests/fixtures/tokenizer/,
//! written by tools/make_tokenizer_fixtures.py): the ids of 54 prompts (punctuation, digits,
//! accents, scripts, emoji, whitespace runs, special-token strings, over-long prompts), unpadded
//! and padded/truncated to 77 as a pipeline asks, from the files a Stable Diffusion repository
//! ships (vocab.json + merges.txt) and from the tokenizer.json transformers saved. Exact
//! equality: a tokenizer has no tolerance. No GPU needed.

use std::path::{Path, PathBuf};

use wgpu_diffusion::text::ClipTokenizer;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

struct Case {
    prompt: String,
    ids: Vec<u32>,
    padded: Vec<u32>,
}

fn cases() -> (serde_json::Value, Vec<Case>) {
    let text = std::fs::read_to_string(fixtures().join("ids.json")).unwrap();
    let j: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let cases = j["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            prompt: c["prompt"].as_str().unwrap().to_string(),
            ids: ids(&c["ids"]),
            padded: ids(&c["padded"]),
        })
        .collect();
    (j, cases)
}

fn check_layout(dir: &str) {
    let tok = ClipTokenizer::from_dir(&fixtures().join(dir)).unwrap();
    let (meta, cases) = cases();
    assert!(cases.len() >= 50, "{} prompts", cases.len());
    assert_eq!(
        tok.vocab_size() as u64,
        meta["vocab_size"].as_u64().unwrap()
    );
    assert_eq!(tok.pad_id as u64, meta["pad_token_id"].as_u64().unwrap());
    assert_eq!(
        tok.model_max_length as u64,
        meta["model_max_length"].as_u64().unwrap()
    );
    let mut wrong = Vec::new();
    for c in &cases {
        let ours = tok.encode(&c.prompt);
        if ours != c.ids {
            wrong.push(format!(
                "{:?}:\n  ours         {:?}\n  transformers {:?}",
                c.prompt, ours, c.ids
            ));
        }
        let model = tok.encode_for_model(&c.prompt);
        if model.ids != c.padded {
            wrong.push(format!(
                "{:?} (padded):\n  ours         {:?}\n  transformers {:?}",
                c.prompt, model.ids, c.padded
            ));
        }
        assert_eq!(
            model.dropped,
            c.ids.len().saturating_sub(77),
            "{:?}: dropped ids",
            c.prompt
        );
    }
    assert!(
        wrong.is_empty(),
        "{dir}: {} of {} encodings differ:\n{}",
        wrong.len(),
        2 * cases.len(),
        wrong.join("\n")
    );
}

#[test]
fn ids_equal_transformers_from_vocab_and_merges() {
    check_layout("sd_layout");
}

#[test]
fn ids_equal_transformers_from_the_tokenizer_json_it_saved() {
    check_layout("transformers_saved");
}

#[test]
fn bad_tokenizer_directories_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("wgpu-diffusion-tok-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let err = |d: &Path| format!("{:#}", ClipTokenizer::from_dir(d).err().expect("an error"));
    let e = err(&dir);
    assert!(e.contains("no tokenizer here"), "{e}");

    let src = fixtures().join("sd_layout");
    for f in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("merges.txt"), "#version: 0.2\nab\n").unwrap();
    let e = err(&dir);
    assert!(
        e.contains("merges.txt line 2") && e.contains("two symbols"),
        "{e}"
    );

    std::fs::copy(src.join("merges.txt"), dir.join("merges.txt")).unwrap();
    std::fs::write(
        dir.join("special_tokens_map.json"),
        r#"{"pad_token": "<pad>"}"#,
    )
    .unwrap();
    let e = err(&dir);
    assert!(
        e.contains("pad token \"<pad>\" is not in the vocabulary"),
        "{e}"
    );

    std::fs::write(dir.join("special_tokens_map.json"), "{not json").unwrap();
    let e = err(&dir);
    assert!(e.contains("special_tokens_map.json: not valid JSON"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tokenizer learned from captions: the same merges the fixture script's BPE learned from the
/// same corpus (so the same vocabulary file transformers loaded), written in SD 1.x's layout,
/// read back, and giving transformers' ids for every prompt.
#[test]
fn a_vocabulary_learned_from_captions_is_clips_format() {
    use wgpu_diffusion::text::learn_bpe::{learn_merges, write_tokenizer_dir};
    let corpus = std::fs::read_to_string(fixtures().join("corpus.txt")).unwrap();
    let merges = learn_merges(corpus.lines(), 1200);
    let fixture = std::fs::read_to_string(fixtures().join("sd_layout/merges.txt")).unwrap();
    let expected: Vec<(String, String)> = fixture
        .lines()
        .skip(1)
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            (a.to_string(), b.to_string())
        })
        .collect();
    let first_difference = merges.iter().zip(&expected).position(|(a, b)| a != b);
    assert!(
        merges == expected,
        "{} merges learned, {} in the fixture; first difference at {first_difference:?}",
        merges.len(),
        expected.len()
    );
    let dir = std::env::temp_dir().join(format!("wgpu-diffusion-bpe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_tokenizer_dir(&dir, &merges, 77).unwrap();
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    assert_eq!(
        read(&dir.join("vocab.json")),
        read(&fixtures().join("sd_layout/vocab.json")),
        "vocab.json"
    );
    let tok = ClipTokenizer::from_dir(&dir).unwrap();
    for c in cases().1 {
        assert_eq!(tok.encode(&c.prompt), c.ids, "{:?}", c.prompt);
    }
    // Learning stops when every word is one symbol: a limit above that changes nothing.
    assert_eq!(learn_merges(corpus.lines(), 100_000), merges);
    assert_eq!(learn_merges(corpus.lines(), 10), merges[..10].to_vec());
    let _ = std::fs::remove_dir_all(&dir);
}
