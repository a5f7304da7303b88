#!/usr/bin/env python3
"""How often a text-to-image MNIST model draws the digit its prompt names (issue 23).

Not needed to build or test wgpu-diffusion. Two steps, with torch (CPU is enough):

    pip install torch numpy pillow
    python tools/prompt_accuracy.py train-classifier [--mnist ../shared/data/mnist] [--out classifier.pt]
    python tools/prompt_accuracy.py eval --model runs/text/model [--classifier classifier.pt] \\
        [--num 50] [--guidance 1 3] [--steps 25] [--sampler ddim --eta 0] [--bin target/release/wgpu-diffusion]

`train-classifier` trains a small CNN (two conv layers, one hidden dense layer) on MNIST's 60k
training digits for 3 epochs and prints its accuracy on the 10k test digits (>= 98% is what the
evaluation needs; it stops with an error below that). `eval` samples `--num` images per prompt
"a handwritten <digit name>" with `wgpu-diffusion sample` (`--steps` of its default sampler for the model,
ancestral DDPM for a `train --text-conditional` export, unless `--sampler`; seeds fixed) at each
guidance scale, classifies them, and prints a Markdown table: the share read as the prompted
digit, per prompt and overall.
"""
import argparse
import gzip
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def net():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * 7 * 7, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10),
    )


def as_input(u8):
    """uint8 [N, 28, 28] -> the network's input, [-1, 1] as the diffusion model's data."""
    return torch.from_numpy(u8.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)


def train_classifier(a):
    torch.manual_seed(0)
    xs = as_input(idx(os.path.join(a.mnist, "train-images.idx3-ubyte.gz")))
    ys = torch.from_numpy(idx(os.path.join(a.mnist, "train-labels.idx1-ubyte.gz")).astype(np.int64))
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(3):
        perm = torch.randperm(len(xs))
        for i in range(0, len(xs), 128):
            j = perm[i : i + 128]
            loss = torch.nn.functional.cross_entropy(model(xs[j]), ys[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}", flush=True)
    tx = as_input(idx(os.path.join(a.mnist, "t10k-images.idx3-ubyte.gz")))
    ty = torch.from_numpy(idx(os.path.join(a.mnist, "t10k-labels.idx1-ubyte.gz")).astype(np.int64))
    with torch.no_grad():
        acc = (model(tx).argmax(1) == ty).float().mean().item()
    print(f"test accuracy {100 * acc:.2f}% on 10000 digits")
    if acc < 0.98:
        sys.exit("the classifier is below 98%: train it longer before trusting the evaluation")
    torch.save(model.state_dict(), a.out)
    print("saved", a.out)


def evaluate(a):
    model = net()
    model.load_state_dict(torch.load(a.classifier))
    model.eval()
    rows = []
    totals = {g: [0, 0] for g in a.guidance}
    for d, word in enumerate(WORDS):
        if d not in a.digits:
            continue
        prompt = f"a handwritten {word}"
        row = [prompt]
        for g in a.guidance:
            out = os.path.join(a.work, f"g{g}", word)
            source = "--checkpoint" if a.model.endswith(".safetensors") else "--model"
            cmd = [a.bin, "sample", source, a.model, "--prompt", prompt, "--guidance-scale", str(g),
                   "--num", str(a.num), "--sample-steps", str(a.steps), "--seed", str(a.seed + d), "--out", out]
            if a.sampler:
                cmd += ["--sampler", a.sampler]
            if a.eta is not None:
                cmd += ["--eta", str(a.eta)]
            run = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if run.returncode != 0:
                sys.exit(f"{' '.join(cmd)} failed:\n{run.stderr}")
            files = sorted(f for f in os.listdir(out) if f[0].isdigit() and f.endswith(".png"))
            imgs = np.stack([np.asarray(Image.open(os.path.join(out, f)).convert("L").resize((28, 28))) for f in files])
            with torch.no_grad():
                pred = model(as_input(imgs)).argmax(1).numpy()
            hits = int((pred == d).sum())
            totals[g][0] += hits
            totals[g][1] += len(files)
            row.append(f"{100 * hits / len(files):.0f}%")
            print(f"{prompt!r} guidance {g}: {hits}/{len(files)} read as {d}; predictions {np.bincount(pred, minlength=10).tolist()}", flush=True)
        rows.append(row)
    print()
    print("| prompt | " + " | ".join(f"guidance {g}" for g in a.guidance) + " |")
    print("|---|" + "---|" * len(a.guidance))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print("| **all** | " + " | ".join(f"**{100 * h / n:.1f}%**" for h, n in totals.values()) + " |")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train-classifier")
    t.add_argument("--mnist", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist"))
    t.add_argument("--out", default="classifier.pt")
    e = sub.add_parser("eval")
    e.add_argument("--model", required=True, help="a pipeline directory, or a run's checkpoint (.safetensors)")
    e.add_argument("--classifier", default="classifier.pt")
    e.add_argument("--num", type=int, default=50)
    e.add_argument("--steps", type=int, default=25)
    e.add_argument("--seed", type=int, default=100)
    e.add_argument("--digits", type=int, nargs="+", default=list(range(10)), help="the prompts' digits (default: all ten)")
    e.add_argument("--sampler", help="wgpu-diffusion's --sampler (default: sample's own choice, ddpm for a text export)")
    e.add_argument("--eta", type=float, help="DDIM's eta (0: deterministic, 1: DDPM-like noise)")
    e.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0])
    e.add_argument("--bin", default="target/release/wgpu-diffusion")
    e.add_argument("--work", default="prompt-accuracy")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.cmd == "train-classifier":
        train_classifier(a)
    else:
        evaluate(a)


if __name__ == "__main__":
    main()
