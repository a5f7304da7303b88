#!/usr/bin/env python3
"""Writes tests/fixtures/ref_cond_tiny8_s0.safetensors: one DDPM training step of a small random
diffusers `UNet2DConditionModel` (Stable Diffusion's U-Net: cross-attention to text embeddings),
in the layout of ../shared/tools/make_reference.py so the parity test reads it the same way.

Not needed to build or test wgpu-diffusion; it only regenerates what the tests compare against:

    pip install torch "diffusers==0.42.1" safetensors
    python tools/make_cond_unet_fixtures.py [--out tests/fixtures/ref_cond_tiny8_s0.safetensors]

The model: 8x8 latents of 4 channels, block_out_channels (16, 32), CrossAttnDownBlock2D +
DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D + CrossAttnUpBlock2D, one layer per block,
attention_head_dim (2, 4) (in UNet2DConditionModel the number of heads: width 8 at both
levels), cross_attention_dim 24. Its config.json is the one diffusers' save_pretrained wrote.

Tensors (float32, NCHW) as make_reference.py's, plus:
  encoder_hidden_states       the context the U-Net attends to, randn   [B, 7, 24]
  grad.encoder_hidden_states  d loss / d context (what a jointly trained text encoder gets)
"""
import argparse
import json
import os
import tempfile

import diffusers
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file

SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/ref_cond_tiny8_s0.safetensors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(1)

    torch.manual_seed(a.seed)
    model = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
    ).train()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        with open(os.path.join(d, "config.json")) as f:
            config = json.load(f)

    sched = DDPMScheduler(**SCHEDULE)
    acp = sched.alphas_cumprod.to(torch.float32)
    g = torch.Generator().manual_seed(a.seed + 1000)
    shape = (a.batch, 4, 8, 8)
    x0 = torch.rand(shape, generator=g) * 2 - 1
    noise = torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (a.batch,), generator=g, dtype=torch.int64)
    context = torch.randn(a.batch, 7, 24, generator=g).requires_grad_()

    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x_t = sched.add_noise(x0, noise, t)
    eps = model(x_t, t, encoder_hidden_states=context).sample
    loss = torch.nn.functional.mse_loss(eps, noise)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    opt.step()

    tensors = {f"param.{k}": v for k, v in init.items()}
    tensors.update(
        x0=x0,
        noise=noise,
        timesteps=t.to(torch.int32),
        alphas_cumprod=acp,
        x_t=x_t,
        eps_pred=eps.detach(),
        loss=loss.detach().reshape(()),
        encoder_hidden_states=context.detach(),
    )
    tensors["grad.encoder_hidden_states"] = context.grad
    tensors.update({f"grad.{k}": v for k, v in grads.items()})
    tensors.update({f"after_adam.{n}": p.detach().clone() for n, p in model.named_parameters()})
    meta = dict(
        config=config,
        model_class="diffusers.UNet2DConditionModel",
        seed=a.seed,
        batch=a.batch,
        context_tokens=7,
        data_rng="torch.Generator().manual_seed(seed+1000): x0=rand*2-1, noise=randn, "
        "timesteps=randint(0,1000), encoder_hidden_states=randn",
        schedule=SCHEDULE,
        loss="mse_loss(eps_pred, noise)",
        adamw=dict(lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0, steps=1),
        torch=torch.__version__,
        diffusers=diffusers.__version__,
    )
    save_file({k: v.contiguous() for k, v in tensors.items()}, a.out, metadata={"meta": json.dumps(meta)})
    os.chmod(a.out, 0o644)
    print(a.out, os.path.getsize(a.out), "bytes, loss", float(loss))


if __name__ == "__main__":
    main()
