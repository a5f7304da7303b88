#!/usr/bin/env python3
"""Writes the sampler parity fixtures of tests/fixtures/samplers/ with torch + diffusers.

Not needed to build or test wgpu-diffusion; it only regenerates what the tests compare against:

    pip install torch diffusers safetensors
    python tools/make_sampler_fixtures.py [--out tests/fixtures/samplers]

Two small random UNet2DModels, saved by diffusers itself (`save_pretrained`), each with the
`scheduler_config.json` of a saved DDPMScheduler:

* `eps/`: epsilon prediction, linear betas, clip_sample (flat model directory);
* `v/`: v_prediction, squaredcos_cap_v2, no clipping (a DDPMPipeline directory: `unet/`,
  `scheduler/`, `model_index.json`).

For each, `results.safetensors` holds the initial noise `noise` [N,C,H,W] (before
init_noise_sigma), the per-step noise `step_noise` [n,N,C,H,W] of the DDPM case, and the final
`sample.<case>` of diffusers' loop

    sched = XScheduler.from_config(config, **extra); sched.set_timesteps(n)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample

`eps_fp16/` is the eps model saved in half precision with `variant="fp16"` (what a user's fp16
download holds). `ddpm_stats.mean` / `ddpm_stats.std` ([C,H,W], over 512 DDPM samples drawn with torch's RNG), and
with the timesteps of each case in the metadata (`timesteps.<case>`, JSON).
"""
import argparse
import json
import os

import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UNet2DModel,
)
import diffusers
import diffusers.schedulers.scheduling_ddpm as ddpm_module
from safetensors.torch import save_file

STEPS = 10
N = 2
STATS_N = 512

CASES = [
    # name, scheduler class, extra from_config kwargs
    ("ddim_leading", DDIMScheduler, {"timestep_spacing": "leading"}),
    ("ddim_trailing", DDIMScheduler, {"timestep_spacing": "trailing"}),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    ("euler_karras", EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    ("heun_karras", HeunDiscreteScheduler, {"use_karras_sigmas": True}),
    # Stable Diffusion 1.x's scheduler: PLMS, leading spacing, steps_offset 1, ᾱ_prev = ᾱ_0 at the end.
    ("pndm_plms", PNDMScheduler, {"skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False}),
]


def make_unet(seed):
    torch.manual_seed(seed)
    # diffusers' own defaults for everything not set (flip_sin_to_cos, freq_shift,
    # downsample_padding 1, norm_eps 1e-5, multi-head attention), so the loader sees them.
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )
    # Random weights with enough spread that the output is far from zero.
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def run_loop(unet, sched, noise):
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        with torch.no_grad():
            out = unet(sched.scale_model_input(x, t), t).sample
        x = sched.step(out, t, x).prev_sample
    return x


def ddpm_with_noise(unet, config, noise, step_noise):
    sched = DDPMScheduler.from_config(config)
    sched.set_timesteps(STEPS)
    supplied = iter(step_noise)
    original = ddpm_module.randn_tensor
    used = []

    def next_noise(shape, **kw):
        z = next(supplied)
        used.append(True)
        return z.reshape(shape).clone()

    ddpm_module.randn_tensor = next_noise
    try:
        x = run_loop(unet, sched, noise)
    finally:
        ddpm_module.randn_tensor = original
    return x, sched.timesteps


def write(out_dir, name, seed, sched_kwargs, pipeline):
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    unet = make_unet(seed)
    ddpm = DDPMScheduler(**sched_kwargs)
    if pipeline:
        DDPMPipeline(unet=unet, scheduler=ddpm).save_pretrained(d)
    else:
        unet.save_pretrained(d)
        ddpm.save_pretrained(d)
    # The config as the saved scheduler_config.json holds it (every key, `_class_name`
    # included): what `from_config(scheduler_config)` carries across classes. An in-memory
    # `ddpm.config` would differ: its `_use_default_values` makes other classes keep their own
    # defaults for the keys DDPMScheduler was not given explicitly.
    config = DDPMScheduler.load_config(os.path.join(d, "scheduler") if pipeline else d)
    g = torch.Generator().manual_seed(seed + 100)
    c, s = unet.config.in_channels, unet.config.sample_size
    noise = torch.randn(N, c, s, s, generator=g)
    step_noise = torch.randn(STEPS, N, c, s, s, generator=g)
    tensors = {"noise": noise, "step_noise": step_noise}
    meta = {"diffusers": diffusers.__version__, "torch": torch.__version__, "steps": str(STEPS)}
    for case, cls, extra in CASES:
        sched = cls.from_config(config, **extra)
        sched.set_timesteps(STEPS)
        x = run_loop(unet, sched, noise)
        tensors[f"sample.{case}"] = x.contiguous()
        meta[f"timesteps.{case}"] = json.dumps([float(t) for t in sched.timesteps])
        meta[f"init_noise_sigma.{case}"] = str(float(sched.init_noise_sigma))
        print(f"{name} {case}: max |x| {x.abs().max():.4f}, timesteps {[round(float(t), 3) for t in sched.timesteps]}")
    x, ts = ddpm_with_noise(unet, config, noise, step_noise)
    tensors["sample.ddpm"] = x.contiguous()
    meta["timesteps.ddpm"] = json.dumps([float(t) for t in ts])
    print(f"{name} ddpm: max |x| {x.abs().max():.4f}")
    # Statistics of DDPM ancestral sampling with torch's own noise, for a distributional check
    # of ours with the GPU RNG: per-pixel mean and standard deviation over STATS_N images.
    torch.manual_seed(seed + 200)
    sched = DDPMScheduler.from_config(config)
    sched.set_timesteps(STEPS)
    many = run_loop(unet, sched, torch.randn(STATS_N, c, s, s))
    tensors["ddpm_stats.mean"] = many.mean(0).contiguous()
    tensors["ddpm_stats.std"] = many.std(0).contiguous()
    meta["ddpm_stats.n"] = str(STATS_N)
    save_file(tensors, os.path.join(d, "results.safetensors"), metadata=meta)


def write_fp16_variant(out_dir):
    """`eps_fp16/`: the eps model as a user's half-precision download looks —
    `UNet2DModel.from_pretrained(eps).to(torch.float16).save_pretrained(d, variant="fp16")`
    (config.json + diffusion_pytorch_model.fp16.safetensors) with eps's scheduler config."""
    src = os.path.join(out_dir, "eps")
    d = os.path.join(out_dir, "eps_fp16")
    UNet2DModel.from_pretrained(src).to(torch.float16).save_pretrained(d, variant="fp16")
    DDPMScheduler.from_pretrained(src).save_pretrained(d)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "samplers"))
    args = ap.parse_args()
    write(args.out, "eps", 1, dict(beta_schedule="linear", prediction_type="epsilon", clip_sample=True), False)
    write(args.out, "v", 2, dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False), True)
    write_fp16_variant(args.out)


if __name__ == "__main__":
    main()
