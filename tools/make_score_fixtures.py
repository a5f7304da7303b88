#!/usr/bin/env python3
"""Writes the score-based parity fixtures of tests/fixtures/edm/ and tests/fixtures/ve/ with
torch + diffusers.

Not needed to build or test wgpu-diffusion; it only regenerates what the tests compare against:

    pip install torch diffusers safetensors
    python tools/make_score_fixtures.py [--out tests/fixtures]

EDM (`edm/`): `model/` is a small random UNet2DModel saved by diffusers (`save_pretrained`) with the
`scheduler_config.json` of a saved `EDMEulerScheduler()` beside it: what `train --objective edm`
exports, written by the real tools. `results.safetensors` holds, NCHW:

* one EDM training step (Karras et al. 2022, NVlabs `training/loss.py` EDMLoss and
  `training/networks.py` EDMPrecond around the diffusers U-Net):
  `train.x0`, `train.noise` (n before the σ scaling), `train.u` (the standard normal draw,
  ln σ = u·P_std + P_mean), `train.sigma`, `train.F` (the U-Net's raw output),
  `train.loss` = mean over elements of λ(σ)·(D − x0)², and `train.grad.<name>` for every
  parameter (diffusers' names);
* sampling from `noise` [N,C,H,W] (before the initial σ): `sample.euler`, diffusers' loop with
  EDMEulerScheduler (`init_noise_sigma`, `scale_model_input`, `step`), and `sample.heun`, NVlabs
  `generate.py` `edm_sampler` (float64 updates, x = σ_max·noise, S_churn = 0), both in STEPS
  steps.

VE-SDE (`ve/`): `model/` is a small random UNet2DModel with `time_embedding_type="fourier"`
(GaussianFourierProjection, scale 16, its frozen `time_proj.weight` saved with the weights) and
the `scheduler_config.json` of a saved `ScoreSdeVeScheduler(sigma_max=1)` (small, so that
~20 % of the random model's final pixels land inside (0, 1) rather than on the clamp); `results.safetensors`:

* one denoising score matching step (Song et al. 2021, `losses.py` get_sde_loss_fn with
  reduce_mean over elements): `train.x0` in [0, 1], `train.z`, `train.sigma` (σ(t) at the
  fixture's t), `train.score` (the U-Net's output, already divided by σ), `train.loss` =
  mean((score·σ + z)²), `train.grad.<name>`;
* `noise` [N,C,H,W] and `step_noise` [2·STEPS, N, C, H, W], the noise of each `step_correct` /
  `step_pred` call in order (randn_tensor replaced by these), and `sample.pc`, the final
  `sample_mean.clamp(0, 1)` of ScoreSdeVePipeline's loop written out by hand (the pipeline
  hard-codes 3 channels), STEPS steps, correct_steps 1.
"""
import argparse
import os

import torch
import diffusers.schedulers.scheduling_sde_ve as sde_ve_module
from diffusers import EDMEulerScheduler, ScoreSdeVeScheduler, UNet2DModel
from safetensors.torch import save_file

STEPS = 10
N = 2
B = 3
P_MEAN, P_STD, SIGMA_DATA = -1.2, 1.2, 0.5


def make_unet(seed, **extra):
    torch.manual_seed(seed)
    unet = UNet2DModel(
        **extra,
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
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


def precond(unet, x, sigma):
    """EDMPrecond.forward: D(x; σ) = c_skip·x + c_out·F(c_in·x, ¼ ln σ), float32."""
    sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
    c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
    c_out = sigma * SIGMA_DATA / (sigma**2 + SIGMA_DATA**2).sqrt()
    c_in = 1 / (SIGMA_DATA**2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    t = c_noise.flatten()
    if t.numel() == 1:
        t = t.expand(x.shape[0])
    F = unet(c_in * x.to(torch.float32), t).sample
    return c_skip * x.to(torch.float32) + c_out * F, F


def training_step(unet, g):
    x0 = torch.rand(B, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(B, 1, 8, 8, generator=g)
    # Spread the noise levels over the range training sees (σ from ~0.02 to ~6).
    u = torch.tensor([-2.2, 0.1, 2.5])
    sigma = (u * P_STD + P_MEAN).exp()
    s = sigma.reshape(-1, 1, 1, 1)
    weight = (s**2 + SIGMA_DATA**2) / (s * SIGMA_DATA) ** 2
    unet.zero_grad()
    D, F = precond(unet, x0 + noise * s, sigma)
    loss = (weight * (D - x0) ** 2).mean()
    loss.backward()
    out = {
        "train.x0": x0,
        "train.noise": noise,
        "train.u": u,
        "train.sigma": sigma,
        "train.F": F.detach(),
        "train.loss": loss.detach().reshape(1),
    }
    for name, p in unet.named_parameters():
        out[f"train.grad.{name}"] = p.grad.detach().clone()
    return out


@torch.no_grad()
def euler_loop(unet, sched_dir, noise):
    sched = EDMEulerScheduler.from_pretrained(sched_dir)
    sched.set_timesteps(STEPS)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        out = unet(inp, t).sample
        x = sched.step(out, t, x).prev_sample
    return x


@torch.no_grad()
def heun_loop(unet, noise, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """NVlabs edm_sampler with S_churn = 0 (Karras et al. 2022, Algorithm 1)."""
    idx = torch.arange(STEPS, dtype=torch.float64)
    t_steps = (
        sigma_max ** (1 / rho)
        + idx / (STEPS - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    x_next = noise.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_hat, t_hat = x_next, t_cur
        denoised = precond(unet, x_hat, t_hat)[0].to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < STEPS - 1:
            denoised = precond(unet, x_next, t_next)[0].to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.to(torch.float32)


def ve_training_step(unet, g, sigma_min, sigma_max):
    x0 = torch.rand(B, 1, 8, 8, generator=g)
    z = torch.randn(B, 1, 8, 8, generator=g)
    t = torch.tensor([0.05, 0.5, 0.95])
    sigma = sigma_min * (sigma_max / sigma_min) ** t
    unet.zero_grad()
    score = unet(x0 + z * sigma[:, None, None, None], sigma).sample
    loss = torch.square(score * sigma[:, None, None, None] + z).mean()
    loss.backward()
    out = {
        "train.x0": x0,
        "train.z": z,
        "train.sigma": sigma,
        "train.score": score.detach(),
        "train.loss": loss.detach().reshape(1),
    }
    for name, p in unet.named_parameters():
        if p.grad is not None:
            out[f"train.grad.{name}"] = p.grad.detach().clone()
    return out


@torch.no_grad()
def pc_loop(unet, sched_dir, noise, step_noise):
    """ScoreSdeVePipeline.__call__ for a 1-channel model, randn_tensor fed from step_noise."""
    queue = list(step_noise)
    original = sde_ve_module.randn_tensor
    sde_ve_module.randn_tensor = lambda *a, **k: queue.pop(0)
    try:
        sched = ScoreSdeVeScheduler.from_pretrained(sched_dir)
        sample = noise * sched.init_noise_sigma
        sched.set_timesteps(STEPS)
        sched.set_sigmas(STEPS)
        for i, t in enumerate(sched.timesteps):
            sigma_t = sched.sigmas[i] * torch.ones(sample.shape[0])
            for _ in range(sched.config.correct_steps):
                out = unet(sample, sigma_t).sample
                sample = sched.step_correct(out, sample).prev_sample
            out = unet(sample, sigma_t).sample
            output = sched.step_pred(out, t, sample)
            sample, sample_mean = output.prev_sample, output.prev_sample_mean
        return sample_mean.clamp(0, 1)
    finally:
        sde_ve_module.randn_tensor = original


def write_ve(out_dir):
    model_dir = os.path.join(out_dir, "model")
    unet = make_unet(9, time_embedding_type="fourier")
    unet.save_pretrained(model_dir, safe_serialization=True)
    sched = ScoreSdeVeScheduler(sigma_max=1.0)
    sched.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(13)
    results = ve_training_step(unet, g, sched.config.sigma_min, sched.config.sigma_max)
    unet.eval()
    noise = torch.randn(N, 1, 8, 8, generator=g)
    step_noise = torch.randn(2 * STEPS, N, 1, 8, 8, generator=g)
    results["noise"] = noise
    results["step_noise"] = step_noise
    results["sample.pc"] = pc_loop(unet, model_dir, noise, step_noise)
    results = {k: v.contiguous() for k, v in results.items()}
    save_file(results, os.path.join(out_dir, "results.safetensors"), metadata={"steps": str(STEPS)})
    print("ve loss", results["train.loss"].item(), "pc range", results["sample.pc"].min().item(), results["sample.pc"].max().item())


def write_edm(out_dir):
    model_dir = os.path.join(out_dir, "model")
    unet = make_unet(7)
    unet.save_pretrained(model_dir, safe_serialization=True)
    EDMEulerScheduler(sigma_data=SIGMA_DATA).save_pretrained(model_dir)
    g = torch.Generator().manual_seed(11)
    results = training_step(unet, g)
    unet.eval()
    noise = torch.randn(N, 1, 8, 8, generator=g)
    results["noise"] = noise
    results["sample.euler"] = euler_loop(unet, model_dir, noise)
    results["sample.heun"] = heun_loop(unet, noise)
    results = {k: v.contiguous() for k, v in results.items()}
    meta = {"steps": str(STEPS), "p_mean": str(P_MEAN), "p_std": str(P_STD)}
    save_file(results, os.path.join(out_dir, "results.safetensors"), metadata=meta)
    print("edm loss", results["train.loss"].item())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()
    write_edm(os.path.join(args.out, "edm"))
    write_ve(os.path.join(args.out, "ve"))


if __name__ == "__main__":
    main()
