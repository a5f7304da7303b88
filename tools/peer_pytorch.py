#!/usr/bin/env python3
"""PyTorch's CPU training step for the same U-Net and batch, printed with the keys of
`wgpu-diffusion bench`, so the README's speed table comes from runs side by side.

    python tools/peer_pytorch.py --model tiny16 --batch-size 32 --steps 10 [--minimal]

Needs torch and diffusers (`pip install torch diffusers`); not needed to build or test the
project. The model configs come from ../shared/tools/unet_configs.py (the same presets as
`wgpu-diffusion`'s, layer for layer). The step is ours: noise and timesteps, q_sample,
forward, MSE on epsilon, backward, global-norm clipping to 1.0, AdamW, and an EMA update of
every parameter (`--minimal` drops clipping and EMA, as `bench --minimal` does).
"""
import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "shared", "tools"))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import unet_configs as uc  # noqa: E402
from diffusers import UNet2DModel  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny16", choices=sorted(uc.CONFIGS))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--minimal", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = UNet2DModel(**uc.CONFIGS[args.model])
    params = [p for p in model.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-6)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)
    acp = torch.cumprod(1.0 - betas, dim=0)
    c, s = model.config.in_channels, model.config.sample_size
    x0 = torch.rand(args.batch_size, c, s, s) * 2 - 1

    def step():
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (args.batch_size,))
        a = acp[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        eps = model(x_t, t).sample
        loss = torch.nn.functional.mse_loss(eps, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not args.minimal:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if not args.minimal:
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - 0.999)
        return loss

    step()
    time_to_first_step = time.perf_counter() - PROCESS_START
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(max(1, args.steps)):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)

    # FLOPs of one step in FlopCounter's convention (2 per multiply-add, GEMMs and convs).
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()

    # The sampling step: one forward + one DDIM update at the same batch.
    sample_times = []
    with torch.no_grad():
        x = torch.randn_like(x0)
        tt = torch.full((args.batch_size,), 500)
        for i in range(3 + max(3, args.steps // 2)):
            t0 = time.perf_counter()
            eps = model(x, tt).sample
            a, a_prev = acp[500], acp[480]
            x0_pred = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            x = a_prev.sqrt() * x0_pred + (1 - a_prev).sqrt() * eps
            if i >= 3:
                sample_times.append(time.perf_counter() - t0)

    median = statistics.median(times)
    print(json.dumps({
        "model": args.model,
        "batch_size": args.batch_size,
        "adapter": f"PyTorch {torch.__version__} CPU ({torch.get_num_threads()} threads)",
        "backend": "cpu",
        "path": "torch",
        "minimal": args.minimal,
        "train_step_s": median,
        "train_step_min_s": min(times),
        "train_img_per_s": args.batch_size / median,
        "sample_step_s": statistics.median(sample_times),
        "gflops_per_train_step": flops / 1e9,
        "achieved_gflops": flops / 1e9 / median,
        "dispatches_per_step": None,
        "submits_per_step": None,
        "peak_gpu_bytes": None,
        "time_to_first_step_s": time_to_first_step,
        "timed_steps": len(times),
        "loadavg": os.getloadavg()[0],
    }))


if __name__ == "__main__":
    main()
