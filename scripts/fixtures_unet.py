"""UNet parity fixtures: tiny random `UNet2DConditionModel`s written by diffusers,
with inputs and diffusers' outputs, for `tests/unet_parity.rs`.

Imported by gen_fixtures.py (which pins the environment); `generate(out)` writes:
  <out>/<case>/config.json, diffusion_pytorch_model[...].safetensors  (save_pretrained)
  <out>/cases.json                   the cases and versions
  <out>/io.safetensors               inputs and outputs, keyed "<case>.<name>"

Pinned so that both sides compute the same numbers: one intra-op thread, float32,
fixed seeds, weights rounded to float16 before the reference runs (the files hold
float16, as our shipped checkpoints do, and both sides compute in float32 from
exactly the same values), and diffusers' default attention processor
(`AttnAddedKVProcessor2_0`, i.e. torch's scaled_dot_product_attention).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

import diffusers
from diffusers import UNet2DConditionModel

IF_BLOCKS = dict(
    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
)

# The two configs of diffusers' own DeepFloyd IF pipeline tests, and one variant that
# exercises the remaining options we support.
CASES = {
    "if_base": dict(
        config=dict(sample_size=32, layers_per_block=1, block_out_channels=[32, 64], in_channels=3, out_channels=6,
                    cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8, addition_embed_type="text",
                    addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
                    resnet_time_scale_shift="scale_shift", act_fn="gelu", **IF_BLOCKS),
        size=16, tokens=(7, 32), class_labels=False, shards=None,
    ),
    "if_superres": dict(
        config=dict(sample_size=32, layers_per_block=[1, 2], block_out_channels=[32, 64], in_channels=6,
                    out_channels=6, cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8,
                    addition_embed_type="text", addition_embed_type_num_heads=2, cross_attention_norm="group_norm",
                    resnet_time_scale_shift="scale_shift", act_fn="gelu", class_embed_type="timestep",
                    mid_block_scale_factor=1.414, time_embedding_act_fn="gelu", time_embedding_dim=32, **IF_BLOCKS),
        size=16, tokens=(7, 32), class_labels=True, shards="800KB",
    ),
    "variant": dict(
        config=dict(sample_size=16, layers_per_block=[2, 1, 1], block_out_channels=[32, 32, 64], in_channels=3,
                    out_channels=3, cross_attention_dim=48, attention_head_dim=[8, 16, 32],
                    only_cross_attention=[False, True, False], resnet_time_scale_shift="default", act_fn="silu",
                    resnet_skip_time_act=True, resnet_out_scale_factor=1.5, class_embed_type="timestep",
                    class_embeddings_concat=True, timestep_post_act="silu", center_input_sample=True,
                    flip_sin_to_cos=False, freq_shift=1, conv_in_kernel=5, conv_out_kernel=1, norm_eps=1e-6,
                    down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                                      "SimpleCrossAttnDownBlock2D"],
                    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                    up_block_types=["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                                    "ResnetUpsampleBlock2D"]),
        size=8, tokens=(5, 48), class_labels=True, shards=None,
    ),
}


def build(config: dict, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        # Norm weights start at 1 and biases at 0: perturb every vector so that a
        # swapped or skipped parameter changes the output.
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
        # Round to float16 values so the float16 files hold exactly what the reference ran.
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def generate(out: Path) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    io: dict[str, torch.Tensor] = {}
    meta = {"diffusers": diffusers.__version__, "torch": torch.__version__, "cases": {}}
    for i, (name, case) in enumerate(CASES.items()):
        model = build(case["config"], seed=100 + i)
        model.half()
        kwargs = {"max_shard_size": case["shards"]} if case["shards"] else {}
        model.save_pretrained(out / name, safe_serialization=True, **kwargs)
        model.float()
        g = torch.Generator().manual_seed(200 + i)
        batch, size = 3, case["size"]
        inputs = {
            "sample": torch.randn(batch, case["config"]["in_channels"], size, size, generator=g),
            "timesteps": torch.tensor([999.0, 421.0, 3.0]),
            "encoder_hidden_states": torch.randn(batch, *case["tokens"], generator=g),
        }
        if case["class_labels"]:
            inputs["class_labels"] = torch.tensor([250.0, 0.0, 77.0])
        with torch.no_grad():
            output = model(inputs["sample"], inputs["timesteps"], inputs["encoder_hidden_states"],
                           class_labels=inputs.get("class_labels")).sample
        for key, value in {**inputs, "output": output}.items():
            io[f"{name}.{key}"] = value.contiguous()
        files = sorted(p.name for p in (out / name).iterdir())
        params = sum(p.numel() for p in model.parameters())
        meta["cases"][name] = {"files": files, "parameters": params, "output_shape": list(output.shape)}
        print(f"unet fixture {name}: {params} parameters, files {files}")
    save_file(io, str(out / "io.safetensors"))
    (out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
