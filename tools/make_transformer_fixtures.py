#!/usr/bin/env python3
"""Writes the Transformer2DModel fixtures of tests/fixtures/transformer2d/ with torch + diffusers.

Not needed to build or test wgpu-diffusion; it only regenerates what the tests compare against:

    pip install torch "diffusers==0.42.1" safetensors
    python tools/make_transformer_fixtures.py [--out tests/fixtures/transformer2d]

The block UNet2DConditionModel puts after each ResnetBlock2D of its cross-attention blocks
(Stable Diffusion's text conditioning): diffusers' `Transformer2DModel` with continuous input,
GroupNorm (eps 1e-6) -> proj_in -> BasicTransformerBlocks (LayerNorm -> self-attention,
LayerNorm -> cross-attention to encoder_hidden_states, LayerNorm -> GEGLU feed-forward, each
added to the stream) -> proj_out -> + input. Two small random models saved by diffusers itself
(`save_pretrained`: config.json + diffusion_pytorch_model.safetensors):

* `conv_proj/`: proj_in/proj_out as 1x1 convolutions (SD 1.x), one block;
* `linear_proj/`: `use_linear_projection` (SD 2.x), two blocks.

3 heads of width 8 over 24 channels, 15 query tokens (5 x 3) and 7 keys of width 20 in the
cross-attention, so query and key lengths differ. Each `results.safetensors` holds `x`
[2, 24, 5, 3] (NCHW), `encoder_hidden_states` [2, 7, 20], the output `sample`, `loss_weight` w
and the gradients of loss = sum(sample * w): `grad.x`, `grad.encoder_hidden_states` and
`grad.<name>` for every parameter.
"""
import argparse
import os

import torch
from diffusers import Transformer2DModel
from safetensors.torch import save_file


def write(out, name, seed, linear, layers):
    torch.manual_seed(seed)
    model = Transformer2DModel(
        num_attention_heads=3,
        attention_head_dim=8,
        in_channels=24,
        num_layers=layers,
        norm_num_groups=4,
        cross_attention_dim=20,
        use_linear_projection=linear,
    )
    # Non-trivial norms and biases (a fresh model has 1 and 0).
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    d = os.path.join(out, name)
    model.save_pretrained(d)
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(2, 24, 5, 3, generator=g).requires_grad_()
    context = torch.randn(2, 7, 20, generator=g).requires_grad_()
    sample = model(x, encoder_hidden_states=context).sample
    weight = torch.randn(sample.shape, generator=g)
    (sample * weight).sum().backward()
    tensors = {
        "x": x.detach(),
        "encoder_hidden_states": context.detach(),
        "sample": sample.detach(),
        "loss_weight": weight,
        "grad.x": x.grad,
        "grad.encoder_hidden_states": context.grad,
    }
    tensors.update({f"grad.{n}": p.grad for n, p in model.named_parameters()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(d, "results.safetensors"))
    print(name, sorted(os.listdir(d)), "max |sample|", float(sample.abs().max()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/transformer2d")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    write(args.out, "conv_proj", 1, False, 1)
    write(args.out, "linear_proj", 2, True, 2)


if __name__ == "__main__":
    main()
