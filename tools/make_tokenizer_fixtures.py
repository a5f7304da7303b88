#!/usr/bin/env python3
"""Writes the CLIP tokenizer fixtures of tests/fixtures/tokenizer/ with transformers.

Not needed to build or test wgpu-diffusion; it only regenerates what the tests compare against
(no torch needed):

    pip install "transformers==5.23.*" tokenizers
    python tools/make_tokenizer_fixtures.py [--out tests/fixtures/tokenizer]

No pretrained vocabulary can be downloaded here, so the script learns a small CLIP-format BPE
vocabulary itself (Sennrich et al. 2016's merge learning, on words pre-split with CLIP's pattern,
byte-level symbols, `</w>` on each word's last symbol, vocabulary laid out as CLIP's: the 256
byte symbols, the same with `</w>`, one entry per merge, then `<|startoftext|>` and
`<|endoftext|>`) from a corpus of digit captions and English text, and writes it the way Stable
Diffusion 1.x repositories ship a tokenizer:

* `sd_layout/`: `vocab.json`, `merges.txt` (`#version: 0.2` header), `special_tokens_map.json`
  and `tokenizer_config.json` (model_max_length 77, pad `<|endoftext|>`);
* `transformers_saved/`: what `CLIPTokenizer.from_pretrained("sd_layout").save_pretrained(...)`
  writes (transformers 5: `tokenizer.json` and `tokenizer_config.json`), the other layout a user
  has;
* `corpus.txt`: the lines the vocabulary was learned from (`train` of `text::clip_tokenizer`
  must learn the same merges from them);
* `ids.json`: the prompts (≥ 50: punctuation, digits, accents, emoji, whitespace runs, special
  token strings, over-long ones) with transformers' ids, unpadded (`tok(p)`) and as a pipeline
  asks for them (`padding="max_length", max_length=77, truncation=True`), from both directories
  (the script checks they agree).
"""

import argparse
import collections
import json
import os
import shutil

from tokenizers import Regex, pre_tokenizers
from transformers import CLIPTokenizer

CLIP_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
MERGES = 1200


def bytes_to_unicode():
    """GPT-2/CLIP's reversible map of the 256 bytes to printable characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def corpus():
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    templates = [
        "a handwritten {w}",
        "the digit {d}",
        "a photo of the number {w}",
        "an image of a {w}, written by hand",
        "digit {d} in white on black",
        "a sketch of the numeral {w}",
    ]
    lines = [t.format(w=w, d=d) for d, w in enumerate(words) for t in templates]
    lines += [
        "A small diffusion model learns to draw digits from noise, one step at a time.",
        "The quick brown fox jumps over the lazy dog while the painter sketches a landscape.",
        "An astronaut riding a horse on the moon, highly detailed, trending on artstation.",
        "A watercolor painting of a lighthouse at sunset, with waves crashing on the rocks.",
        "Portrait of an old man with a beard, oil on canvas, dramatic lighting, 4k.",
        "A cozy cabin in the snowy mountains under the northern lights at night.",
        "Isn't it wonderful? They've said we'll see what it's like; I'd rather you'd come.",
        "Café, naïve, résumé, piñata, Ångström and Zürich are words with accents.",
    ]
    return lines


def learn_merges(lines, count):
    byte_map = bytes_to_unicode()
    split = pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True)
    freq = collections.Counter()
    for line in lines:
        for piece, _ in split.pre_tokenize_str(line.lower()):
            symbols = [byte_map[b] for b in piece.encode("utf-8")]
            symbols[-1] += "</w>"
            freq[tuple(symbols)] += 1
    words = {w: list(w) for w in freq}
    merges = []
    for _ in range(count):
        pairs = collections.Counter()
        for w, syms in words.items():
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += freq[w]
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        for w, syms in words.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[w] = out
    return merges


def write_sd_layout(path, merges):
    os.makedirs(path, exist_ok=True)
    base = list(bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    special = lambda t: {"content": t, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump(
            {
                "bos_token": special("<|startoftext|>"),
                "eos_token": special("<|endoftext|>"),
                "pad_token": "<|endoftext|>",
                "unk_token": special("<|endoftext|>"),
            },
            f,
            indent=2,
        )
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "add_prefix_space": False,
                "bos_token": special("<|startoftext|>"),
                "do_lower_case": True,
                "eos_token": special("<|endoftext|>"),
                "errors": "replace",
                "model_max_length": 77,
                "pad_token": "<|endoftext|>",
                "tokenizer_class": "CLIPTokenizer",
                "unk_token": special("<|endoftext|>"),
            },
            f,
            indent=2,
        )
    return len(vocab)


def prompts():
    p = [
        "a handwritten seven",
        "the digit 7",
        "A Handwritten SEVEN",
        "",
        " ",
        "   leading and trailing spaces   ",
        "tabs\tand\nnewlines\r\nmixed",
        "multiple     spaces    between",
        "digits 0123456789 and 3.14159",
        "1,000,000 dollars!",
        "price: $42.99 (tax incl.)",
        "hello, world! how are you?",
        "what's up? it's fine; they're here, we've gone, I'm ok, you'll see, he'd know",
        "don't won't can't shouldn't",
        "quotes 'single' and \"double\"",
        "brackets [a] {b} (c) <d>",
        "email me@example.com or visit https://example.org/path?q=1",
        "snake_case and kebab-case and CamelCase",
        "café naïve résumé",
        "Ångström Zürich Straße",
        "mañana piñata jalapeño",
        "Ελληνικά γράμματα",
        "русский текст",
        "日本語のテキスト",
        "中文 字符",
        "한국어 문장",
        "emoji 🙂 and 🚀🚀",
        "family 👨‍👩‍👧 and flag 🇫🇷",
        "math: a^2 + b^2 = c^2 ≤ ∞",
        "em—dash and en–dash … ellipsis",
        "ligature ﬁ and fullwidth ＡＢＣ",
        "combining e\u0301 vs é",
        "<|startoftext|>",
        "a <|endoftext|> inside",
        "!!!???...",
        "'''",
        "''s",
        "a'b'c",
        "#hashtag @mention",
        "100%",
        "x1y2z3",
        "a photo of the number nine",
        "an image of a two, written by hand",
        "digit 4 in white on black",
        "a sketch of the numeral eight",
        "An astronaut riding a horse on the moon, highly detailed, trending on artstation",
        "a watercolor painting of a lighthouse at sunset",
        "portrait of an old man with a beard, oil on canvas, dramatic lighting, 4k",
        "the quick brown fox jumps over the lazy dog",
        "zzzz qqqq xxxx unseen words like floccinaucinihilipilification",
        " ".join(["seven"] * 80),
        " ".join(str(i % 10) for i in range(120)),
        "word " * 74 + "end",
        "word " * 75 + "end",
    ]
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/tokenizer")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    lines = corpus()
    with open(os.path.join(args.out, "corpus.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    merges = learn_merges(lines, MERGES)
    sd = os.path.join(args.out, "sd_layout")
    vocab_size = write_sd_layout(sd, merges)
    tok = CLIPTokenizer.from_pretrained(sd)
    saved = os.path.join(args.out, "transformers_saved")
    tok.save_pretrained(saved)
    tok2 = CLIPTokenizer.from_pretrained(saved)
    cases = []
    for p in prompts():
        ids = tok(p)["input_ids"]
        padded = tok(p, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert ids == tok2(p)["input_ids"], p
        assert padded == tok2(p, padding="max_length", max_length=77, truncation=True)["input_ids"], p
        cases.append({"prompt": p, "ids": ids, "padded": padded})
    with open(os.path.join(args.out, "ids.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "vocab_size": vocab_size,
                "merges": len(merges),
                "model_max_length": tok.model_max_length,
                "pad_token_id": tok.pad_token_id,
                "cases": cases,
            },
            f,
            ensure_ascii=False,
            indent=1,
        )
    print(f"{len(cases)} prompts, vocab {vocab_size}, {len(merges)} merges -> {args.out}")
    print("saved by transformers:", sorted(os.listdir(saved)))


if __name__ == "__main__":
    main()
