#!/usr/bin/env python3
"""Checks a trained base stage with diffusers, independently of diffusiond's
samplers (run it with the reference venv, `.venv-fixtures/bin/python`).

    scripts/diagnose_stage.py sample STAGE_DIR OUT.png [--guidance 3] [--no-threshold]
    scripts/diagnose_stage.py x0 STAGE_DIR
    scripts/diagnose_stage.py x0grid STAGE_DIR OUT.png [--seed 77]
    scripts/diagnose_stage.py words STAGE_DIR [--out OUT.png]

`sample` draws six prompts with diffusers' DDIMScheduler (50 steps, the stage's
scheduler config, optionally without dynamic thresholding) and MiniLM
embeddings from transformers, padded to 32 tokens as diffusiond pads them.
`x0` noises eight dataset renders (`diffusiond dataset`) to several timesteps
and prints the model's x̂₀ error next to that of each image's own mean colour:
an ε model's x̂₀ degrades sharply near t = T, where the overall colour of a
sample is decided. `x0grid` draws what the model recovers from held-out renders
at each noise level, with the caption and without: where shapes turn into
blobs, and how much the caption changes the answer. `words` measures how much
the shape word of a prompt changes x̂₀, against the colour word.
"""

import argparse
import os
import subprocess
import tempfile

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import AutoModel, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENCODER = os.path.join(ROOT, "models/all-MiniLM-L6-v2")
PROMPTS = ["a red circle", "a blue square", "a green triangle",
           "two yellow stars", "a red circle above a blue square", "an orange cross and a green ring"]


def embed(prompts):
    tok = AutoTokenizer.from_pretrained(ENCODER)
    enc = AutoModel.from_pretrained(ENCODER).eval()
    ids = tok(prompts, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return enc(**ids).last_hidden_state


def to_eps(sched, out, x, t):
    """The ε a model output implies, whatever the stage predicts."""
    if sched.config.prediction_type == "v_prediction":
        a = sched.alphas_cumprod[t]
        return a.sqrt() * out + (1 - a).sqrt() * x
    return out


def sample(args):
    unet = UNet2DConditionModel.from_pretrained(args.stage, subfolder="unet").eval()
    sched = DDIMScheduler.from_pretrained(args.stage, subfolder="scheduler")
    if args.no_threshold:
        sched = DDIMScheduler.from_config(sched.config, thresholding=False)
    cond, uncond = embed(PROMPTS), embed([""] * len(PROMPTS))
    torch.manual_seed(0)
    x = torch.randn(len(PROMPTS), 3, unet.config.sample_size, unet.config.sample_size)
    sched.set_timesteps(50)
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample[:, :3]
            u, c = out.chunk(2)
            x = sched.step(u + args.guidance * (c - u), t, x).prev_sample
    img = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    side = 2 * img.shape[1]
    grid = Image.new("RGB", (len(PROMPTS) * (side + 2), side + 2), "white")
    for i, a in enumerate(img):
        grid.paste(Image.fromarray(a).resize((side, side), Image.NEAREST), (i * (side + 2), 1))
    grid.save(args.out)
    print(f"wrote {args.out}: " + "; ".join(PROMPTS))


def renders(side, n=8, seed=0):
    """Dataset samples 0..n of `seed` at `side` px ([n, 3, side, side] in [-1, 1]) and their captions."""
    binary = os.path.join(ROOT, "target/release/diffusiond")
    images, captions = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            png = os.path.join(tmp, f"{i}.png")
            subprocess.run([binary, "dataset", "--preview", "--seed", str(seed), "--start", str(i), "-n", "1",
                            "--size", str(side), "-o", png], check=True, capture_output=True)
            # A one-image grid has a 2-pixel frame.
            images.append(np.array(Image.open(png).convert("RGB"))[2:2 + side, 2:2 + side])
            captions.append(open(png[:-4] + ".txt").read().split(". ", 1)[1].strip())
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1 for a in images]), captions


def predict_x0(unet, sched, xt, t, text):
    e = to_eps(sched, unet(xt, torch.full((len(xt),), t), encoder_hidden_states=text).sample[:, :3], xt, t)
    a = sched.alphas_cumprod[t]
    return (xt - (1 - a).sqrt() * e) / a.sqrt()


def x0_grid(args):
    """Rows: held-out renders. Columns: the render, x_t at t = 700, x̂₀ at t = 300, 500, 700, 900 with the
    caption, and x̂₀ at 500 and 700 with the empty prompt."""
    unet = UNet2DConditionModel.from_pretrained(args.stage, subfolder="unet").eval()
    sched = DDPMScheduler.from_pretrained(args.stage, subfolder="scheduler")
    x0, captions = renders(unet.config.sample_size, seed=args.seed)
    cond, null = embed(captions), embed([""] * len(captions))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    noised = lambda t: sched.add_noise(x0, noise, torch.full((len(x0),), t, dtype=torch.long))
    columns = [x0, noised(700)]
    columns += [predict_x0(unet, sched, noised(t), t, cond) for t in [300, 500, 700, 900]]
    columns += [predict_x0(unet, sched, noised(t), t, null) for t in [500, 700]]
    rows = torch.cat([torch.cat([c[i].clamp(-1, 1) for c in columns], 2) for i in range(len(x0))], 1)
    img = ((rows + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(img).resize((img.shape[1] * 4, img.shape[0] * 4), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}; rows:\n" + "\n".join(captions))


def word_sensitivity(args):
    """How much the model's x̂₀ depends on the shape word against the colour word: from a plain white
    canvas noised to t, the prompt "a COLOUR SHAPE" for 6 shapes
    (red) and for 6 colours (circle); the mean distance of each x̂₀ to the others' mean, per noise level."""
    unet = UNet2DConditionModel.from_pretrained(args.stage, subfolder="unet").eval()
    sched = DDPMScheduler.from_pretrained(args.stage, subfolder="scheduler")
    side = unet.config.sample_size
    shapes = ["circle", "square", "triangle", "star", "ring", "cross"]
    colours = ["red", "green", "blue", "yellow", "orange", "purple"]
    by_shape = embed([f"a red {s}" for s in shapes])
    by_colour = embed([f"a {c} circle" for c in colours])
    noise = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1)).repeat(6, 1, 1, 1)
    white = torch.ones(6, 3, side, side)
    spread = lambda x: (x - x.mean(0, keepdim=True)).pow(2).mean().sqrt().item()
    panels = []
    for t in [500, 700, 900]:
        xt = sched.add_noise(white, noise, torch.full((6,), t, dtype=torch.long))
        s, c = predict_x0(unet, sched, xt, t, by_shape), predict_x0(unet, sched, xt, t, by_colour)
        print(f"t = {t}: RMS spread of x̂₀ over shape words {spread(s):.4f}, over colour words {spread(c):.4f}")
        panels.append(s)
    if args.out:
        rows = torch.cat([torch.cat([p[i].clamp(-1, 1) for p in panels], 2) for i in range(6)], 1)
        img = ((rows + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(img).resize((img.shape[1] * 4, img.shape[0] * 4), Image.NEAREST).save(args.out)
        print(f"wrote {args.out}: rows {', '.join(shapes)}; columns t = 500, 700, 900")


def x0_error(args):
    unet = UNet2DConditionModel.from_pretrained(args.stage, subfolder="unet").eval()
    sched = DDPMScheduler.from_pretrained(args.stage, subfolder="scheduler")
    x0, captions = renders(unet.config.sample_size)
    cond = embed(captions)
    own_mean = ((x0 - x0.mean(dim=(2, 3), keepdim=True)) ** 2).mean().item()
    torch.manual_seed(0)
    for t in [50, 200, 400, 600, 800, 950]:
        eps = torch.randn_like(x0)
        ts = torch.full((len(x0),), t, dtype=torch.long)
        xt = sched.add_noise(x0, eps, ts)
        e = to_eps(sched, unet(xt, ts, encoder_hidden_states=cond).sample[:, :3], xt, t)
        a = sched.alphas_cumprod[t]
        x0_hat = (xt - (1 - a).sqrt() * e) / a.sqrt()
        print(f"t = {t:3d}: ε MSE {((e - eps) ** 2).mean():.4f}, x̂₀ MSE {((x0_hat - x0) ** 2).mean():.4f} "
              f"(each image's own mean colour: {own_mean:.4f})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample")
    s.add_argument("stage")
    s.add_argument("out")
    s.add_argument("--guidance", type=float, default=3.0)
    s.add_argument("--no-threshold", action="store_true")
    x = sub.add_parser("x0")
    x.add_argument("stage")
    g = sub.add_parser("x0grid")
    g.add_argument("stage")
    g.add_argument("out")
    g.add_argument("--seed", type=int, default=77, help="dataset seed (the training runs use small ones)")
    w = sub.add_parser("words")
    w.add_argument("stage")
    w.add_argument("--out", help="a PNG of the shape prompts' x̂₀")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads()))
    {"sample": sample, "x0": x0_error, "x0grid": x0_grid, "words": word_sensitivity}[args.command](args)


if __name__ == "__main__":
    main()
