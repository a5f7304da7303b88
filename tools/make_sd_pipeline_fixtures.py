#!/usr/bin/env python3
"""Writes tests/fixtures/sd_pipeline/: a tiny random Stable Diffusion pipeline saved by diffusers
0.42.1 (`StableDiffusionPipeline.save_pretrained`) and what diffusers' own loop makes of a prompt.

Not needed to build or test wgpu-diffusion; it only regenerates what the tests compare against:

    pip install torch "diffusers==0.42.1" "transformers==5.23.*" safetensors
    python tools/make_sd_pipeline_fixtures.py [--out tests/fixtures/sd_pipeline]

The pipeline has SD 1.x's layout and component classes, at toy sizes: `unet/` a
UNet2DConditionModel on 8x8x4 latents (block_out_channels (16, 32), cross-attention at the first
level and in the mid block, attention_head_dim (2, 4), cross_attention_dim 32), `vae/` an
AutoencoderKL from 16x16 RGB to those latents (scaling_factor 0.18215), `text_encoder/` a
CLIPTextModel (hidden 32, 2 layers, quick_gelu) over the vocabulary of
tests/fixtures/tokenizer/sd_layout, `tokenizer/` that CLIPTokenizer, `scheduler/` SD 1.5's
PNDMScheduler config; no safety checker (model_index.json says null).

`results.safetensors` holds the initial `latents` [1, 4, 8, 8], the prompt's and the negative
prompt's embeddings (`prompt_embeds`, `negative_prompt_embeds` [1, 77, 32]) and, for each case
(PNDM as configured, DDIM and DPM-Solver++ 2M from_config, 4 steps, guidance 7.5 with the
negative prompt), diffusers' final latents (`latents.<case>`, output_type "latent") and images
(`image.<case>`, output_type "np": NHWC floats in [0, 1]). Metadata: the prompts and steps.
"""
import argparse
import json
import os

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

PROMPT = "a handwritten seven"
NEGATIVE = "blurry"
STEPS = 4
GUIDANCE = 7.5
SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
)


def build(tokenizer_dir):
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tokenizer.vocab_size + 2,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # Biases and norms away from 0 and 1, so every parameter matters.
    with torch.no_grad():
        for model in (unet, vae, text_encoder):
            for n, p in model.named_parameters():
                if "norm" in n or n.endswith("bias"):
                    p.add_(0.1 * torch.randn_like(p))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/sd_pipeline")
    args = ap.parse_args()
    torch.set_num_threads(1)
    here = os.path.dirname(os.path.abspath(__file__))
    pipe = build(os.path.join(here, "..", "tests", "fixtures", "tokenizer", "sd_layout"))
    pipe.save_pretrained(args.out)
    pipe = StableDiffusionPipeline.from_pretrained(args.out, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    prompt_embeds, negative_embeds = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
    tensors = {
        "latents": latents,
        "prompt_embeds": prompt_embeds,
        "negative_prompt_embeds": negative_embeds,
    }
    schedulers = {
        "pndm": pipe.scheduler,
        "ddim": DDIMScheduler.from_config(pipe.scheduler.config),
        "dpmpp_2m": DPMSolverMultistepScheduler.from_config(pipe.scheduler.config),
    }

    def run(case, start, height, width):
        """The pipeline's final latents and image from `start` into tensors[*.case]."""
        for output_type, key in (("latent", "latents"), ("np", "image")):
            with torch.no_grad():
                out = pipe(
                    PROMPT,
                    negative_prompt=NEGATIVE,
                    height=height,
                    width=width,
                    num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE,
                    latents=start.clone(),
                    output_type=output_type,
                ).images
            tensors[f"{key}.{case}"] = torch.as_tensor(out).float()
        print(case, "max |latents|", float(tensors[f"latents.{case}"].abs().max()))

    for case, scheduler in schedulers.items():
        pipe.scheduler = scheduler
        run(case, latents, 16, 16)
    # A non-square image (height 16, width 24: latents 8 x 12) with DDIM: `sample --height/--width`.
    wide = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(8))
    tensors["latents_16x24"] = wide
    pipe.scheduler = schedulers["ddim"]
    run("ddim_16x24", wide, 16, 24)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        os.path.join(args.out, "results.safetensors"),
        metadata={
            "prompt": PROMPT,
            "negative_prompt": NEGATIVE,
            "steps": str(STEPS),
            "guidance_scale": str(GUIDANCE),
            "cases": json.dumps(list(schedulers)),
        },
    )


if __name__ == "__main__":
    main()
