#!/usr/bin/env python3
"""Writes tests/fixtures/ref_text_cond_tiny8_s0.safetensors: one training step of a small random
transformers `CLIPTextModel` and diffusers `UNet2DConditionModel` trained jointly (the text
encoder's last_hidden_state is the U-Net's encoder_hidden_states; one AdamW over both parameter
sets), in the layout of ../shared/tools/make_reference.py so the parity test reads it the same way.

Not needed to build or test wgpu-diffusion; it only regenerates what the tests compare against:

    pip install torch "diffusers==0.42.1" "transformers==5.23.*" safetensors
    python tools/make_text_unet_fixtures.py [--out tests/fixtures/ref_text_cond_tiny8_s0.safetensors]

The U-Net is tools/make_cond_unet_fixtures.py's (8x8x4, cross_attention_dim 24). The text
encoder: vocab 40, hidden 24, 2 layers of 4 heads, intermediate 40, 7 positions, quick_gelu,
LayerNorm affines and biases perturbed (a fresh model has 1 and 0). Both configs are the ones
save_pretrained wrote.

Tensors (float32, NCHW) as make_reference.py's, plus:
  input_ids                   the prompts' ids, int32 [B, 7]
  param./grad./after_adam.text_encoder.<name>   the text encoder's, transformers' names
  grad.encoder_hidden_states  d loss / d last_hidden_state
"""
import argparse
import json
import os
import tempfile

import diffusers
import torch
import transformers
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

SCHEDULE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
TOKENS = 7


def saved_config(model):
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        with open(os.path.join(d, "config.json")) as f:
            return json.load(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/ref_text_cond_tiny8_s0.safetensors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(1)

    torch.manual_seed(a.seed)
    unet = UNet2DConditionModel(
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
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=40,
            hidden_size=24,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TOKENS,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            bos_token_id=38,
            eos_token_id=39,
            pad_token_id=39,
        )
    ).train()
    with torch.no_grad():
        for n, p in text.named_parameters():
            if "layer_norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    config, text_config = saved_config(unet), saved_config(text)

    sched = DDPMScheduler(**SCHEDULE)
    acp = sched.alphas_cumprod.to(torch.float32)
    g = torch.Generator().manual_seed(a.seed + 1000)
    shape = (a.batch, 4, 8, 8)
    x0 = torch.rand(shape, generator=g) * 2 - 1
    noise = torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (a.batch,), generator=g, dtype=torch.int64)
    ids = torch.randint(0, 38, (a.batch, TOKENS), generator=g, dtype=torch.int64)
    ids[:, 0] = 38
    ids[0, 4:] = 39  # a short prompt padded with EOS, a full-length one

    init = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    # transformers names them text_model.<name> (older files: <name>); ours: text_encoder.<name>.
    text_named = [(f"text_encoder.{n.removeprefix('text_model.')}", p) for n, p in text.named_parameters()]
    init.update({n: p.detach().clone() for n, p in text_named})
    x_t = sched.add_noise(x0, noise, t)
    context = text(input_ids=ids).last_hidden_state
    context.retain_grad()
    eps = unet(x_t, t, encoder_hidden_states=context).sample
    loss = torch.nn.functional.mse_loss(eps, noise)
    loss.backward()
    named = list(unet.named_parameters()) + text_named
    grads = {n: p.grad.detach().clone() for n, p in named}
    opt = torch.optim.AdamW([p for _, p in named], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    opt.step()

    tensors = {f"param.{k}": v for k, v in init.items()}
    tensors.update(
        x0=x0,
        noise=noise,
        timesteps=t.to(torch.int32),
        input_ids=ids.to(torch.int32),
        alphas_cumprod=acp,
        x_t=x_t,
        eps_pred=eps.detach(),
        loss=loss.detach().reshape(()),
    )
    tensors["grad.encoder_hidden_states"] = context.grad
    tensors.update({f"grad.{k}": v for k, v in grads.items()})
    tensors.update({f"after_adam.{n}": p.detach().clone() for n, p in named})
    meta = dict(
        config=config,
        text_config=text_config,
        model_class="diffusers.UNet2DConditionModel + transformers.CLIPTextModel",
        seed=a.seed,
        batch=a.batch,
        context_tokens=TOKENS,
        data_rng="torch.Generator().manual_seed(seed+1000): x0=rand*2-1, noise=randn, "
        "timesteps=randint(0,1000), input_ids=randint(0,38) with BOS first and EOS padding",
        schedule=SCHEDULE,
        loss="mse_loss(unet(x_t, t, text(input_ids).last_hidden_state), noise)",
        adamw=dict(lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0, steps=1, params="unet + text encoder"),
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
    )
    save_file({k: v.contiguous() for k, v in tensors.items()}, a.out, metadata={"meta": json.dumps(meta)})
    os.chmod(a.out, 0o644)
    print(a.out, os.path.getsize(a.out), "bytes, loss", float(loss.detach()))


if __name__ == "__main__":
    main()
