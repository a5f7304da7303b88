#!/usr/bin/env python3
"""Checks that diffusers' own StableDiffusionPipeline loads a latent text-to-image model that
wgpu-diffusion exported (`train --text-conditional --vae`) and samples from it what
`wgpu-diffusion sample --prompt` samples; a pixel-space export (`train --text-conditional`, no
`vae/`) is sampled with the pipeline's loop written out over diffusers' and transformers' own
components (UNet2DConditionModel, CLIPTextModel, CLIPTokenizer, DDIMScheduler).

Not needed to build or test wgpu-diffusion; a by-hand interchange check (README, training text
to image):

    pip install torch diffusers transformers safetensors numpy
    wgpu-diffusion train --text-conditional --vae runs/vae/vae --steps 100 --out runs/sd
    python tools/check_sd_export.py runs/sd/model [--prompt "a handwritten seven"] \\
        [--negative-prompt ""] [--guidance 3] [--num 4] [--steps 10]

`StableDiffusionPipeline.from_pretrained(DIR)` (the export lists no safety checker), its scheduler
swapped for `DDIMScheduler.from_config` (η = 0), called with initial latents drawn here; then
`wgpu-diffusion sample --model DIR --sampler ddim --noise FILE --save-tensor OUT` with the same
latents, prompt, negative prompt, guidance and steps. Prints the largest difference of the images
as the pipeline returns them (output_type "np": (x / 2 + 0.5).clamp(0, 1)) and exits non-zero
above --tolerance (default 1e-4: both run the text encoder once, the U-Net `steps` times on the
guided batch and the decoder once, in different summation orders).
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer


def pixel_pipeline(d, args, noise):
    """StableDiffusionPipeline.__call__'s loop without a VAE: the prompt and the negative prompt
    padded to model_max_length through the text encoder, batched [negative, prompt];
    init_noise_sigma, scale_model_input, ε̂ = ε_neg + g·(ε_prompt − ε_neg) (g > 1, as the
    pipeline), DDIMScheduler.step; images (x / 2 + 0.5).clamp(0, 1), NHWC."""
    tok = CLIPTokenizer.from_pretrained(d, subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(d, subfolder="text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(d, subfolder="unet").eval()
    sched = DDIMScheduler.from_pretrained(d, subfolder="scheduler")

    def embed(text):
        ids = tok([text] * args.num, padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        return enc(ids)[0]

    guided = args.guidance > 1.0
    context = embed(args.prompt)
    if guided:
        context = torch.cat([embed(args.negative_prompt), context])
    sched.set_timesteps(args.steps)
    x = noise.clone() * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = torch.cat([x] * 2) if guided else x
        eps = unet(sched.scale_model_input(inp, t), t, encoder_hidden_states=context).sample
        if guided:
            neg, pos = eps.chunk(2)
            eps = neg + args.guidance * (pos - neg)
        x = sched.step(eps, t, x).prev_sample
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--prompt", default="a handwritten seven")
    ap.add_argument("--negative-prompt", default="")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--num", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tolerance", type=float, default=1e-4)
    ap.add_argument("--save-images", help="a safetensors file for both image batches (NHWC, [0, 1])")
    ap.add_argument("--binary", default=os.path.join(os.path.dirname(__file__), "..", "target",
                                                     "release", "wgpu-diffusion"))
    args = ap.parse_args()
    d = args.model_dir
    latent = os.path.isdir(os.path.join(d, "vae"))
    config = UNet2DConditionModel.load_config(d, subfolder="unet")
    c, s = config["in_channels"], config["sample_size"]
    noise = torch.from_numpy(
        np.random.default_rng(0).standard_normal((args.num, c, s, s)).astype(np.float32))
    with torch.no_grad():
        if latent:
            pipe = StableDiffusionPipeline.from_pretrained(d, safety_checker=None)
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
            theirs = pipe(
                prompt=[args.prompt] * args.num,
                negative_prompt=[args.negative_prompt] * args.num,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                latents=noise.clone(),
                output_type="np",
            ).images
            theirs = torch.from_numpy(np.asarray(theirs))
        else:
            theirs = pixel_pipeline(d, args, noise)
    with tempfile.TemporaryDirectory() as tmp:
        noise_file = os.path.join(tmp, "noise.safetensors")
        save_file({"noise": noise.contiguous()}, noise_file)
        out = os.path.join(tmp, "ours.safetensors")
        subprocess.run([args.binary, "sample", "--model", d, "--prompt", args.prompt,
                        "--negative-prompt", args.negative_prompt, "--guidance-scale",
                        str(args.guidance), "--sampler", "ddim", "--steps", str(args.steps),
                        "--num", str(args.num), "--noise", noise_file, "--save-tensor", out,
                        "--out", os.path.join(tmp, "png")], check=True)
        ours = load_file(out)["sample"]
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    worst = (ours - theirs).abs().max().item()
    how = "StableDiffusionPipeline" if latent else "diffusers' components (pixel space)"
    print(f"{how} loaded {d}; images {tuple(theirs.shape)}: max |ours - diffusers| {worst:.3e}")
    if args.save_images:
        save_file({"ours": ours.contiguous(), "diffusers": theirs.contiguous()}, args.save_images)
    if not worst <= args.tolerance:
        sys.exit(f"max difference {worst:.3e} is above the tolerance {args.tolerance:.1e}")


if __name__ == "__main__":
    main()
