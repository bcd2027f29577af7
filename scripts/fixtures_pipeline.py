"""Cascade parity fixtures: a tiny two-stage cascade in diffusiond's layout whose
stage folders diffusers' `IFPipeline` / `IFSuperResolutionPipeline` load, and
what those pipelines generate with it, for `tests/pipeline_parity.rs`.

Imported by gen_fixtures.py; `generate(out, root)` writes
  <out>/cascade.json                 the manifest (text encoder: ../text/tiny-bert)
  <out>/base/, <out>/sr/             `save_pretrained` of each pipeline (model_index.json,
                                     unet/, scheduler/, image_noising_scheduler/)
  <out>/reference.safetensors        prompt embeddings, every recorded noise draw, the
                                     stage outputs (output_type="pt", in [-1, 1])
  <out>/reference.json               settings and versions

What must be pinned for the two sides to agree:
  * the text embeddings: transformers' BertModel on the tiny tokenizer's ids, padded
    to the manifest's max_length (diffusiond computes them itself from the prompt;
    the test checks they match before comparing images);
  * every random draw: `randn_tensor` is replaced in the IF pipelines and in the DDPM
    scheduler by a recorder, and the Rust side replays the draws in the same order
    (initial noise, SR augmentation noise, then each step's variance noise);
  * one intra-op thread and float32; the UNets' weights are rounded to float16
    (stored in float16) before the reference runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BertModel, PreTrainedTokenizerFast

import diffusers
from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel
from diffusers.pipelines.deepfloyd_if import pipeline_if, pipeline_if_superresolution
from diffusers.schedulers import scheduling_ddpm

PROMPT = "a red circle on top of a blue square"
MAX_LENGTH = 16
N = 2
BASE = dict(steps=10, guidance_scale=4.0)
SR = dict(steps=8, guidance_scale=3.0, noise_level=250)

UNET = dict(layers_per_block=1, block_out_channels=[32, 32], out_channels=6, cross_attention_dim=32,
            encoder_hid_dim=32, attention_head_dim=8, addition_embed_type="text", addition_embed_type_num_heads=2,
            cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu",
            down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
            mid_block_type="UNetMidBlock2DSimpleCrossAttn",
            up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"])
# DeepFloyd IF's stage schedulers: cosine schedule, learned-range variance, dynamic thresholding.
IF_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                    thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5, clip_sample=True,
                    clip_sample_range=1.0, prediction_type="epsilon")
NOISING_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="fixed_small",
                         clip_sample=False)


class Recorder:
    """Stands in for diffusers' `randn_tensor` and keeps every draw."""

    def __init__(self) -> None:
        self.draws: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(1234)

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        draw = torch.randn(shape, generator=self.generator, dtype=torch.float32)
        self.draws.append(draw.clone())
        return draw.to(dtype or torch.float32)


def unet(seed: int, **extra) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**UNET, **extra).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
            p.copy_(p.half().float())
    return model


def embeddings(root: Path, prompts: list[str]) -> torch.Tensor:
    encoder_dir = root / "tests" / "fixtures" / "text" / "tiny-bert"
    tok = PreTrainedTokenizerFast.from_pretrained(str(encoder_dir))
    batch = tok(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    model = BertModel.from_pretrained(str(encoder_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def save_half(pipe, path: Path) -> None:
    pipe.unet.half()
    pipe.save_pretrained(path, safe_serialization=True)
    pipe.unet.float()


def generate(out: Path, root: Path) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    prompt_embeds = embeddings(root, [PROMPT])
    null_embeds = embeddings(root, [""])
    none = dict(text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None, watermarker=None,
                requires_safety_checker=False)

    base = IFPipeline(unet=unet(31, sample_size=16, in_channels=3), scheduler=DDPMScheduler(**IF_SCHEDULER), **none)
    sr = IFSuperResolutionPipeline(unet=unet(32, sample_size=32, in_channels=6, class_embed_type="timestep"),
                                   scheduler=DDPMScheduler(**IF_SCHEDULER),
                                   image_noising_scheduler=DDPMScheduler(**NOISING_SCHEDULER), **none)
    save_half(base, out / "base")
    save_half(sr, out / "sr")
    # Reload from disk, as a user would: the folders must load in diffusers.
    base = IFPipeline.from_pretrained(out / "base", **none)
    sr = IFSuperResolutionPipeline.from_pretrained(out / "sr", **none)

    recorder = Recorder()
    for module in (pipeline_if, pipeline_if_superresolution, scheduling_ddpm):
        module.randn_tensor = recorder
    common = dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=null_embeds, num_images_per_prompt=N,
                  output_type="pt")
    stage1 = base(num_inference_steps=BASE["steps"], guidance_scale=BASE["guidance_scale"], **common).images
    stage1_draws = len(recorder.draws)
    # The SR pipeline wants one prompt row per input image.
    stage2 = sr(image=stage1, num_inference_steps=SR["steps"], guidance_scale=SR["guidance_scale"],
                noise_level=SR["noise_level"], prompt_embeds=prompt_embeds.repeat(N, 1, 1),
                negative_prompt_embeds=null_embeds.repeat(N, 1, 1), output_type="pt").images

    tensors = {"prompt_embeds": prompt_embeds, "null_embeds": null_embeds, "stage1": stage1, "stage2": stage2}
    for i, draw in enumerate(recorder.draws):
        tensors[f"draw.{i:03d}"] = draw
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "reference.safetensors"))
    manifest = {
        "name": "tiny-if",
        "description": "Random tiny weights for parity tests; not a usable model.",
        "text_encoder": {"path": "../text/tiny-bert", "max_length": MAX_LENGTH},
        "stages": [
            {"name": "base", "path": "base", "sampler": "ddpm", "steps": BASE["steps"],
             "guidance_scale": BASE["guidance_scale"]},
            {"name": "sr", "path": "sr", "sampler": "ddpm", "steps": SR["steps"],
             "guidance_scale": SR["guidance_scale"], "noise_level": SR["noise_level"]},
        ],
    }
    (out / "cascade.json").write_text(json.dumps(manifest, indent=2) + "\n")
    meta = {"diffusers": diffusers.__version__, "torch": torch.__version__, "prompt": PROMPT, "n": N,
            "base": BASE, "sr": SR, "stage1_draws": stage1_draws, "draws": len(recorder.draws)}
    (out / "reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"pipeline fixture: {len(recorder.draws)} noise draws, stage outputs {list(stage1.shape)} and "
          f"{list(stage2.shape)}")
