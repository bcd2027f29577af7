#!/usr/bin/env python3
"""How faithfully each super-resolution stage keeps the image it is given.

A super-resolution stage should add detail, not change what is already there:
box-downsampled to its input's size, its output should be its input. For each
prompt this runs `diffusiond generate` with `--stages 1`, `2`, ... on the same
seed (every run repeats the earlier stages exactly), downsamples each stage's
output to the previous stage's size and prints, per stage, the mean absolute
difference over all pixels and the largest channel shift of the background
(the mean of the four 3×3-pixel corners of the input), both on the 0–255 scale.
A faithful stage scores a few units; a stage that recolours its input scores
tens.

    scripts/sr_consistency.py [--model models/default] [--images 4] [--seed 11]
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

PROMPTS = [
    "a red circle above a blue square",
    "a green triangle",
    "two yellow stars",
    "a purple ring to the left of an orange cross",
    "three orange squares",
    "a purple circle",
]


def generate(binary, model, prompt, stages, images, seed, out):
    cmd = [binary, "generate", prompt, "--model", model, "-n", str(images), "--seed", str(seed), "--stages", str(stages), "-o", out]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return [line for line in result.stdout.splitlines() if line.endswith(".png")]


def corners(a):
    k = 3
    parts = [a[:k, :k], a[:k, -k:], a[-k:, :k], a[-k:, -k:]]
    return np.concatenate([p.reshape(-1, 3) for p in parts]).mean(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/default")
    parser.add_argument("--binary", default="target/release/diffusiond")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--stages", type=int, default=3, help="stages in the cascade")
    args = parser.parse_args()
    diffs = {s: [] for s in range(2, args.stages + 1)}
    shifts = {s: [] for s in range(2, args.stages + 1)}
    with tempfile.TemporaryDirectory() as tmp:
        for p, prompt in enumerate(PROMPTS):
            outputs = {}
            for s in range(1, args.stages + 1):
                files = generate(args.binary, args.model, prompt, s, args.images, args.seed + 16 * p, os.path.join(tmp, f"{p}-{s}"))
                outputs[s] = [np.asarray(Image.open(f).convert("RGB")).astype(np.float64) for f in files]
            for s in range(2, args.stages + 1):
                for low, high in zip(outputs[s - 1], outputs[s]):
                    size = low.shape[1], low.shape[0]
                    down = np.asarray(Image.fromarray(high.astype(np.uint8)).resize(size, Image.BOX)).astype(np.float64)
                    diffs[s].append(np.abs(down - low).mean())
                    shifts[s].append(np.abs(corners(down) - corners(low)).max())
    print(f"{len(PROMPTS)} prompts × {args.images} images, model {args.model}")
    print("| stage | mean abs difference | background shift (median) | background shift > 16 |")
    print("|---|---:|---:|---:|")
    for s in diffs:
        d, b = np.array(diffs[s]), np.array(shifts[s])
        print(f"| {s} | {d.mean():.1f} | {np.median(b):.1f} | {100 * (b > 16).mean():.0f}% |")


if __name__ == "__main__":
    sys.exit(main())
