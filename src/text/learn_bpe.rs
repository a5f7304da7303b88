//! A CLIP-format tokenizer learned from captions, for text-conditional models trained from
//! scratch: BPE merge learning (Sennrich et al. 2016, "Neural Machine Translation of Rare Words
//! with Subword Units", Algorithm 1) on the captions pre-tokenized as `CLIPTokenizer` does
//! (normalized, split with CLIP's pattern, byte symbols, `</w>` on each word's last symbol),
//! written as the files Stable Diffusion 1.x repositories ship (`vocab.json`, `merges.txt`,
//! `special_tokens_map.json`, `tokenizer_config.json`), which `CLIPTokenizer.from_pretrained`
//! and [`ClipTokenizer::from_dir`](super::ClipTokenizer::from_dir) load.
//!
//! Each round merges the most frequent adjacent pair (ties: the greatest pair in code-point
//! order) in every word, until `max_merges` or no pair is left. The vocabulary is laid out as
//! CLIP's: the 256 byte symbols in GPT-2's order, the same with `</w>`, one entry per merge, then
//! `<|startoftext|>` and `<|endoftext|>`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};

use super::clip_tokenizer::{BOS, END_OF_WORD, EOS, byte_symbols, clip_pattern, pre_tokenize};

/// The merges BPE learns from `lines`, in rank order.
pub fn learn_merges<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    max_merges: usize,
) -> Vec<(String, String)> {
    let (pattern, symbols) = (clip_pattern(), byte_symbols());
    let mut freq: HashMap<Vec<String>, usize> = HashMap::new();
    for line in lines {
        for piece in pre_tokenize(&pattern, &symbols, line) {
            let mut word: Vec<String> = piece.chars().map(String::from).collect();
            if let Some(last) = word.last_mut() {
                last.push_str(END_OF_WORD);
            }
            *freq.entry(word).or_default() += 1;
        }
    }
    let mut words: Vec<(Vec<String>, usize)> = freq.into_iter().collect();
    let mut merges = Vec::new();
    while merges.len() < max_merges {
        let mut pairs: HashMap<(&str, &str), usize> = HashMap::new();
        for (w, n) in &words {
            for p in w.windows(2) {
                *pairs.entry((&p[0], &p[1])).or_default() += n;
            }
        }
        let Some(best) = pairs
            .into_iter()
            .max_by(|a, b| (a.1, a.0).cmp(&(b.1, b.0)))
            .map(|((a, b), _)| (a.to_string(), b.to_string()))
        else {
            break;
        };
        for (w, _) in &mut words {
            let mut out = Vec::with_capacity(w.len());
            let mut i = 0;
            while i < w.len() {
                if i + 1 < w.len() && w[i] == best.0 && w[i + 1] == best.1 {
                    out.push(format!("{}{}", w[i], w[i + 1]));
                    i += 2;
                } else {
                    out.push(std::mem::take(&mut w[i]));
                    i += 1;
                }
            }
            *w = out;
        }
        merges.push(best);
    }
    merges
}

/// The vocabulary CLIP lays out for `merges`, in id order.
pub fn clip_vocabulary(merges: &[(String, String)]) -> Vec<String> {
    let symbols = byte_symbols();
    // GPT-2's order: the printable bytes ascending, then the others ascending.
    let printable = |b: usize| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let order: Vec<usize> = (0..256)
        .filter(|&b| printable(b))
        .chain((0..256).filter(|&b| !printable(b)))
        .collect();
    let base: Vec<String> = order.iter().map(|&b| symbols[b].to_string()).collect();
    let mut vocab = base.clone();
    vocab.extend(base.iter().map(|s| format!("{s}{END_OF_WORD}")));
    vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    vocab.push(BOS.into());
    vocab.push(EOS.into());
    vocab
}

/// Writes a tokenizer directory in Stable Diffusion 1.x's layout for `merges`: pad token
/// `<|endoftext|>`, `model_max_length` as given. Files are written whole (a temporary name, then
/// a rename), so an interrupted write leaves no torn file.
pub fn write_tokenizer_dir(
    dir: &Path,
    merges: &[(String, String)],
    model_max_length: usize,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, text) in tokenizer_files(merges, model_max_length)? {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The files of [`write_tokenizer_dir`], by name, in memory.
pub fn tokenizer_files(
    merges: &[(String, String)],
    model_max_length: usize,
) -> Result<Vec<(&'static str, String)>> {
    let vocab = clip_vocabulary(merges);
    let entries: Vec<String> = vocab
        .iter()
        .enumerate()
        .map(|(id, t)| format!("{}: {id}", serde_json::Value::from(t.as_str())))
        .collect();
    let mut merges_txt = String::from("#version: 0.2\n");
    for (a, b) in merges {
        merges_txt.push_str(&format!("{a} {b}\n"));
    }
    let special = |t: &str| serde_json::json!({"content": t, "lstrip": false, "normalized": true, "rstrip": false, "single_word": false});
    let map = serde_json::json!({
        "bos_token": special(BOS),
        "eos_token": special(EOS),
        "pad_token": EOS,
        "unk_token": special(EOS),
    });
    let config = serde_json::json!({
        "add_prefix_space": false,
        "bos_token": special(BOS),
        "do_lower_case": true,
        "eos_token": special(EOS),
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": special(EOS),
    });
    let files = [
        ("vocab.json", format!("{{{}}}", entries.join(", "))),
        ("merges.txt", merges_txt),
        (
            "special_tokens_map.json",
            serde_json::to_string_pretty(&map)?,
        ),
        (
            "tokenizer_config.json",
            serde_json::to_string_pretty(&config)?,
        ),
    ];
    Ok(files.into())
}

/// The tokenizer [`write_tokenizer_dir`] would write for `merges`, without the files: what
/// `ClipTokenizer::from_dir` reads back from them (pad token `<|endoftext|>`).
pub fn learned_tokenizer(
    merges: &[(String, String)],
    model_max_length: usize,
) -> Result<super::ClipTokenizer> {
    let vocab = clip_vocabulary(merges)
        .into_iter()
        .enumerate()
        .map(|(id, t)| (t, id as u32))
        .collect();
    super::ClipTokenizer::new(vocab, merges.to_vec(), EOS, model_max_length)
}
