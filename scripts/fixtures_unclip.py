"""unCLIP parity fixtures: tiny random `PriorTransformer`s and `UnCLIPTextProjModel`s
written by diffusers, with inputs and diffusers' outputs, for `tests/unclip_parity.rs`.

Imported by gen_fixtures.py (which pins the environment); `generate(out)` writes:
  <out>/<case>/config.json, diffusion_pytorch_model.safetensors  (save_pretrained)
  <out>/cases.json        the cases, their call options and versions
  <out>/io.safetensors    inputs and outputs, keyed "<case>.<name>"

Pinned as the UNet fixtures are: one intra-op thread, float32 computation from
weights rounded to float16 (the files hold float16), fixed seeds. Every
parameter is random, including those diffusers initialises to zero (positional
and PRD embeddings, the CLIP statistics, the guidance embedding), so a swapped
or skipped one changes the output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

import diffusers
from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

# Karlo's prior layout (LayerNorm in, linear text projection, the PRD token) run
# as UnCLIPPipeline runs it, with the text mask; a Kandinsky-style variant with
# the other options (projection norm, no PRD token, no text tokens, its own
# time-embedding, projection and output widths); and Karlo's layout without a mask.
PRIORS = {
    "prior_karlo": dict(
        config=dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=12, num_embeddings=5,
                    additional_embeddings=4, norm_in_type="layer", embedding_proj_norm_type=None,
                    encoder_hid_proj_type="linear", added_emb_type="prd"),
        tokens=5, mask=[[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]],
    ),
    "prior_unmasked": dict(
        config=dict(num_attention_heads=2, attention_head_dim=8, num_layers=1, embedding_dim=12, num_embeddings=5,
                    additional_embeddings=4, norm_in_type="layer", encoder_hid_proj_type="linear",
                    added_emb_type="prd"),
        tokens=5, mask=None,
    ),
    "prior_variant": dict(
        config=dict(num_attention_heads=3, attention_head_dim=4, num_layers=2, embedding_dim=12, num_embeddings=0,
                    additional_embeddings=3, dropout=0.0, time_embed_act_fn="gelu", norm_in_type=None,
                    embedding_proj_norm_type="layer", encoder_hid_proj_type=None, added_emb_type=None,
                    time_embed_dim=20, embedding_proj_dim=10, clip_embed_dim=14),
        tokens=None, mask=None,
    ),
}

# Karlo's decoder layout, tiny: IF's blocks, the CLIP conditioning as an
# identity class embedding (added to the timestep embedding) and a text mask.
DECODER = dict(sample_size=16, layers_per_block=1, block_out_channels=[32, 64], in_channels=3, out_channels=6,
               cross_attention_dim=32, attention_head_dim=8, class_embed_type="identity",
               resnet_time_scale_shift="scale_shift", act_fn="silu",
               down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
               mid_block_type="UNetMidBlock2DSimpleCrossAttn",
               up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"])

# unCLIP's super-resolution stages: UNet2DModel on [noisy; upsampled] images.
# Karlo-style (scale-shift ResNets, so the middle attention has no GroupNorm),
# and a variant with the default time shift (GroupNorm in the attention), a
# noise-level class embedding, no middle attention head size, and a rescale.
SUPER_RES = {
    "super_res": dict(sample_size=16, in_channels=6, out_channels=3, layers_per_block=1,
                      block_out_channels=[32, 64], down_block_types=["ResnetDownsampleBlock2D"] * 2,
                      up_block_types=["ResnetUpsampleBlock2D"] * 2, resnet_time_scale_shift="scale_shift",
                      attention_head_dim=16, norm_num_groups=16),
    "super_res_variant": dict(sample_size=16, in_channels=6, out_channels=6, layers_per_block=2,
                              block_out_channels=[16, 32, 32], down_block_types=["ResnetDownsampleBlock2D"] * 3,
                              up_block_types=["ResnetUpsampleBlock2D"] * 3, act_fn="gelu",
                              class_embed_type="timestep", attention_head_dim=None, mid_block_scale_factor=1.414,
                              norm_num_groups=8, freq_shift=1, flip_sin_to_cos=False),
}

TEXT_PROJ = dict(clip_extra_context_tokens=2, clip_embeddings_dim=12, time_embed_dim=20, cross_attention_dim=16)


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn_like(p) * 0.3).half().float())
    return model.eval()


def save(model, out: Path) -> list[str]:
    model.half()
    model.save_pretrained(out, safe_serialization=True)
    model.float()
    return sorted(p.name for p in out.iterdir())


def generate(out: Path) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    io: dict[str, torch.Tensor] = {}
    meta = {"diffusers": diffusers.__version__, "torch": torch.__version__, "cases": {}}
    batch = 3
    for i, (name, case) in enumerate(PRIORS.items()):
        config = case["config"]
        model = randomised(PriorTransformer(**config), 300 + i)
        files = save(model, out / name)
        g = torch.Generator().manual_seed(400 + i)
        width = config["embedding_dim"]
        proj_width = config.get("embedding_proj_dim") or width
        inputs = {
            "hidden_states": torch.randn(batch, width, generator=g),
            "timestep": torch.tensor([999, 421, 3]),
            "proj_embedding": torch.randn(batch, proj_width, generator=g),
        }
        if case["tokens"]:
            inputs["encoder_hidden_states"] = torch.randn(batch, case["tokens"], width, generator=g)
        if case["mask"]:
            inputs["attention_mask"] = torch.tensor(case["mask"], dtype=torch.bool)
        with torch.no_grad():
            output = model(**inputs).predicted_image_embedding
            latents = model.post_process_latents(output)
        for key, value in {**inputs, "output": output, "post_processed": latents}.items():
            io[f"{name}.{key}"] = value.contiguous()
        meta["cases"][name] = {"kind": "prior", "files": files, "output_shape": list(output.shape)}
        print(f"unclip fixture {name}: files {files}, output {list(output.shape)}")

    decoder = randomised(UNet2DConditionModel(**DECODER), 700)
    files = save(decoder, out / "decoder")
    g = torch.Generator().manual_seed(800)
    inputs = {
        "sample": torch.randn(batch, 3, 16, 16, generator=g),
        "timestep": torch.tensor([999.0, 421.0, 3.0]),
        "encoder_hidden_states": torch.randn(batch, 6, 32, generator=g),
        "class_labels": torch.randn(batch, 4 * 32, generator=g),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool),
    }
    with torch.no_grad():
        output = decoder(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                         class_labels=inputs["class_labels"], attention_mask=inputs["attention_mask"]).sample
    for key, value in {**inputs, "output": output}.items():
        io[f"decoder.{key}"] = value.contiguous()
    meta["cases"]["decoder"] = {"kind": "decoder", "files": files, "output_shape": list(output.shape)}
    print(f"unclip fixture decoder: files {files}")

    for i, (name, config) in enumerate(SUPER_RES.items()):
        unet = randomised(UNet2DModel(**config), 900 + i)
        # Without a GroupNorm before it, random weights give the middle attention
        # scores of order 1e5: a one-hot softmax that turns float32 rounding into
        # 1e-4 output differences between any two implementations (diffusers'
        # own f32 against f64: 4e-6 here; 1e-6 noise on its input: 2e-5). Small
        # query and key weights keep the scores in a trained model's range.
        with torch.no_grad():
            for proj in (unet.mid_block.attentions[0].to_q, unet.mid_block.attentions[0].to_k):
                proj.weight.copy_((proj.weight * 0.02).half().float())
        files = save(unet, out / name)
        g = torch.Generator().manual_seed(1000 + i)
        inputs = {"sample": torch.randn(batch, 6, 16, 16, generator=g), "timestep": torch.tensor([999.0, 421.0, 3.0])}
        if config.get("class_embed_type"):
            inputs["class_labels"] = torch.tensor([250.0, 0.0, 77.0])
        with torch.no_grad():
            output = unet(inputs["sample"], inputs["timestep"], class_labels=inputs.get("class_labels")).sample
        for key, value in {**inputs, "output": output}.items():
            io[f"{name}.{key}"] = value.contiguous()
        meta["cases"][name] = {"kind": "super_res", "files": files, "output_shape": list(output.shape)}
        print(f"unclip fixture {name}: files {files}")

    model = randomised(UnCLIPTextProjModel(**TEXT_PROJ), 500)
    files = save(model, out / "text_proj")
    g = torch.Generator().manual_seed(600)
    dim = TEXT_PROJ["clip_embeddings_dim"]
    image = torch.randn(batch, dim, generator=g)
    for guided in (False, True):
        rows = 2 * batch if guided else batch
        prompt = torch.randn(rows, dim, generator=g)
        text = torch.randn(rows, 4, dim, generator=g)
        with torch.no_grad():
            hidden, time = model(image_embeddings=image, prompt_embeds=prompt, text_encoder_hidden_states=text,
                                 do_classifier_free_guidance=guided)
        key = "text_proj_guided" if guided else "text_proj"
        for k, v in {"image_embeddings": image, "prompt_embeds": prompt, "text_encoder_hidden_states": text,
                     "hidden_states": hidden, "time_embeddings": time}.items():
            io[f"{key}.{k}"] = v.clone().contiguous()
        meta["cases"][key] = {"kind": "text_proj", "files": files, "guided": guided}
    print(f"unclip fixture text_proj: files {files}")
    save_file(io, str(out / "io.safetensors"))
    (out / "cases.json").write_text(json.dumps(meta, indent=1) + "\n")
    pipeline(out)


def pipeline(out: Path) -> None:
    """A tiny UnCLIPPipeline saved by diffusers, run with every noise draw recorded."""
    import sys

    from diffusers import UnCLIPScheduler
    from diffusers.pipelines.deprecated.unclip.pipeline_unclip import UnCLIPPipeline
    from diffusers.schedulers import scheduling_unclip
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fixtures_text import clip_tokenizer

    dest = out / "pipeline"
    tokenizer = clip_tokenizer(dest / "tokenizer")
    words = tokenizer.model_max_length
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(1100)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=words, bos_token_id=eos - 1, eos_token_id=eos,
        pad_token_id=eos)).eval()
    prior = randomised(PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=32, num_layers=1,
                                        num_embeddings=words, additional_embeddings=4, norm_in_type="layer"), 1101)
    text_proj = randomised(UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=32,
                                               time_embed_dim=64, cross_attention_dim=32), 1102)
    # Narrower than the single-model fixtures: the folder is committed whole.
    decoder = randomised(UNet2DConditionModel(**dict(DECODER, sample_size=8, block_out_channels=[16, 32],
                                                     norm_num_groups=8, cross_attention_dim=32)), 1103)
    sr_config = dict(SUPER_RES["super_res"], sample_size=16, block_out_channels=[16, 32], norm_num_groups=8)
    super_res = []
    for seed in (1104, 1105):
        unet = randomised(UNet2DModel(**sr_config), seed)
        with torch.no_grad():
            for proj in (unet.mid_block.attentions[0].to_q, unet.mid_block.attentions[0].to_k):
                proj.weight.copy_((proj.weight * 0.02).half().float())
        super_res.append(unet)
    pipe = UnCLIPPipeline(
        prior=prior, decoder=decoder, text_encoder=text_encoder, tokenizer=tokenizer, text_proj=text_proj,
        super_res_first=super_res[0], super_res_last=super_res[1],
        prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                        clip_sample_range=5.0),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"))
    with torch.no_grad():
        for p in text_encoder.parameters():
            p.copy_(p.half().float())
    # float16 files holding exactly the values the reference runs in float32.
    pipe.to(torch.float16)
    pipe.save_pretrained(dest, safe_serialization=True)
    pipe.to(torch.float32)

    prompts = ["a red circle", "zebra on a river"]
    steps = dict(prior_num_inference_steps=6, decoder_num_inference_steps=5, super_res_num_inference_steps=4)
    g = torch.Generator().manual_seed(1200)
    starts = {"prior": torch.randn(2, 32, generator=g), "decoder": torch.randn(2, 3, 8, 8, generator=g),
              "super_res": torch.randn(2, 3, 16, 16, generator=g)}
    draws: list[torch.Tensor] = []

    def recorded(shape, generator=None, device=None, dtype=None, layout=None):
        draws.append(torch.randn(shape, generator=g))
        return draws[-1].clone()

    scheduling_unclip.randn_tensor = recorded
    captured = {}
    def capture(module, args, kwargs, output):
        captured.setdefault("image_embeddings", kwargs["image_embeddings"].clone())

    pipe.text_proj.register_forward_hook(capture, with_kwargs=True)
    with torch.no_grad():
        image = pipe(prompts, prior_latents=starts["prior"], decoder_latents=starts["decoder"],
                     super_res_latents=starts["super_res"], prior_guidance_scale=4.0, decoder_guidance_scale=8.0,
                     output_type="np", **steps).images
    # Each stage draws at every step but its last (t = 0), in stage order.
    counts = {"prior": steps["prior_num_inference_steps"] - 1, "decoder": steps["decoder_num_inference_steps"] - 1,
              "super_res": steps["super_res_num_inference_steps"] - 1}
    assert len(draws) == sum(counts.values()), (len(draws), counts)
    io: dict[str, torch.Tensor] = {"image": torch.from_numpy(image).permute(0, 3, 1, 2).contiguous(),
                                   "image_embeddings": captured["image_embeddings"]}
    k = 0
    for stage, n in counts.items():
        io[f"{stage}/start"] = starts[stage]
        io[f"{stage}/steps"] = torch.stack(draws[k:k + n]) if n else torch.zeros(0)
        k += n
    save_file({key: v.contiguous() for key, v in io.items()}, str(dest / "reference.safetensors"))
    (dest / "reference.json").write_text(json.dumps({"diffusers": diffusers.__version__, "prompts": prompts,
                                                     "prior_guidance_scale": 4.0, "decoder_guidance_scale": 8.0,
                                                     **steps}, indent=1) + "\n")
    print(f"unclip pipeline fixture: {sorted(p.name for p in dest.iterdir())}, image {list(io['image'].shape)}")
