//! CLIP's byte-level BPE tokenizer, as transformers 5's `CLIPTokenizer` (tokenizers backend)
//! runs it:
//!
//! 1. the special tokens `<|startoftext|>` and `<|endoftext|>` written in the text are taken out
//!    first and become their own ids;
//! 2. the rest is normalized: Unicode NFC, every whitespace run to one space, lower case;
//! 3. pre-tokenized with CLIP's pattern (contractions, letter runs, single digits, runs of other
//!    non-space characters; whitespace dropped), each piece's UTF-8 bytes mapped to GPT-2's 256
//!    printable byte symbols;
//! 4. each piece is BPE-merged (Sennrich et al. 2016): its symbols, the last one carrying `</w>`,
//!    repeatedly merge the adjacent pair of lowest rank in `merges.txt` until none applies;
//!    every resulting symbol is a vocabulary id (the unknown token's when absent);
//! 5. `<|startoftext|>` … `<|endoftext|>` around the ids; for the text encoder, at most
//!    `model_max_length` ids (the content cut to leave room for both) padded with the pad token.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use regex::Regex;
use unicode_normalization::UnicodeNormalization;

/// CLIP's pre-tokenizer pattern (transformers' `CLIPTokenizer`).
const PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
pub(crate) const BOS: &str = "<|startoftext|>";
pub(crate) const EOS: &str = "<|endoftext|>";
pub(crate) const END_OF_WORD: &str = "</w>";
/// transformers' default when a tokenizer config gives no (or an unset) `model_max_length`.
const DEFAULT_MAX_LENGTH: usize = 77;

/// Token text → id.
type Vocab = HashMap<String, u32>;
/// Symbol pairs in merge order (rank = position).
type Merges = Vec<(String, String)>;

/// A prompt's ids for the text encoder, and whether it was cut to fit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Ids the prompt had beyond `model_max_length` (dropped; 0 when it fit).
    pub dropped: usize,
}

/// CLIP's tokenizer: vocabulary, merge ranks and special tokens.
#[derive(Clone)]
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: u32,
    unk_id: u32,
    pub model_max_length: usize,
    pattern: Regex,
    byte_symbols: [char; 256],
}

/// GPT-2's (and CLIP's) map of the 256 byte values to printable characters: printable Latin-1
/// bytes map to themselves, the others to U+0100 onwards in byte order.
pub(crate) fn byte_symbols() -> [char; 256] {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut out = ['\0'; 256];
    let mut next = 256;
    for b in 0..256u32 {
        out[b as usize] = if printable(b) {
            char::from_u32(b).expect("Latin-1")
        } else {
            next += 1;
            char::from_u32(next - 1).expect("below U+0200")
        };
    }
    out
}

/// Steps 2 and 3 of the module's list: the text normalized (NFC, whitespace runs to one space,
/// lower case), split with CLIP's pattern, each piece's bytes as byte symbols.
pub(crate) fn pre_tokenize(pattern: &Regex, symbols: &[char; 256], text: &str) -> Vec<String> {
    let nfc: String = text.nfc().collect();
    let spaced = nfc.split_whitespace().collect::<Vec<_>>().join(" ");
    let lower = spaced.to_lowercase();
    pattern
        .find_iter(&lower)
        .map(|piece| {
            piece
                .as_str()
                .bytes()
                .map(|b| symbols[b as usize])
                .collect()
        })
        .collect()
}

/// CLIP's pre-tokenizer pattern, compiled.
pub(crate) fn clip_pattern() -> Regex {
    Regex::new(PATTERN).expect("CLIP's pattern compiles")
}

/// A special token's text in a tokenizer config: a string or `{"content": …}`.
fn token_text(v: &serde_json::Value) -> Option<String> {
    v.as_str()
        .map(str::to_string)
        .or_else(|| v.get("content")?.as_str().map(str::to_string))
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

impl ClipTokenizer {
    /// Reads a tokenizer directory: `vocab.json` + `merges.txt` (as Stable Diffusion 1.x
    /// repositories ship it) or `tokenizer.json` (what transformers 5 saves), with the pad token
    /// and `model_max_length` of `special_tokens_map.json` / `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<ClipTokenizer> {
        let (vocab, merges) = if dir.join("vocab.json").is_file() {
            Self::read_vocab_merges(dir)?
        } else if dir.join("tokenizer.json").is_file() {
            Self::read_tokenizer_json(&dir.join("tokenizer.json"))?
        } else {
            bail!(
                "{}: no tokenizer here (expected vocab.json and merges.txt, or tokenizer.json)",
                dir.display()
            );
        };
        let mut pad = EOS.to_string();
        let mut max_length = DEFAULT_MAX_LENGTH;
        let config = dir.join("tokenizer_config.json");
        if config.is_file() {
            let c = read_json(&config)?;
            if let Some(p) = c.get("pad_token").and_then(token_text) {
                pad = p;
            }
            // transformers writes a huge sentinel when the length is unset.
            if let Some(n) = c.get("model_max_length").and_then(|v| v.as_f64())
                && (2.0..=1e6).contains(&n)
            {
                max_length = n as usize;
            }
        }
        let map = dir.join("special_tokens_map.json");
        if map.is_file()
            && let Some(p) = read_json(&map)?.get("pad_token").and_then(token_text)
        {
            pad = p;
        }
        Self::new(vocab, merges, &pad, max_length).with_context(|| format!("{}", dir.display()))
    }

    fn read_vocab_merges(dir: &Path) -> Result<(Vocab, Merges)> {
        let vocab_path = dir.join("vocab.json");
        let vocab: HashMap<String, u32> = serde_json::from_value(read_json(&vocab_path)?)
            .with_context(|| format!("{}: expected {{token: id}}", vocab_path.display()))?;
        let merges_path = dir.join("merges.txt");
        let text = std::fs::read_to_string(&merges_path)
            .with_context(|| format!("reading {}", merges_path.display()))?;
        let mut merges = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
                continue;
            }
            let (a, b) = line.split_once(' ').ok_or_else(|| {
                anyhow!(
                    "{} line {}: expected two symbols separated by a space, found {line:?}",
                    merges_path.display(),
                    i + 1
                )
            })?;
            merges.push((a.to_string(), b.to_string()));
        }
        Ok((vocab, merges))
    }

    fn read_tokenizer_json(path: &Path) -> Result<(Vocab, Merges)> {
        let j = read_json(path)?;
        let model = j
            .get("model")
            .ok_or_else(|| anyhow!("{}: no `model`", path.display()))?;
        let kind = model.get("type").and_then(|t| t.as_str()).unwrap_or("");
        let suffix = model.get("end_of_word_suffix").and_then(|t| t.as_str());
        if kind != "BPE" || suffix != Some(END_OF_WORD) {
            bail!(
                "{}: a {kind:?} model with end_of_word_suffix {suffix:?} is not CLIP's tokenizer (BPE with `</w>`)",
                path.display()
            );
        }
        let mut vocab: HashMap<String, u32> = serde_json::from_value(
            model.get("vocab").cloned().unwrap_or_default(),
        )
        .with_context(|| format!("{}: model.vocab must be {{token: id}}", path.display()))?;
        // Special tokens live in `added_tokens` (ids beside the BPE vocabulary).
        for t in j
            .get("added_tokens")
            .and_then(|a| a.as_array())
            .into_iter()
            .flatten()
        {
            if let (Some(text), Some(id)) = (token_text(t), t.get("id").and_then(|i| i.as_u64())) {
                vocab.insert(text, id as u32);
            }
        }
        let merges = model
            .get("merges")
            .and_then(|m| m.as_array())
            .ok_or_else(|| anyhow!("{}: no model.merges", path.display()))?
            .iter()
            .map(|m| {
                // ["a", "b"] (tokenizers ≥ 0.20) or "a b" (older files).
                let pair = match m {
                    serde_json::Value::String(s) => s
                        .split_once(' ')
                        .map(|(a, b)| (a.to_string(), b.to_string())),
                    serde_json::Value::Array(v) if v.len() == 2 => {
                        token_text(&v[0]).zip(token_text(&v[1]))
                    }
                    _ => None,
                };
                pair.ok_or_else(|| anyhow!("{}: a merge is not a pair: {m}", path.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((vocab, merges))
    }

    /// A tokenizer from its vocabulary, its merges in rank order, the pad token's text and the
    /// text encoder's context length.
    pub fn new(
        vocab: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        pad_token: &str,
        model_max_length: usize,
    ) -> Result<ClipTokenizer> {
        let id = |t: &str, role: &str| {
            vocab.get(t).copied().ok_or_else(|| {
                anyhow!(
                    "the {role} token {t:?} is not in the vocabulary ({} entries)",
                    vocab.len()
                )
            })
        };
        let (bos_id, eos_id) = (id(BOS, "start")?, id(EOS, "end")?);
        let pad_id = id(pad_token, "pad")?;
        if model_max_length < 2 {
            bail!(
                "model_max_length {model_max_length} leaves no room for the start and end tokens"
            );
        }
        let ranks = merges
            .into_iter()
            .enumerate()
            .map(|(rank, pair)| (pair, rank))
            .collect();
        Ok(ClipTokenizer {
            vocab,
            ranks,
            bos_id,
            eos_id,
            pad_id,
            // CLIPTokenizer's unknown token is the end token.
            unk_id: eos_id,
            model_max_length,
            pattern: clip_pattern(),
            byte_symbols: byte_symbols(),
        })
    }

    /// One more than the largest id: what the text encoder's embedding must cover.
    pub fn vocab_size(&self) -> usize {
        self.vocab.values().max().map_or(0, |&m| m as usize + 1)
    }

    /// The largest id the tokenizer can produce (a vocabulary entry or a special token): a text
    /// encoder fits it when its `vocab_size` is above this.
    pub fn largest_id(&self) -> u32 {
        let largest_entry = self.vocab_size().saturating_sub(1) as u32;
        [largest_entry, self.bos_id, self.eos_id, self.pad_id]
            .into_iter()
            .max()
            .unwrap_or(0)
    }

    /// `<|startoftext|>`, the prompt's ids, `<|endoftext|>`: transformers' `tok(text)`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![self.bos_id];
        let mut rest = text;
        // Special tokens written in the text are ids of their own.
        while let Some((at, special, id)) = [(BOS, self.bos_id), (EOS, self.eos_id)]
            .iter()
            .filter_map(|&(s, id)| rest.find(s).map(|at| (at, s, id)))
            .min_by_key(|&(at, _, _)| at)
        {
            self.encode_plain(&rest[..at], &mut ids);
            ids.push(id);
            rest = &rest[at + special.len()..];
        }
        self.encode_plain(rest, &mut ids);
        ids.push(self.eos_id);
        ids
    }

    /// The ids a text encoder takes: [`encode`](Self::encode) cut to `model_max_length` (the
    /// content shortened, `<|endoftext|>` kept last) and padded to it with the pad token, as
    /// `tok(text, padding="max_length", max_length=…, truncation=True)`.
    pub fn encode_for_model(&self, text: &str) -> Encoded {
        let mut ids = self.encode(text);
        let max = self.model_max_length;
        let dropped = ids.len().saturating_sub(max);
        if dropped > 0 {
            ids.truncate(max - 1);
            ids.push(self.eos_id);
        }
        ids.resize(max, self.pad_id);
        Encoded { ids, dropped }
    }

    /// Normalizes, pre-tokenizes and BPE-encodes text without special tokens.
    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>) {
        for piece in pre_tokenize(&self.pattern, &self.byte_symbols, text) {
            self.bpe(&piece, ids);
        }
    }

    /// Merges one pre-token's symbols by rank and appends their ids.
    fn bpe(&self, word: &str, ids: &mut Vec<u32>) {
        let mut symbols: Vec<String> = word.chars().map(String::from).collect();
        if let Some(last) = symbols.last_mut() {
            last.push_str(END_OF_WORD);
        }
        loop {
            let best = symbols
                .windows(2)
                .filter_map(|w| self.ranks.get(&(w[0].clone(), w[1].clone())))
                .min()
                .copied();
            let Some(rank) = best else { break };
            let mut merged = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len()
                    && self
                        .ranks
                        .get(&(symbols[i].clone(), symbols[i + 1].clone()))
                        == Some(&rank)
                {
                    merged.push(format!("{}{}", symbols[i], symbols[i + 1]));
                    i += 2;
                } else {
                    merged.push(symbols[i].clone());
                    i += 1;
                }
            }
            symbols = merged;
        }
        ids.extend(
            symbols
                .iter()
                .map(|s| self.vocab.get(s).copied().unwrap_or(self.unk_id)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_symbols_are_gpt2s() {
        let s = byte_symbols();
        assert_eq!(s[b'a' as usize], 'a');
        assert_eq!(s[b' ' as usize], 'Ġ');
        assert_eq!(s[b'\n' as usize], 'Ċ');
        assert_eq!(s[0], 'Ā');
        let mut all: Vec<char> = s.to_vec();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 256);
    }
}
