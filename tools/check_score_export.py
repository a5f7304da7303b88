#!/usr/bin/env python3
"""Checks by hand that diffusers loads a score-based model we exported and samples what we do.

Not needed to build or test wgpu-diffusion. With a model directory from
`train --objective edm|ve-sde` (its `model/`):

    wgpu-diffusion sample --model RUN/model --num 2 --steps 10 --noise noise.safetensors \\
        [--step-noise step.safetensors] --save-tensor ours.safetensors --out /tmp/s
    python tools/check_score_export.py --model RUN/model --noise noise.safetensors \\
        [--step-noise step.safetensors] --ours ours.safetensors --steps 10

`--write-noise` writes the two noise files first (N = 2, the model's shape; the step noise for
the VE-SDE's predictor–corrector). The model is loaded with `UNet2DModel.from_pretrained` and the
scheduler class its `scheduler_config.json` names; the loop is diffusers' own (EDMEulerScheduler)
or ScoreSdeVePipeline's written out (`tools/make_score_fixtures.py`), and the result is compared
with ours (both in [0, 1] / [-1, 1] as each returns; ours is mapped to diffusers' range).
"""
import argparse
import json
import os
import sys

import torch
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
import make_score_fixtures as fx  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--noise", required=True)
    ap.add_argument("--step-noise")
    ap.add_argument("--ours")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--write-noise", action="store_true")
    args = ap.parse_args()
    unet = UNet2DModel.from_pretrained(args.model).eval()
    cls = json.load(open(os.path.join(args.model, "scheduler_config.json")))["_class_name"]
    c, s = unet.config.in_channels, unet.config.sample_size
    if args.write_noise:
        g = torch.Generator().manual_seed(5)
        save_file({"noise": torch.randn(2, c, s, s, generator=g)}, args.noise)
        if args.step_noise:
            steps = torch.randn(2 * args.steps, 2, c, s, s, generator=g)
            save_file({"step_noise": steps}, args.step_noise)
        print("wrote", args.noise, args.step_noise or "")
        return
    noise = load_file(args.noise)["noise"]
    fx.STEPS = args.steps
    if cls == "EDMEulerScheduler":
        theirs = fx.euler_loop(unet, args.model, noise)
        ours = load_file(args.ours)["sample"]
    elif cls == "ScoreSdeVeScheduler":
        steps = load_file(args.step_noise)["step_noise"]
        theirs = fx.pc_loop(unet, args.model, noise, steps)
        ours = (load_file(args.ours)["sample"] + 1) / 2
    else:
        sys.exit(f"scheduler class {cls}: this check covers EDMEulerScheduler and ScoreSdeVeScheduler")
    diff = (ours - theirs).abs().max().item()
    scale = max(1.0, theirs.abs().max().item())
    print(f"{cls}: max |ours - diffusers| {diff:.3e} (max |diffusers| {theirs.abs().max().item():.3f})")
    sys.exit(0 if diff <= 2e-3 * scale else 1)


if __name__ == "__main__":
    main()
