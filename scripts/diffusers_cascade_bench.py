#!/usr/bin/env python3
"""Times a whole cascade in diffusers: the other half of `benches/latency.rs`.

    diffusers_cascade_bench.py MANIFEST_DIR EMBEDS.safetensors THREADS N ITERS

Loads every stage folder of the cascade in MANIFEST_DIR (its `cascade.json`)
with the pipeline class its `model_index.json` names (`IFPipeline` for the
base, `IFSuperResolutionPipeline` for each super-resolution stage, or
`IFImg2ImgSuperResolutionPipeline` where the stage's `strength` is below 1:
it starts from the stage below's output upsampled bicubically, as diffusiond
does), without text encoder or safety modules, and runs the cascade for N
images of one prompt at each stage's steps, guidance scale, noise level and
strength. The prompt's
embeddings come from EMBEDS (`prompt_embeds`, `null_embeds`, written by the
Rust side with diffusiond's own encoder), so both sides do the same work from
the same inputs. Prints one JSON line over ITERS runs after one warm-up run:
{"median_ms": ..., "min_ms": ..., "stages_ms": [median of each stage]}.

diffusers runs each stage's own scheduler (the folder's, as a user loading it
would); the cost of a step is the UNet call, which is the same for every
scheduler. Runs inside .venv-fixtures (`make refenv`), on the same torch wheel
as diffusiond, float32 on the CPU, under `torch.inference_mode`.
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffusers import IFImg2ImgSuperResolutionPipeline, IFPipeline, IFSuperResolutionPipeline

NONE = dict(text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None, watermarker=None,
            requires_safety_checker=False)


def load(root: Path):
    manifest = json.loads((root / "cascade.json").read_text())
    stages = []
    for i, stage in enumerate(manifest["stages"]):
        if i == 0:
            cls = IFPipeline
        elif stage.get("strength", 1.0) < 1.0:
            cls = IFImg2ImgSuperResolutionPipeline
        else:
            cls = IFSuperResolutionPipeline
        pipe = cls.from_pretrained(root / stage["path"], torch_dtype=torch.float32, **NONE)
        pipe.set_progress_bar_config(disable=True)
        stages.append((pipe, stage))
    return stages


def run(stages, prompt: torch.Tensor, null: torch.Tensor, n: int, stage_ms: list[list[float]]) -> torch.Tensor:
    image = None
    for i, (pipe, stage) in enumerate(stages):
        start = time.perf_counter()
        common = dict(num_inference_steps=stage["steps"], guidance_scale=stage.get("guidance_scale", 1.0),
                      output_type="pt")
        if i == 0:
            image = pipe(prompt_embeds=prompt, negative_prompt_embeds=null, num_images_per_prompt=n,
                         **common).images
        else:
            # The SR pipeline wants one prompt row per input image.
            extra = {}
            if stage.get("strength", 1.0) < 1.0:
                side = pipe.unet.config.sample_size
                upsampled = torch.nn.functional.interpolate(image, size=(side, side), mode="bicubic",
                                                            align_corners=False).clamp(-1, 1)
                extra = dict(original_image=upsampled, strength=stage["strength"])
            image = pipe(image=image, noise_level=stage.get("noise_level", 250),
                         prompt_embeds=prompt.repeat(n, 1, 1), negative_prompt_embeds=null.repeat(n, 1, 1),
                         **extra, **common).images
        stage_ms[i].append((time.perf_counter() - start) * 1e3)
    return image


def main() -> None:
    root, embeds, threads, n, iters = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
        int(sys.argv[5])
    torch.set_num_threads(threads)
    tensors = load_file(embeds)
    stages = load(root)
    times = []
    stage_ms: list[list[float]] = [[] for _ in stages]
    with torch.inference_mode():
        for _ in range(iters + 1):
            start = time.perf_counter()
            out = run(stages, tensors["prompt_embeds"], tensors["null_embeds"], n, stage_ms)
            times.append((time.perf_counter() - start) * 1e3)
    assert out.shape[0] == n, out.shape
    # The first run is the warm-up.
    print(json.dumps({"median_ms": statistics.median(times[1:]), "min_ms": min(times[1:]), "shape": list(out.shape),
                      "stages_ms": [statistics.median(t[1:]) for t in stage_ms]}))


if __name__ == "__main__":
    main()
