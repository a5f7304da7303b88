#!/usr/bin/env python3
"""Writes tests/fixtures/ref_tiny16_f16_s0.safetensors: one DDPM training step of the tiny16
UNet2DModel as `--precision f16` computes it, in the layout of ../shared/tools/make_reference.py
(param., x0, noise, timesteps, alphas_cumprod, x_t, eps_pred, loss, grad., act.) so the parity
test reads it the same way, plus `unrounded_eps_pred` (the plain f32 step's output).

Not needed to build or test wgpu-diffusion; it only regenerates what the tests compare against:

    pip install torch "diffusers==0.42.1" safetensors
    python tools/make_f16_fixtures.py [--out tests/fixtures/ref_tiny16_f16_s0.safetensors]

What it models (say it plainly: it is not torch.autocast on the CPU). On a GPU, autocast runs
each conv and Linear with f16 inputs and f32 accumulation and hands back an f16 output. Our
`--precision f16` does the same with explicit rules, which this script reproduces:
- Operands: every `F.conv2d` and `F.linear` of the model is replaced by an autograd function
  that computes in f32 (or f64, below) from f16-rounded operands, in the forward pass (x, W) and
  in both backward products (dY and W for dX, dY and x for dW); a bias gradient is the sum of the
  rounded dY (the sum itself in f32). The bias is added in f32.
- Storage: the activations the run keeps are stored as f16, and so are their gradients. Each is
  modelled by `StoredHalf`, which rounds the value in the forward pass and the incoming gradient
  in the backward pass, at the points where our U-Net stores one: the output of every conv and
  Linear (conv_in, conv1, conv2, conv_shortcut, time_emb_proj, the down/upsampling convs, to_q,
  to_k, to_v, to_out.0), every SiLU after a GroupNorm (GroupNorm + SiLU is one kernel: the norm's
  own output is not stored), the input of each resnet's norm2 (conv1's output plus the time
  embedding, summed in place), each resnet's and attention block's output (the residual sums),
  an attention block's GroupNorm output and the attention core's output. Not rounded (f32, as
  autocast keeps them): the model input, the timestep embedding and the time-embedding MLP
  (`time_embedding.linear_1/linear_2` also keep f32 operands, issue 21), conv_out's output (the
  loss reads it), the attention core's internals (softmax(QKᵀ)V in f32, as our fused kernel
  computes it), the loss.

The loss gradient is scaled by GradScaler's initial scale 2^16 (meta `loss_scale`) before the
backward pass, as a `--precision f16` run does, and the stored gradients are unscaled (divided by
it: exact, a power of two). Without the scale, many backward operands would be f16 subnormals.
No AdamW step: the update is the f32 kernel on these gradients, which the f32 fixtures prove.

The same parameters, data and seeds as ref_tiny16_s0 (torch.manual_seed(0) before building the
model; data from torch.Generator().manual_seed(1000)), so the two fixtures differ only by the
rounding. Meta `tolerance_hints` compares this step with a float64 run of the same rounded model
(what rounding-boundary flips alone cost: torch's f32 and f64 pre-rounding values straddle an
f16 rounding boundary now and then) and with the unrounded f32 step (what f16 operands change).
"""
import argparse
import copy
import json
import os

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import save_file

# tiny16 (the ddpm-style preset of the f32 fixtures): 16x16 -> 8x8, attention at 8x8 + mid.
TINY16 = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    center_input_sample=False,
    time_embedding_type="positional",
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
    mid_block_scale_factor=1,
    act_fn="silu",
    attention_head_dim=None,
    norm_eps=1e-6,
)
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
LOSS_SCALE = 2.0**16
ACT_SUFFIXES = ("resnets", "attentions", "downsamplers", "upsamplers")
ACT_TOP = ("time_proj", "time_embedding", "conv_in", "conv_norm_out", "conv_act", "conv_out")

CONV2D, LINEAR = F.conv2d, F.linear
# Set while the time-embedding MLP runs: its Linears keep f32 operands.
FULL_PRECISION = [False]


def f16(t):
    """t rounded to the nearest f16 (ties to even, subnormals, ±inf past 65504) and back."""
    return t.half().to(t.dtype)


class HalfOperandConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups):
        xr, wr = f16(x), f16(w)
        ctx.save_for_backward(xr, wr)
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.has_bias = b is not None
        return CONV2D(xr, wr, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, dy):
        xr, wr = ctx.saved_tensors
        dyr = f16(dy)
        stride, padding, dilation, groups = ctx.geometry
        dx = torch.nn.grad.conv2d_input(xr.shape, wr, dyr, stride, padding, dilation, groups)
        dw = torch.nn.grad.conv2d_weight(xr, wr.shape, dyr, stride, padding, dilation, groups)
        db = dyr.sum((0, 2, 3)) if ctx.has_bias else None
        return dx, dw, db, None, None, None, None


class HalfOperandLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        xr, wr = f16(x), f16(w)
        ctx.save_for_backward(xr, wr)
        ctx.has_bias = b is not None
        return LINEAR(xr, wr, b)

    @staticmethod
    def backward(ctx, dy):
        xr, wr = ctx.saved_tensors
        dyr = f16(dy)
        rows = dyr.reshape(-1, dyr.shape[-1])
        dx = dyr @ wr
        dw = rows.t() @ xr.reshape(-1, xr.shape[-1])
        db = rows.sum(0) if ctx.has_bias else None
        return dx, dw, db


class StoredHalf(torch.autograd.Function):
    """An activation stored as f16: its value rounded, and its gradient when it is stored."""

    @staticmethod
    def forward(ctx, x):
        return f16(x)

    @staticmethod
    def backward(ctx, dy):
        return f16(dy)


def stored(out):
    return StoredHalf.apply(out[0]) if isinstance(out, tuple) else StoredHalf.apply(out)


SDPA = F.scaled_dot_product_attention


def half_storage(model):
    """Rounds, value and gradient, what our U-Net stores as f16 (see the module docstring)."""
    for name, mod in model.named_modules():
        leaf = name.split(".")[-1]
        if name.startswith("time_embedding") or name == "conv_out":
            continue
        rounds_output = (
            isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))
            or (isinstance(mod, torch.nn.GroupNorm) and leaf == "group_norm")
            or type(mod).__name__ in ("ResnetBlock2D", "Attention")
        )
        if rounds_output:
            mod.register_forward_hook(lambda _m, _i, out: stored(out))
        if isinstance(mod, torch.nn.SiLU):
            # The SiLU of the time embedding (2-D, inside each resnet) stays f32.
            mod.register_forward_hook(lambda _m, i, out: stored(out) if out.dim() == 4 else out)
        if leaf == "norm2":
            mod.register_forward_pre_hook(lambda _m, i: (StoredHalf.apply(i[0]),))
    # The attention core's output (o) is stored; its internals are f32.
    F.scaled_dot_product_attention = lambda *a, **k: StoredHalf.apply(SDPA(*a, **k))


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    return HalfOperandConv2d.apply(x, w, b, stride, padding, dilation, groups)


def linear(x, w, b=None):
    if FULL_PRECISION[0]:
        return LINEAR(x, w, b)
    return HalfOperandLinear.apply(x, w, b)


def half_operands(model):
    """Routes the model's convs and Linears through the rounding functions above."""
    F.conv2d, F.linear = conv2d, linear
    inner = model.time_embedding.forward

    def time_embedding_in_f32(*args, **kwargs):
        FULL_PRECISION[0] = True
        try:
            return inner(*args, **kwargs)
        finally:
            FULL_PRECISION[0] = False

    model.time_embedding.forward = time_embedding_in_f32


def act_modules(model):
    for name, mod in model.named_modules():
        parts = name.split(".")
        if name in ACT_TOP or (len(parts) >= 2 and parts[-2] in ACT_SUFFIXES and parts[-1].isdigit()):
            yield name, mod


def run_step(model, x0, noise, t, acp, acts=None):
    """Forward, MSE, backward of the loss × LOSS_SCALE; gradients left unscaled in .grad."""
    a = acp[t].to(x0.dtype).view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    handles = []
    if acts is not None:
        for name, mod in act_modules(model):
            def hook(_m, _i, out, name=name):
                acts[name] = (out[0] if isinstance(out, tuple) else out).detach().clone()
            handles.append(mod.register_forward_hook(hook))
    model.zero_grad(set_to_none=True)
    eps = model(x_t, t).sample
    loss = F.mse_loss(eps, noise)
    (loss * LOSS_SCALE).backward()
    for p in model.parameters():
        p.grad /= LOSS_SCALE
    for h in handles:
        h.remove()
    return x_t, eps.detach(), loss.detach()


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/ref_tiny16_f16_s0.safetensors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4)
    a = ap.parse_args()
    torch.set_num_threads(1)

    torch.manual_seed(a.seed)
    model = UNet2DModel(**TINY16)
    model.train()
    plain = copy.deepcopy(model)
    model64 = copy.deepcopy(model).double()
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shape = (a.batch, 1, 16, 16)
    acp = DDPMScheduler(**SCHEDULE).alphas_cumprod.to(torch.float32)
    g = torch.Generator().manual_seed(a.seed + 1000)
    x0 = torch.rand(shape, generator=g) * 2 - 1
    noise = torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (a.batch,), generator=g, dtype=torch.int64)

    # The unrounded f32 step first, before the functions are replaced.
    _, eps_plain, loss_plain = run_step(plain, x0, noise, t, acp)
    grads_plain = {n: p.grad.clone() for n, p in plain.named_parameters()}

    for m in (model, model64):
        half_operands(m)
        half_storage(m)
    acts = {}
    x_t, eps, loss = run_step(model, x0, noise, t, acp, acts)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    _, eps64, loss64 = run_step(model64, x0.double(), noise.double(), t, acp.double())
    g64 = {n: p.grad for n, p in model64.named_parameters()}

    # As make_reference.py: analytically zero gradients (attention to_k.bias) are rounding
    # noise; relative errors are taken over the others.
    gmax = max(float(v.norm()) for v in g64.values())
    near_zero = sorted(n for n in g64 if float(g64[n].norm()) < 1e-6 * gmax)
    live = [n for n in grads if n not in near_zero]
    vs64 = {n: rel(grads[n], g64[n]) for n in live}
    vs_plain = {n: rel(grads_plain[n], grads[n]) for n in live}
    worst64 = max(vs64, key=vs64.get)
    worst_plain = max(vs_plain, key=vs_plain.get)
    tol = dict(
        eps_pred_rel_l2_vs_f64=rel(eps, eps64),
        loss_rel_vs_f64=abs(float(loss) - float(loss64)) / float(loss64),
        grad_rel_l2_vs_f64_max=vs64[worst64],
        grad_rel_l2_vs_f64_max_param=worst64,
        grad_rel_l2_vs_f64_median=sorted(vs64.values())[len(vs64) // 2],
        unrounded_eps_pred_rel_l2=rel(eps_plain, eps),
        unrounded_loss_rel=abs(float(loss_plain) - float(loss)) / float(loss),
        unrounded_grad_rel_l2_max=vs_plain[worst_plain],
        unrounded_grad_rel_l2_max_param=worst_plain,
        unrounded_grad_rel_l2_median=sorted(vs_plain.values())[len(vs_plain) // 2],
        unrounded_grad_rel_l2_min=min(vs_plain.values()),
        near_zero_grad_params=near_zero,
        note="vs_f64: this f32 step against a float64 run of the same rounded model; "
        "unrounded: the plain f32 step (ref_tiny16_s0's) against this one",
    )

    tensors = {"param." + k: v for k, v in init.items()}
    tensors.update(
        x0=x0,
        noise=noise,
        timesteps=t.to(torch.int32),
        alphas_cumprod=acp,
        x_t=x_t.detach(),
        eps_pred=eps,
        loss=loss.reshape(()),
        unrounded_eps_pred=eps_plain,
    )
    for k, v in grads.items():
        tensors["grad." + k] = v
    for k, v in acts.items():
        tensors["act." + k] = v.to(torch.float32)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY16.items()}
    meta = dict(
        config_name="tiny16",
        config=config,
        model_class="diffusers.UNet2DModel",
        precision="f16",
        operands="f16-rounded inputs of every conv and Linear (forward and both backward "
        "products), f32 accumulation, bias in f32, bias gradient = sum of rounded dY; "
        "time_embedding.linear_1/2, attention core internals, norms' statistics, loss in f32",
        storage="f16 values and gradients of the stored activations: conv and Linear outputs "
        "(not conv_out, not the time-embedding MLP), SiLU after GroupNorm, norm2's input, resnet "
        "and attention block outputs, attention GroupNorm output, attention core output",
        loss_scale=LOSS_SCALE,
        seed=a.seed,
        batch=a.batch,
        init="torch.manual_seed(seed); UNet2DModel(**config) (diffusers default init)",
        data_rng="torch.Generator().manual_seed(seed+1000): x0=rand*2-1, noise=randn, timesteps=randint(0,1000)",
        schedule=SCHEDULE,
        loss="mse_loss(eps_pred, noise); backward of loss * loss_scale, gradients / loss_scale",
        unrounded_fixture="ref_tiny16_s0.safetensors",
        tolerance_hints=tol,
        loss_value=float(loss),
        torch=torch.__version__,
        diffusers=diffusers.__version__,
    )
    save_file(tensors, a.out, metadata={"meta": json.dumps(meta)})
    os.chmod(a.out, 0o644)
    print(json.dumps(dict(out=a.out, bytes=os.path.getsize(a.out), loss=float(loss),
                          loss_unrounded=float(loss_plain), tolerance_hints=tol), indent=1))


if __name__ == "__main__":
    main()
