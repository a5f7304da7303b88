#!/usr/bin/env python3
"""Writes a Stable Diffusion 1.5 pipeline directory with SD 1.5's exact component configs and
random weights (no pretrained weights can be downloaded here), saved by diffusers 0.42.1's
`StableDiffusionPipeline.save_pretrained`, and what diffusers' own loop makes of one prompt at
512 x 512 in 2 steps, to check `wgpu-diffusion sample --model DIR` against.

Not needed to build or test wgpu-diffusion (the directory is ~4.3 GB):

    pip install torch "diffusers==0.42.1" "transformers==5.23.*" safetensors
    python tools/make_sd15_pipeline.py --out /tmp/sd15 [--steps 2] [--no-reference]
    python tools/make_sd15_pipeline.py --out /tmp/sd15 --reference-only --size 128

Components, as in runwayml/stable-diffusion-v1-5's config files:
- `unet/`: UNet2DConditionModel, block_out_channels (320, 640, 1280, 1280), 3 cross-attention
  down blocks and a DownBlock2D, layers_per_block 2, attention_head_dim 8 (8 heads: diffusers'
  naming quirk), cross_attention_dim 768, sample_size 64 (860 M parameters);
- `vae/`: AutoencoderKL, block_out_channels (128, 256, 512, 512), 2 layers per block, 4 latent
  channels, sample_size 512, scaling_factor 0.18215 (84 M);
- `text_encoder/`: CLIPTextModel, hidden 768, 12 layers, 12 heads, intermediate 3072,
  vocab 49408, 77 positions, quick_gelu (123 M);
- `tokenizer/`: the CLIPTokenizer of tests/fixtures/tokenizer/sd_layout (CLIP's own vocabulary
  cannot be downloaded here; its ids all fit the 49408-row embedding);
- `scheduler/`: SD 1.5's PNDMScheduler config.

With the reference (default), `DIR/reference.safetensors` holds the initial `latents`
[1, 4, 64, 64] (torch.Generator seed 0), diffusers' final `latents.out` (output_type "latent")
and `image` (output_type "np", NHWC in [0, 1]) for PROMPT with NEGATIVE at guidance 7.5.
`--size S` makes it for S x S images instead (`reference_S.safetensors`, latents S/8 square);
`--reference-only` reuses the saved pipeline.
"""
import argparse
import os
import time

import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry"
GUIDANCE = 7.5
HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "tests", "fixtures", "tokenizer", "sd_layout")

SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
)


def build():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        act_fn="silu",
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        center_input_sample=False,
        cross_attention_dim=768,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        downsample_padding=1,
        flip_sin_to_cos=True,
        freq_shift=0,
        in_channels=4,
        layers_per_block=2,
        mid_block_scale_factor=1,
        norm_eps=1e-5,
        norm_num_groups=32,
        out_channels=4,
        sample_size=64,
        up_block_types=(
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
    )
    vae = AutoencoderKL(
        act_fn="silu",
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        in_channels=3,
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=32,
        out_channels=3,
        sample_size=512,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            projection_dim=768,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    )
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
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
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--reference-only", action="store_true")
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    pipe_dir = os.path.join(args.out, "pipeline")
    if not args.reference_only:
        build().to(torch.float32).save_pretrained(pipe_dir, safe_serialization=True)
        print("saved", pipe_dir)
    if args.no_reference:
        return
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, safety_checker=None)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((1, 4, args.size // 8, args.size // 8), generator=generator)
    common = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=args.steps,
        guidance_scale=GUIDANCE,
        height=args.size,
        width=args.size,
    )
    start = time.time()
    with torch.no_grad():
        out_latents = pipe(latents=latents.clone(), output_type="latent", **common).images
        image = pipe(latents=latents.clone(), output_type="np", **common).images
    seconds = (time.time() - start) / 2
    save_file(
        {
            "latents": latents.contiguous(),
            "latents.out": out_latents.contiguous(),
            "image": torch.from_numpy(image).contiguous(),
        },
        os.path.join(
            args.out,
            "reference.safetensors" if args.size == 512 else f"reference_{args.size}.safetensors",
        ),
        metadata={
            "prompt": PROMPT,
            "negative_prompt": NEGATIVE,
            "steps": str(args.steps),
            "guidance_scale": str(GUIDANCE),
            "torch_cpu_seconds_per_run": f"{seconds:.1f}",
        },
    )
    print(f"reference written; diffusers on the CPU: {seconds:.1f} s per {args.size}x{args.size} image")


if __name__ == "__main__":
    main()
