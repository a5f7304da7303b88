#!/usr/bin/env python3
"""Compares `wgpu-diffusion sample --save-tensor OURS` with the image diffusers made from the same
initial latents (a reference file of tools/make_sd15_pipeline.py).

    python tools/make_sd15_pipeline.py --out /tmp/sd15 [--size 128 --reference-only]
    python - <<'EOF'   # the reference's latents as --noise
    from safetensors.torch import load_file, save_file
    r = load_file("/tmp/sd15/reference.safetensors")
    save_file({"noise": r["latents"].contiguous()}, "/tmp/sd15/noise.safetensors")
    EOF
    wgpu-diffusion sample --model /tmp/sd15/pipeline --prompt "<the reference's prompt>" \\
        --negative-prompt blurry --guidance-scale 7.5 --steps 2 \\
        --noise /tmp/sd15/noise.safetensors --save-tensor /tmp/sd15/ours.safetensors
    python tools/check_sd15_sample.py /tmp/sd15/reference.safetensors /tmp/sd15/ours.safetensors

Prints the largest |ours - diffusers| over the image, both as diffusers' output_type "np"
((x / 2 + 0.5).clamp(0, 1), NHWC), and exits 1 above --tolerance (default 2e-3, issue 10's
bound for images).
"""
import argparse
import sys

from safetensors.torch import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("reference")
    ap.add_argument("ours")
    ap.add_argument("--tolerance", type=float, default=2e-3)
    args = ap.parse_args()
    ref = load_file(args.reference)
    theirs = ref["image"]
    ours = load_file(args.ours)["sample"]  # [N, C, H, W] in [-1, 1]
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    if ours.shape != theirs.shape:
        sys.exit(f"shapes differ: ours {tuple(ours.shape)}, diffusers {tuple(theirs.shape)}")
    diff = (ours - theirs).abs()
    print(
        f"image {tuple(theirs.shape)}: max |ours - diffusers| {diff.max().item():.3e}, "
        f"mean {diff.mean().item():.3e} (values in [0, 1])"
    )
    if diff.max().item() > args.tolerance:
        sys.exit(f"above the tolerance {args.tolerance}")


if __name__ == "__main__":
    main()
