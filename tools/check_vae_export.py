#!/usr/bin/env python3
"""Checks that diffusers loads a VAE directory wgpu-diffusion exported and encodes like it.

Not needed to build or test wgpu-diffusion; a by-hand interchange check (README, `train-vae`):

    pip install torch diffusers safetensors numpy pillow
    wgpu-diffusion train-vae --steps 20 --batch-size 8 --out runs/vae
    python tools/check_vae_export.py runs/vae/vae [--images 3]

It writes a few random grey PNGs of the VAE's sample_size into a temporary folder, runs
`wgpu-diffusion vae --model DIR encode` on them (the posterior's mode, unscaled), loads DIR with
`AutoencoderKL.from_pretrained`, computes `encode(x).latent_dist.mode()` on the same pixel values
(byte / 127.5 - 1, as wgpu-diffusion reads images) and prints the largest and the relative L2
difference. Exits non-zero when the relative L2 difference is above --tolerance (default 1e-5).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from diffusers import AutoencoderKL
from safetensors.torch import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("vae_dir")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--tolerance", type=float, default=1e-5)
    ap.add_argument("--binary", default=os.path.join(os.path.dirname(__file__), "..", "target",
                                                     "release", "wgpu-diffusion"))
    args = ap.parse_args()
    with open(os.path.join(args.vae_dir, "config.json")) as f:
        config = json.load(f)
    size, channels = config["sample_size"], config["in_channels"]
    if channels != 1:
        sys.exit("this check writes grey images: the VAE must have 1 input channel")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        images = os.path.join(tmp, "in")
        os.makedirs(images)
        pixels = []
        for i in range(args.images):
            a = (rng.random((size, size)) * 255).astype(np.uint8)
            Image.fromarray(a, "L").save(os.path.join(images, f"{i}.png"))
            pixels.append(a.astype(np.float32) / 127.5 - 1.0)
        latents = os.path.join(tmp, "z.safetensors")
        subprocess.run([args.binary, "vae", "--model", args.vae_dir, "encode", "--input", images,
                        "--out", latents], check=True)
        ours = load_file(latents)["latent"]
    vae = AutoencoderKL.from_pretrained(args.vae_dir, low_cpu_mem_usage=False).eval()
    x = torch.from_numpy(np.stack(pixels)[:, None])
    with torch.no_grad():
        mode = vae.encode(x).latent_dist.mode()
    rel = ((ours - mode).norm() / mode.norm()).item()
    print(f"scaling_factor {vae.config.scaling_factor}; latents {tuple(mode.shape)}: "
          f"max |diff| {(ours - mode).abs().max().item():.3e}, relative L2 {rel:.3e}")
    sys.exit(0 if rel <= args.tolerance else 1)


if __name__ == "__main__":
    main()
