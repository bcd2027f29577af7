"""Editing parity fixtures: what diffusers' `IFImg2ImgPipeline`, `IFInpaintingPipeline`,
`IFInpaintingSuperResolutionPipeline` and `IFImg2ImgSuperResolutionPipeline` make of a
source image (and a mask) on the tiny cascade of `fixtures_pipeline.py`, for
`tests/pipeline_edit_parity.rs`. The last is a super-resolution stage started from the
base stage's output upsampled bicubically, which is what a stage with a `strength`
below 1 runs.

Imported by gen_fixtures.py after the cascade fixture; `generate(out, root)` writes
  <out>/image16.png, image32.png   the source image at the base and SR sizes (RGB, 8 bit)
  <out>/mask16.png, mask32.png     the mask (white = repaint; grey levels on both sides of 0.5)
  <out>/reference.safetensors      each case's recorded noise draws and output ("pt", in [-1, 1])
  <out>/reference.json             settings and versions

The pipelines get the images as tensors converted exactly as they convert PIL images
(x / 127.5 − 1; masks x / 255, then cut at 0.5), so that diffusiond, which reads the
PNGs, must agree from the file on. Noise is recorded and replayed as in the cascade
fixture (the first draw is the noise the source is noised with, then the SR
augmentation noise, then each step's variance noise).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import diffusers
from diffusers import (IFImg2ImgPipeline, IFImg2ImgSuperResolutionPipeline, IFInpaintingPipeline,
                       IFInpaintingSuperResolutionPipeline)
from diffusers.pipelines.deepfloyd_if import (pipeline_if_img2img, pipeline_if_img2img_superresolution,
                                              pipeline_if_inpainting, pipeline_if_inpainting_superresolution)
from diffusers.schedulers import scheduling_ddpm

import fixtures_pipeline as cascade_fixture

N = 2
IMG2IMG = dict(steps=10, guidance_scale=4.0, strength=0.6)
INPAINT = dict(steps=10, guidance_scale=4.0, strength=1.0)
INPAINT_SR = dict(steps=8, guidance_scale=3.0, strength=1.0, noise_level=250)
SR_STRENGTH = dict(steps=8, guidance_scale=3.0, strength=0.5, noise_level=100)


def source(size: int) -> np.ndarray:
    """A picture with edges and flat regions: two overlapping squares on a gradient."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    rgb = np.stack([x, y, 1 - x], axis=-1) * 0.5
    rgb[size // 4: size // 2, size // 4: 3 * size // 4] = [0.9, 0.1, 0.1]
    rgb[size // 2: 7 * size // 8, size // 3: 2 * size // 3] = [0.1, 0.2, 0.9]
    return np.round(rgb * 255).astype(np.uint8)


def mask(size: int) -> np.ndarray:
    """Repaint the right half, with a soft edge whose levels fall on both sides of 0.5."""
    ramp = np.clip((np.arange(size) - size / 2 + 2) / 4, 0, 1)
    return np.round(np.broadcast_to(ramp, (size, size)) * 255).astype(np.uint8)


def as_image(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb.astype(np.float32) / 127.5 - 1).permute(2, 0, 1).unsqueeze(0)


def as_mask(gray: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(gray.astype(np.float32) / 255).unsqueeze(0).unsqueeze(0)


def generate(out: Path, root: Path) -> None:
    cascade = root / "tests" / "fixtures" / "cascade"
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    none = dict(text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None, watermarker=None,
                requires_safety_checker=False)
    reference = cascade_fixture.embeddings(root, [cascade_fixture.PROMPT])
    null = cascade_fixture.embeddings(root, [""])
    images = {s: source(s) for s in (16, 32)}
    masks = {s: mask(s) for s in (16, 32)}
    for s in (16, 32):
        Image.fromarray(images[s], "RGB").save(out / f"image{s}.png")
        Image.fromarray(masks[s], "L").save(out / f"mask{s}.png")

    tensors = {"prompt_embeds": reference, "null_embeds": null}
    meta = {"diffusers": diffusers.__version__, "torch": torch.__version__, "prompt": cascade_fixture.PROMPT,
            "n": N, "cases": {}}

    def record(name: str, settings: dict, run) -> torch.Tensor:
        recorder = cascade_fixture.Recorder()
        for module in (pipeline_if_img2img, pipeline_if_inpainting, pipeline_if_inpainting_superresolution,
                       pipeline_if_img2img_superresolution, scheduling_ddpm):
            module.randn_tensor = recorder
        result = run()
        tensors[f"{name}.out"] = result
        for i, draw in enumerate(recorder.draws):
            tensors[f"{name}.draw.{i:03d}"] = draw
        meta["cases"][name] = dict(settings, draws=len(recorder.draws))
        return result

    common = dict(prompt_embeds=reference, negative_prompt_embeds=null, num_images_per_prompt=N, output_type="pt")
    img2img = IFImg2ImgPipeline.from_pretrained(cascade / "base", **none)
    base_out = record("img2img", IMG2IMG, lambda: img2img(
        image=as_image(images[16]), strength=IMG2IMG["strength"], num_inference_steps=IMG2IMG["steps"],
        guidance_scale=IMG2IMG["guidance_scale"], **common).images)
    inpaint = IFInpaintingPipeline.from_pretrained(cascade / "base", **none)
    stage1 = record("inpaint", INPAINT, lambda: inpaint(
        image=as_image(images[16]), mask_image=as_mask(masks[16]), strength=INPAINT["strength"],
        num_inference_steps=INPAINT["steps"], guidance_scale=INPAINT["guidance_scale"], **common).images)
    sr = IFInpaintingSuperResolutionPipeline.from_pretrained(cascade / "sr", **none)
    record("inpaint_sr", INPAINT_SR, lambda: sr(
        image=stage1, original_image=as_image(images[32]).repeat(N, 1, 1, 1),
        mask_image=as_mask(masks[32]).repeat(N, 1, 1, 1), strength=INPAINT_SR["strength"],
        num_inference_steps=INPAINT_SR["steps"], guidance_scale=INPAINT_SR["guidance_scale"],
        noise_level=INPAINT_SR["noise_level"], prompt_embeds=reference.repeat(N, 1, 1),
        negative_prompt_embeds=null.repeat(N, 1, 1), output_type="pt").images)

    # The base output upsampled bicubically to the SR size, in range, as the start.
    upsampled = torch.nn.functional.interpolate(base_out, size=(32, 32), mode="bicubic", align_corners=False).clamp(-1, 1)
    sr_img2img = IFImg2ImgSuperResolutionPipeline.from_pretrained(cascade / "sr", **none)
    record("sr_strength", SR_STRENGTH, lambda: sr_img2img(
        image=base_out, original_image=upsampled, strength=SR_STRENGTH["strength"],
        num_inference_steps=SR_STRENGTH["steps"], guidance_scale=SR_STRENGTH["guidance_scale"],
        noise_level=SR_STRENGTH["noise_level"], prompt_embeds=reference.repeat(N, 1, 1),
        negative_prompt_embeds=null.repeat(N, 1, 1), output_type="pt").images)

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "reference.safetensors"))
    (out / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    cases = ", ".join(f"{name} ({case['draws']} draws)" for name, case in meta["cases"].items())
    print(f"edit fixture: {cases}")
