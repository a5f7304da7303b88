#!/usr/bin/env python3
"""Checks that diffusers, component by component, samples a latent diffusion model that
wgpu-diffusion exported (`train --vae`) to the images wgpu-diffusion samples.

Not needed to build or test wgpu-diffusion; a by-hand interchange check (README, latent diffusion):

    pip install torch diffusers safetensors numpy
    wgpu-diffusion train --vae runs/vae/vae --steps 100 --out runs/ldm
    python tools/check_ldm_export.py runs/ldm/model [--num 4 --steps 10]

diffusers has no unconditional AutoencoderKL + UNet2DModel pipeline (LDMPipeline takes a VQModel),
so this script is that pipeline: `UNet2DModel.from_pretrained(DIR/unet)`,
`AutoencoderKL.from_pretrained(DIR/vae)`, `DDIMScheduler.from_pretrained(DIR/scheduler)` (η = 0),
latents = noise · init_noise_sigma, the DDIM loop, then `vae.decode(latents / scaling_factor +
shift_factor)`. It writes the initial noise to a file, runs `wgpu-diffusion sample --model DIR
--noise FILE --save-tensor OUT` with the same steps, and prints the largest and the relative L2
difference of the decoded images. Exits non-zero above --tolerance (default 1e-4: the two run
the U-Net `steps` times and the decoder once, in different summation orders).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--num", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tolerance", type=float, default=1e-4)
    ap.add_argument("--binary", default=os.path.join(os.path.dirname(__file__), "..", "target",
                                                     "release", "wgpu-diffusion"))
    args = ap.parse_args()
    d = args.model_dir
    with open(os.path.join(d, "model_index.json")) as f:
        index = json.load(f)
    if "vae" not in index:
        sys.exit(f"{d}/model_index.json lists no vae: not a latent diffusion export")
    unet = UNet2DModel.from_pretrained(os.path.join(d, "unet")).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(d, "vae"), low_cpu_mem_usage=False).eval()
    scheduler = DDIMScheduler.from_pretrained(os.path.join(d, "scheduler"))
    c, s = unet.config.in_channels, unet.config.sample_size
    noise = torch.from_numpy(
        np.random.default_rng(0).standard_normal((args.num, c, s, s)).astype(np.float32))
    with tempfile.TemporaryDirectory() as tmp:
        noise_file = os.path.join(tmp, "noise.safetensors")
        save_file({"noise": noise.contiguous()}, noise_file)
        out = os.path.join(tmp, "ours.safetensors")
        subprocess.run([args.binary, "sample", "--model", d, "--sampler", "ddim", "--steps",
                        str(args.steps), "--noise", noise_file, "--save-tensor", out, "--out",
                        os.path.join(tmp, "png")], check=True)
        ours = load_file(out)["sample"]
    scheduler.set_timesteps(args.steps)
    latents = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(scheduler.scale_model_input(latents, t), t).sample
            latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
        z = latents / vae.config.scaling_factor
        if vae.config.shift_factor is not None:
            z = z + vae.config.shift_factor
        theirs = vae.decode(z).sample
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    worst = (ours - theirs).abs().max().item()
    print(f"decoded images {tuple(theirs.shape)}: max |ours - diffusers| {worst:.3e}, "
          f"relative L2 {rel:.3e}")
    if not rel <= args.tolerance:
        sys.exit(f"relative L2 {rel:.3e} is above the tolerance {args.tolerance:.1e}")


if __name__ == "__main__":
    main()
