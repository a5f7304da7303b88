#!/usr/bin/env python3
"""Writes the CLIP text encoder fixtures of tests/fixtures/clip/ with torch + transformers.

Not needed to build or test wgpu-diffusion; it only regenerates what the tests compare against:

    pip install torch "transformers==5.23.*" safetensors
    python tools/make_clip_fixtures.py [--out tests/fixtures/clip]

Two small random `CLIPTextModel`s saved by transformers itself (`save_pretrained`: config.json +
model.safetensors), over the vocabulary of tests/fixtures/tokenizer/ (828 ids, 77 positions):

* `quick_gelu/`: hidden_act quick_gelu (CLIP ViT-L/14's, Stable Diffusion 1.x's text encoder);
* `gelu/`: hidden_act gelu (OpenCLIP's, Stable Diffusion 2.x's).

Each `results.safetensors` holds `input_ids` [2, 77] (the tokenizer fixture's ids of two prompts,
padded as a pipeline asks, stored as float32) and the model's `last_hidden_state` [2, 77, D] in
eval mode, the tensor a Stable Diffusion U-Net attends to; and, for the backward of a text encoder
trained jointly with the U-Net, `loss_weight` w (same shape as last_hidden_state, from its own
generator so the model and its outputs do not depend on it) with `grad.<name>` for every
parameter: the gradient of loss = Σ last_hidden_state · w (the model has no dropout).
"""
import argparse
import os

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

PROMPTS = ["a handwritten seven", "An astronaut riding a horse on the moon, highly detailed!"]


def write(out, name, act, seed, tokenizer):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=tokenizer.vocab_size + 2,
        hidden_size=32,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModel(config).eval()
    # Non-trivial LayerNorm affines and biases (a fresh model has 1 and 0).
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "layer_norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    d = os.path.join(out, name)
    model.save_pretrained(d)
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    hidden = model(input_ids=ids).last_hidden_state
    weight = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(100 + seed))
    (hidden * weight).sum().backward()
    grads = {f"grad.{n}": p.grad.detach().contiguous() for n, p in model.named_parameters()}
    hidden = hidden.detach()
    save_file(
        {
            "input_ids": ids.float().contiguous(),
            "last_hidden_state": hidden.contiguous(),
            "loss_weight": weight.contiguous(),
            **grads,
        },
        os.path.join(d, "results.safetensors"),
        metadata={"prompts": "\n".join(PROMPTS)},
    )
    print(name, sorted(os.listdir(d)), "max |h|", float(hidden.abs().max()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/clip")
    args = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(here, "..", "tests", "fixtures", "tokenizer", "sd_layout"))
    os.makedirs(args.out, exist_ok=True)
    write(args.out, "quick_gelu", "quick_gelu", 1, tokenizer)
    write(args.out, "gelu", "gelu", 2, tokenizer)


if __name__ == "__main__":
    main()
