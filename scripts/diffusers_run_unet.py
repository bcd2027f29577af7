#!/usr/bin/env python3
"""Loads a UNet directory with diffusers and runs it: the other half of
diffusiond's interoperability test and of the UNet benchmark.

    diffusers_run_unet.py forward DIR IO.safetensors OUT.safetensors
        Loads DIR with `UNet2DConditionModel.from_pretrained`, runs one forward
        pass on the inputs in IO (sample, timesteps, encoder_hidden_states and
        optionally class_labels) and writes `output` to OUT.
    diffusers_run_unet.py bench DIR IO.safetensors THREADS ITERS [DEVICE [DTYPE]]
        Times the forward pass (median of ITERS after warm-up) on those inputs,
        on DEVICE (cpu or cuda) in DTYPE (float32, float16, bfloat16), and prints
        one JSON line {"median_ms": ..., "min_ms": ...}.

    diffusers_run_unet.py load-pipeline DIR
        Loads a stage folder with the pipeline class its model_index.json names
        (IFPipeline or IFSuperResolutionPipeline), without text encoder or
        safety modules, and checks its parts.

Runs inside .venv-fixtures (created by `make refenv`), on the same torch
wheel as diffusiond, in float32 on the CPU with the default attention processor.
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffusers import UNet2DConditionModel


def load(directory: str, io_file: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    model = UNet2DConditionModel.from_pretrained(directory, torch_dtype=dtype).to(device).eval()
    inputs = {k: v.to(device) for k, v in load_file(io_file).items()}
    floats = {k: v.to(dtype) for k, v in inputs.items() if k in ("sample", "encoder_hidden_states")}
    args = (floats["sample"], inputs["timesteps"], floats["encoder_hidden_states"])
    return model, args, inputs.get("class_labels")


def main() -> None:
    mode, directory = sys.argv[1:3]
    io_file = sys.argv[3] if len(sys.argv) > 3 else ""
    if mode == "forward":
        torch.set_num_threads(1)
        model, args, labels = load(directory, io_file)
        with torch.inference_mode():
            out = model(*args, class_labels=labels).sample
        save_file({"output": out.contiguous()}, sys.argv[4])
    elif mode == "bench":
        threads, iters = int(sys.argv[4]), int(sys.argv[5])
        device = sys.argv[6] if len(sys.argv) > 6 else "cpu"
        dtype = getattr(torch, sys.argv[7]) if len(sys.argv) > 7 else torch.float32
        torch.set_num_threads(threads)
        model, args, labels = load(directory, io_file, device, dtype)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        times = []
        with torch.inference_mode():
            for i in range(iters + 2):
                sync()
                start = time.perf_counter()
                model(*args, class_labels=labels)
                sync()
                if i >= 2:  # the first two calls warm up allocators and kernels
                    times.append((time.perf_counter() - start) * 1000.0)
        print(json.dumps({"median_ms": statistics.median(times), "min_ms": min(times)}))
    elif mode == "load-pipeline":
        import diffusers

        cls_name = json.loads((Path(directory) / "model_index.json").read_text())["_class_name"]
        none = dict(text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None, watermarker=None,
                    requires_safety_checker=False)
        pipe = getattr(diffusers, cls_name).from_pretrained(directory, **none)
        assert isinstance(pipe.unet, UNet2DConditionModel)
        print(f"{cls_name}: unet {sum(p.numel() for p in pipe.unet.parameters())} parameters, "
              f"scheduler {type(pipe.scheduler).__name__}")
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
