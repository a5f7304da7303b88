#!/usr/bin/env python3
"""Writes the AutoencoderKL parity fixtures of tests/fixtures/vae/ with torch + diffusers.

Not needed to build or test wgpu-diffusion; it only regenerates what the tests compare against:

    pip install torch diffusers safetensors numpy
    python tools/make_vae_fixtures.py [--out tests/fixtures/vae] [--seed 0]

The model: a small random `diffusers.AutoencoderKL` with the block types of Stable Diffusion's VAE
at tiny widths (CONFIG below; every other option is diffusers' default: mid-block attention,
quant_conv / post_quant_conv, scaling_factor 0.18215, GroupNorm eps 1e-6, dropout 0). Built with
`torch.manual_seed(seed)`, then every parameter is overwritten from `torch.Generator(seed + 1)`,
in `named_parameters()` order, so that nothing is trivially zero or one:

    conv / linear weight   N(0, 1) / sqrt(fan_in)     (fan_in = in_channels * kh * kw)
    conv / linear bias     N(0, 0.05^2)
    GroupNorm weight       1 + N(0, 0.1^2)
    GroupNorm bias         N(0, 0.1^2)

Files written under --out:

* `model/`: `vae.save_pretrained(...)` untouched (config.json + diffusion_pytorch_model.safetensors),
  the interchange input for the loader;
* `model_noattn/`: a second tiny AutoencoderKL (CONFIG_NOATTN: mid_block_add_attention=False,
  use_quant_conv=False, use_post_quant_conv=False, layers_per_block=2, 3 channels, 3 levels),
  saved the same way (config + weights only), for the loader test; its outputs on a fixed input
  are in the main file under `noattn.*` (see below);
* `ref_vae_tiny_s0.safetensors` (the seed in the name): the tensors below, all float32,
  contiguous, images NCHW, B = 2.

  param.<name>       every parameter under its diffusers state_dict name, initial values
                     (identical to model/diffusion_pytorch_model.safetensors)
  x0                 input images, uniform in [-1, 1]                               [2,1,16,16]
  (Two levels => one Downsample2D => latents are 8x8: the VAE downsamples by
  2^(len(block_out_channels) - 1), as SD's 4-level VAE does by 8.)
  eps                posterior noise ~ N(0, 1)                                     [2,4,8,8]
  moments            quant_conv(encoder(x0)): channels 0..3 mean, 4..7 raw logvar  [2,8,8,8]
  mean               moments[:, :4]                                                [2,4,8,8]
  logvar             clamp(moments[:, 4:], -30, 20)  (DiagonalGaussianDistribution) [2,4,8,8]
  std                exp(0.5 * logvar)                                             [2,4,8,8]
  z                  mean + std * eps  (== posterior.sample() with that noise)     [2,4,8,8]
  x_rec              vae.decode(z).sample = decoder(post_quant_conv(z))            [2,1,16,16]
  x_rec_mode         vae.decode(mean).sample (== vae(x0).sample, sample_posterior=False)
                                                                                   [2,1,16,16]
  kl                 posterior.kl(), per sample:
                     0.5 * sum_{c,h,w} (mean^2 + exp(logvar) - 1 - logvar)         [2]
  rec_loss           (1/B) * sum_{b,c,h,w} |x0 - x_rec|                            [] (0-d)
  kl_mean            (1/B) * sum_b kl[b]                                           [] (0-d)
  loss               rec_loss + KL_WEIGHT * kl_mean, KL_WEIGHT = 1e-6              [] (0-d)
  grad.<name>        d loss / d param, every parameter
  grad_kl.<name>     d kl_mean / d param (unweighted), only the encoder.* and quant_conv.*
                     params: the KL part of grad.* is ~1e-6 of it and invisible there
  dgrad.<t>          d loss / d t for t in moments, z, x_rec (backward debugging)
  after_adam.<name>  params after ONE torch.optim.Adam step on grad.*: lr 1e-3, betas (0.5, 0.9),
                     eps 1e-8, no weight decay; on the first step m_hat = g, v_hat = g^2, so
                     p1 = p0 - lr * g / (|g| + eps). The two *.attentions.0.to_k.bias have an
                     analytically zero gradient (softmax ignores a per-query constant): their
                     grad.* is f32 rounding noise (~1e-7 > eps), so their after_adam.* moved by
                     ~+-lr at random; compare those with a tolerance of lr (or skip them)
  act.<module>       forward outputs, from the loss forward (decode(z), not decode(mean)):
                     encoder.conv_in, encoder.down_blocks.<i>, encoder.mid_block,
                     encoder.conv_out, quant_conv, post_quant_conv, decoder.conv_in,
                     decoder.mid_block, decoder.up_blocks.<i>, decoder.conv_out, and the finer
                     *.resnets.<j>, *.attentions.<j>, *.downsamplers.0, *.upsamplers.0,
                     encoder.conv_norm_out, decoder.conv_norm_out (before SiLU)
  noattn.mean        model_noattn: encoder(x0)[:, :4] (no quant_conv)               [2,4,4,4]
  noattn.logvar      model_noattn: clamp(encoder(x0)[:, 4:], -30, 20)               [2,4,4,4]
  noattn.x_rec_mode  model_noattn: vae.decode(noattn.mean).sample (no post_quant_conv) [2,1,16,16]

  Metadata key "meta": JSON with both configs, seed, RNG recipe, formulas, versions, and
  tolerance hints (torch f32 vs a float64 re-run of the identical step).
"""
import argparse
import copy
import json
import os

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.torch import save_file

KL_WEIGHT = 1e-6
ADAM = dict(lr=1e-3, betas=(0.5, 0.9), eps=1e-8, weight_decay=0.0)
BATCH = 2

CONFIG = dict(
    in_channels=1,
    out_channels=1,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[8, 16],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
    act_fn="silu",
)

CONFIG_NOATTN = dict(
    in_channels=1,
    out_channels=1,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[4, 8, 8],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=2,
    sample_size=16,
    act_fn="silu",
    mid_block_add_attention=False,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

ACT_TOP = {
    "encoder.conv_in", "encoder.mid_block", "encoder.conv_norm_out", "encoder.conv_out",
    "quant_conv", "post_quant_conv",
    "decoder.conv_in", "decoder.mid_block", "decoder.conv_norm_out", "decoder.conv_out",
}
ACT_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers")
INIT = ("conv/linear weight N(0,1)/sqrt(fan_in); conv/linear bias N(0,0.05^2); "
        "GroupNorm weight 1+N(0,0.1^2), bias N(0,0.1^2); drawn from torch.Generator(seed+1) "
        "in named_parameters() order, after torch.manual_seed(seed); AutoencoderKL(**config)")


def make_vae(config, seed):
    torch.manual_seed(seed)
    vae = AutoencoderKL(**config)
    g = torch.Generator().manual_seed(seed + 1)
    owners = {f"{m}.{p}" if m else p: mod for m, mod in vae.named_modules()
              for p, _ in mod.named_parameters(recurse=False)}
    with torch.no_grad():
        for name, p in vae.named_parameters():
            mod = owners[name]
            r = torch.randn(p.shape, generator=g)
            if isinstance(mod, torch.nn.GroupNorm):
                p.copy_(1.0 + 0.1 * r if name.endswith("weight") else 0.1 * r)
            elif isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                if name.endswith("weight"):
                    p.copy_(r / float(np.sqrt(p[0].numel())))
                else:
                    p.copy_(0.05 * r)
            else:
                raise ValueError(f"unexpected parameter owner {name}: {type(mod).__name__}")
    return vae


def act_modules(vae):
    for name, mod in vae.named_modules():
        parts = name.split(".")
        if name in ACT_TOP or (len(parts) >= 2 and parts[-2] in ACT_LISTS and parts[-1].isdigit()):
            yield name, mod


def run_step(vae, x0, eps, acts=None):
    """Forward + loss + backward (grads left in .grad). Returns a dict of tensors."""
    handles = []
    if acts is not None:
        for name, mod in act_modules(vae):
            def hook(_m, _i, out, name=name):
                if isinstance(out, tuple):
                    out = out[0]
                acts.setdefault(name, out.detach().clone())  # first call only
            handles.append(mod.register_forward_hook(hook))
    vae.zero_grad(set_to_none=True)
    h = vae.encoder(x0)
    moments = vae.quant_conv(h)
    moments.retain_grad()
    post = DiagonalGaussianDistribution(moments)
    z = post.mean + post.std * eps
    z.retain_grad()
    x_rec = vae.decode(z).sample
    x_rec.retain_grad()
    for hd in handles:
        hd.remove()
    kl = post.kl()
    b = x0.shape[0]
    rec_loss = (x0 - x_rec).abs().sum() / b
    kl_mean = kl.mean()
    loss = rec_loss + KL_WEIGHT * kl_mean
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in vae.named_parameters()}
    out = dict(moments=moments.detach(), mean=post.mean.detach(), logvar=post.logvar.detach(),
               std=post.std.detach(), z=z.detach(), x_rec=x_rec.detach(), kl=kl.detach(),
               rec_loss=rec_loss.detach(), kl_mean=kl_mean.detach(), loss=loss.detach(),
               dgrad=dict(moments=moments.grad.detach(), z=z.grad.detach(), x_rec=x_rec.grad.detach()),
               grads=grads)
    # The KL gradient alone, through the encoder (a second graph: same values).
    vae.zero_grad(set_to_none=True)
    kl_only = DiagonalGaussianDistribution(vae.quant_conv(vae.encoder(x0))).kl().mean()
    kl_only.backward()
    out["grads_kl"] = {n: p.grad.detach().clone() for n, p in vae.named_parameters()
                       if n.startswith(("encoder.", "quant_conv.")) and p.grad is not None}
    with torch.no_grad():
        out["x_rec_mode"] = vae.decode(out["mean"]).sample
    # Restore the loss gradients for the optimizer step.
    for n, p in vae.named_parameters():
        p.grad = grads[n].clone()
    return out


def rel(a32, a64):
    return float((a32.double() - a64).norm() / a64.norm().clamp_min(1e-300))


def max_abs(a32, a64):
    return float((a32.double() - a64).abs().max())


def tolerance(r32, r64, after32, after64):
    tol = {}
    for k in ("moments", "mean", "logvar", "std", "z", "x_rec", "x_rec_mode", "kl"):
        tol[f"{k}_max_abs_err"] = max_abs(r32[k], r64[k])
        tol[f"{k}_rel_l2_err"] = rel(r32[k], r64[k])
    for k in ("rec_loss", "kl_mean", "loss"):
        tol[f"{k}_abs_err"] = max_abs(r32[k], r64[k])
        tol[f"{k}_rel_err"] = max_abs(r32[k], r64[k]) / abs(float(r64[k]))
    g32, g64 = r32["grads"], r64["grads"]
    gmax = max(float(v.norm()) for v in g64.values())
    near_zero = sorted(n for n in g64 if float(g64[n].norm()) < 1e-6 * gmax)
    grad_rel = {n: rel(g32[n], g64[n]) for n in g32 if n not in near_zero}
    worst = max(grad_rel, key=grad_rel.get)
    tol.update(
        grad_rel_l2_err_max=grad_rel[worst],
        grad_rel_l2_err_max_param=worst,
        grad_max_abs_err=max(max_abs(g32[n], g64[n]) for n in g32),
        grad_max_abs=max(float(v.abs().max()) for v in g64.values()),
        near_zero_grad_params=near_zero,
        near_zero_grad_max_abs_f32=max([float(g32[n].abs().max()) for n in near_zero], default=0.0),
    )
    k32, k64 = r32["grads_kl"], r64["grads_kl"]
    kl_rel = {n: rel(k32[n], k64[n]) for n in k32 if n not in near_zero}
    tol["grad_kl_rel_l2_err_max"] = max(kl_rel.values())
    tol["grad_kl_rel_l2_err_max_param"] = max(kl_rel, key=kl_rel.get)
    # Adam's first step is lr * g / (|g| + eps) ~ lr * sign(g): elements whose gradient is
    # rounding noise (the near-zero params: f32 noise ~1e-7 >> eps, f64 ~1e-15 << eps) move by
    # +-lr in f32 and ~0 in f64, so compare after_adam on the other params only.
    def adam_diffs(names):
        return torch.cat([(after32[n].double() - after64[n]).abs().flatten() for n in names])
    diffs = adam_diffs([n for n in after32 if n not in near_zero])
    nz = adam_diffs(near_zero) if near_zero else torch.zeros(1)
    tol.update(
        after_adam_max_abs_err=float(diffs.max()),
        after_adam_n_elems_err_gt_1em7=int((diffs > 1e-7).sum()),
        after_adam_n_elems=int(diffs.numel()),
        after_adam_near_zero_params_max_abs_err=float(nz.max()),
        note="torch f32 (CPU) vs float64 re-run of the identical step (same params, x0, eps)",
    )
    return tol


def write_noattn(out_dir, seed, x0):
    vae = make_vae(CONFIG_NOATTN, seed + 7).train()
    d = os.path.join(out_dir, "model_noattn")
    vae.save_pretrained(d)
    with torch.no_grad():
        post = vae.encode(x0).latent_dist
        x_rec = vae.decode(post.mean).sample
    return {"noattn.mean": post.mean, "noattn.logvar": post.logvar, "noattn.x_rec_mode": x_rec}, vae


def check_reload(d, vae, x0):
    loaded = AutoencoderKL.from_pretrained(d, low_cpu_mem_usage=False)
    sd_a, sd_b = vae.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys(), set(sd_a) ^ set(sd_b)
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    with torch.no_grad():
        a = vae(x0).sample
        b = loaded(x0).sample
    assert torch.equal(a, b)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "vae"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)

    vae = make_vae(CONFIG, a.seed).train()
    model_dir = os.path.join(a.out, "model")
    vae.save_pretrained(model_dir)
    vae64 = copy.deepcopy(vae).double()
    init = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    assert set(init) == {n for n, _ in vae.named_parameters()}, "buffers in state_dict"

    g = torch.Generator().manual_seed(a.seed + 1000)
    x0 = torch.rand(BATCH, CONFIG["in_channels"], CONFIG["sample_size"], CONFIG["sample_size"], generator=g) * 2 - 1
    lat = CONFIG["sample_size"] // 2 ** (len(CONFIG["block_out_channels"]) - 1)
    eps = torch.randn(BATCH, CONFIG["latent_channels"], lat, lat, generator=g)

    acts = {}
    r32 = run_step(vae, x0, eps, acts)
    opt = torch.optim.Adam(vae.parameters(), **ADAM)
    opt.step()
    after = {n: p.detach().clone() for n, p in vae.named_parameters()}

    # Consistency with diffusers' own entry points.
    ref = copy.deepcopy(vae).eval()
    ref.load_state_dict(init)
    with torch.no_grad():
        post = ref.encode(x0).latent_dist
        assert torch.allclose(post.mean, r32["mean"], atol=1e-6)
        assert torch.allclose(post.logvar, r32["logvar"], atol=1e-6)
        assert torch.allclose(ref(x0).sample, r32["x_rec_mode"], atol=1e-6)
    check_reload(model_dir, ref, x0)

    r64 = run_step(vae64, x0.double(), eps.double())
    opt64 = torch.optim.Adam(vae64.parameters(), **ADAM)
    opt64.step()
    after64 = {n: p.detach().clone() for n, p in vae64.named_parameters()}
    tol = tolerance(r32, r64, after, after64)

    noattn, vae_na = write_noattn(a.out, a.seed, x0)
    check_reload(os.path.join(a.out, "model_noattn"), vae_na, x0)

    t = {}
    for k, v in init.items():
        t["param." + k] = v
    t["x0"], t["eps"] = x0, eps
    for k in ("moments", "mean", "logvar", "std", "z", "x_rec", "x_rec_mode", "kl"):
        t[k] = r32[k]
    for k in ("rec_loss", "kl_mean", "loss"):
        t[k] = r32[k].reshape(())
    for k, v in r32["grads"].items():
        t["grad." + k] = v
    for k, v in r32["grads_kl"].items():
        t["grad_kl." + k] = v
    for k, v in r32["dgrad"].items():
        t["dgrad." + k] = v
    for k, v in after.items():
        t["after_adam." + k] = v
    for k, v in acts.items():
        t["act." + k] = v
    t.update(noattn)
    t = {k: v.detach().to(torch.float32).contiguous() for k, v in t.items()}
    for k, v in t.items():
        assert torch.isfinite(v).all(), k

    meta = dict(
        model_class="diffusers.AutoencoderKL",
        config=CONFIG,
        config_full={k: v for k, v in ref.config.items() if not k.startswith("_")},
        config_noattn=CONFIG_NOATTN,
        seed=a.seed,
        seed_noattn=a.seed + 7,
        batch=BATCH,
        init=INIT,
        data_rng="torch.Generator().manual_seed(seed+1000): x0 = rand(2,1,16,16)*2-1, then eps = randn(2,4,8,8)",
        posterior=("moments = quant_conv(encoder(x0)); mean, logvar = chunk(moments, 2, dim=1); "
                   "logvar = clamp(logvar, -30, 20); std = exp(0.5*logvar); z = mean + std*eps"),
        kl="kl[b] = 0.5 * sum_{c,h,w}(mean^2 + exp(logvar) - 1 - logvar)  (DiagonalGaussianDistribution.kl(), vs N(0,1))",
        loss=("loss = (1/B) sum_{b,c,h,w} |x0 - x_rec| + kl_weight * (1/B) sum_b kl[b], "
              "x_rec = decoder(post_quant_conv(z)), kl_weight = 1e-6; rec_loss and kl_mean saved separately"),
        kl_weight=KL_WEIGHT,
        adam=dict(ADAM, betas=list(ADAM["betas"]), steps=1, bias_correction=True, amsgrad=False,
                  first_step="p1 = p0 - lr * g / (|g| + eps)"),
        noattn=("model_noattn: mean, logvar = chunk(encoder(x0), 2, dim=1) (no quant_conv), "
                "x_rec_mode = decoder(mean) (no post_quant_conv); eval, no grad"),
        prefixes=["param.", "grad.", "grad_kl.", "dgrad.", "after_adam.", "act.", "noattn."],
        n_params=int(sum(v.numel() for v in init.values())),
        loss_value=float(r32["loss"]),
        rec_loss_value=float(r32["rec_loss"]),
        kl_mean_value=float(r32["kl_mean"]),
        tolerance_hints=tol,
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        layout="float32, row-major, NCHW; conv weight [out,in,kh,kw]; attention to_q/to_k/to_v/to_out.0 are nn.Linear [out,in]",
    )
    out = os.path.join(a.out, f"ref_vae_tiny_s{a.seed}.safetensors")
    save_file(t, out, metadata={"meta": json.dumps(meta)})
    for root, _, files in os.walk(a.out):
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    print(json.dumps(dict(out=out, bytes=os.path.getsize(out), n_tensors=len(t), n_params=meta["n_params"],
                          loss=meta["loss_value"], rec_loss=meta["rec_loss_value"], kl_mean=meta["kl_mean_value"],
                          tolerance_hints=tol), indent=1))


if __name__ == "__main__":
    main()
