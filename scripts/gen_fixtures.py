#!/usr/bin/env python3
"""Writes the parity fixtures that diffusiond's Rust tests compare against.

The reference is Hugging Face diffusers, pinned below, run in a virtual
environment of its own (`.venv-fixtures`) that reuses the torch wheel of
`.venv` instead of downloading a second copy. The output is committed under
`tests/fixtures/`; the Rust tests read it and never need Python.

    make fixtures            # or: python3 scripts/gen_fixtures.py

What is pinned so that both sides compute the same numbers:
  * the diffusers version (DIFFUSERS below) and torch 2.11.0 (shared with tch);
  * one intra-op thread, and float32 everywhere;
  * the denoiser: a closed-form "dummy model" (`dummy_model` below, mirrored by
    `tests/common/dummy.rs`) made only of element-wise ops, so its output does
    not depend on batch composition;
  * every random draw: initial noise and per-step noise are generated here and
    saved, and fed to the schedulers (DDIM through `variance_noise`, DDPM by
    replacing its `randn_tensor`), so the Rust side replays exactly the same noise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-fixtures"
TORCH_VENV = ROOT / ".venv"
PINNED = [
    "diffusers==0.42.1",
    "transformers==5.24.0",
    "numpy==2.4.6",
    "safetensors==0.8.0",
    "huggingface_hub==2.4.0",
    # The official OpenAI client, for the test of the OpenAI-compatible endpoint.
    "openai==3.57.0",
]
OUT = ROOT / "tests" / "fixtures" / "diffusion"


def ensure_venv() -> None:
    """Re-executes this script inside .venv-fixtures, creating it on first use."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    py = VENV / "bin" / "python"
    stamp = VENV / ".pinned"
    if not stamp.exists() or stamp.read_text() != "\n".join(PINNED):
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
        # torch comes from the main venv: a .pth file puts its site-packages on sys.path.
        torch_site = next((TORCH_VENV / "lib").glob("python3*/site-packages"))
        own_site = next((VENV / "lib").glob("python3*/site-packages"))
        (own_site / "torch_from_main_venv.pth").write_text(str(torch_site) + "\n")
        subprocess.check_call([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *PINNED])
        stamp.write_text("\n".join(PINNED))
    os.execv(str(py), [str(py), __file__, *sys.argv[1:]])


ensure_venv()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import diffusers  # noqa: E402
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UnCLIPScheduler  # noqa: E402
from diffusers.schedulers import scheduling_ddpm, scheduling_unclip  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

SHAPE = (3, 8, 8)
# Two images per case, each with its own condition value, guidance scale and seed.
CONDS = [1.0, -0.5]
SCALES = [1.5, 5.0]
SEEDS = [11, 23]


def dummy_model(x: torch.Tensor, t: int, cond: torch.Tensor, var_channels: bool) -> torch.Tensor:
    """A smooth deterministic stand-in for a UNet: eps(x, t, c), optionally with ADM's
    extra variance channels. Mirrored exactly in tests/common/dummy.rs."""
    a = 0.5 + t / 1000.0
    eps = torch.tanh(x * a) * 0.8 + torch.cos(x * 3.0) * (cond * 0.1).view(-1, 1, 1, 1)
    if not var_channels:
        return eps
    v = torch.tanh(x * 0.3 + (t / 1000.0 - 0.5))
    return torch.cat([eps, v], dim=1)


class NoiseReplay:
    """Feeds saved noise to diffusers' DDPM in place of `randn_tensor`."""

    def __init__(self) -> None:
        self.queue: list[torch.Tensor] = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        n = self.queue.pop(0)
        assert tuple(n.shape) == tuple(shape), (n.shape, shape)
        return n.clone()


REPLAY = NoiseReplay()
scheduling_ddpm.randn_tensor = REPLAY
scheduling_unclip.randn_tensor = REPLAY


def guided(out: torch.Tensor, scale: float, channels: int, keep_variance: bool) -> torch.Tensor:
    """Classifier-free guidance exactly as diffusers' IFPipeline writes it."""
    uncond, cond = out.chunk(2)
    if out.shape[1] == channels:
        return uncond + scale * (cond - uncond)
    uncond, _ = uncond.split(channels, dim=1)
    cond, predicted_variance = cond.split(channels, dim=1)
    eps = uncond + scale * (cond - uncond)
    if keep_variance:
        eps = torch.cat([eps, predicted_variance], dim=1)
    return eps


def run_case(case: dict, tensors: dict) -> None:
    cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}[case["sampler"]]
    # UnCLIPScheduler cases: diffusers' class, which our side reads as DDPM.
    unclip = case["config"].get("_class_name") == "UnCLIPScheduler"
    if unclip:
        cls = UnCLIPScheduler
    steps = case.get("steps")
    eta = case.get("eta", 0.0)
    var_channels = case.get("var_channels", False)
    save_every = case.get("save_every", 1)
    name = case["name"]
    for i, (c, s, seed) in enumerate(zip(CONDS, SCALES, SEEDS)):
        sched = cls(**{k: v for k, v in case["config"].items() if not k.startswith("_")})
        if case.get("timesteps") is not None:
            sched.set_timesteps(timesteps=case["timesteps"])
        else:
            sched.set_timesteps(steps if steps is not None else sched.config.num_train_timesteps)
        timesteps = [int(t) for t in sched.timesteps]
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((1, *SHAPE), generator=gen)
        noise = torch.randn((len(timesteps), 1, *SHAPE), generator=gen)
        tensors[f"{name}/x_T/{i}"] = x[0].clone()
        tensors[f"{name}/noise/{i}"] = noise[:, 0].clone()
        traj = [x[0].clone()]
        cond = torch.tensor([0.0, c])
        keep_variance = getattr(sched.config, "variance_type", None) in ("learned", "learned_range")
        drawn = 0
        for k, t in enumerate(timesteps):
            out = dummy_model(torch.cat([x, x]), t, cond, var_channels)
            eps = guided(out, s, SHAPE[0], keep_variance)
            if case["sampler"] == "ddpm":
                REPLAY.queue = [noise[drawn]] if drawn < len(noise) else []
                if unclip:
                    # As diffusers' UnCLIPPipeline calls it: the next timestep, None at the end.
                    prev = timesteps[k + 1] if k + 1 < len(timesteps) else None
                    x = sched.step(eps, t, x, prev_timestep=prev).prev_sample
                else:
                    x = sched.step(eps, t, x).prev_sample
                drawn += 1 - len(REPLAY.queue)
            elif case["sampler"] == "ddim":
                vn = noise[drawn] if eta > 0 else None
                drawn += 1 if eta > 0 else 0
                x = sched.step(eps, t, x, eta=eta, variance_noise=vn,
                               use_clipped_model_output=case.get("clipped", False)).prev_sample
            else:
                x = sched.step(eps, t, x).prev_sample
            if (k + 1) % save_every == 0 or k + 1 == len(timesteps):
                traj.append(x[0].clone())
        tensors[f"{name}/trajectory/{i}"] = torch.stack(traj)
        case["timesteps_used"] = timesteps
        case["noise_drawn"] = drawn


def trajectory_cases() -> list[dict]:
    cases = []
    base = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    # DDPM: every variance type x every x0 treatment, as DeepFloyd IF configures it.
    treatments = {
        "none": dict(clip_sample=False, thresholding=False),
        "clip": dict(clip_sample=True, clip_sample_range=1.0, thresholding=False),
        "dynamic": dict(thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5, clip_sample=True),
    }
    # fixed_large_log is left out: diffusers takes the square root of log(beta) and returns NaN
    # (diffusiond uses exp(0.5 log beta), see src/diffusion/ddpm.rs).
    for var in ["fixed_small", "fixed_small_log", "fixed_large", "learned_range"]:
        for tname, tcfg in treatments.items():
            cases.append(dict(name=f"ddpm_{var}_{tname}", sampler="ddpm", steps=25,
                              var_channels=var == "learned_range",
                              config=dict(base, variance_type=var, **tcfg)))
    cases.append(dict(name="ddpm_linear_full", sampler="ddpm", steps=None, save_every=50,
                      config=dict(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small",
                                  clip_sample=True)))
    cases.append(dict(name="ddpm_custom_timesteps", sampler="ddpm", timesteps=[999, 850, 600, 400, 250, 120, 40, 7, 0],
                      var_channels=True,
                      config=dict(base, variance_type="learned_range", **treatments["dynamic"])))
    for pred in ["v_prediction", "sample"]:
        cases.append(dict(name=f"ddpm_{pred}", sampler="ddpm", steps=20,
                          config=dict(base, variance_type="fixed_small", prediction_type=pred, **treatments["clip"])))
    cases.append(dict(name="ddpm_trailing_sigmoid", sampler="ddpm", steps=20,
                      config=dict(num_train_timesteps=1000, beta_schedule="sigmoid", timestep_spacing="trailing",
                                  variance_type="fixed_large", clip_sample=False)))
    # UnCLIPScheduler as Karlo's three stages configure it (prior: x_0 clipped to
    # +-5; decoder: learned range; super-resolution: 7 steps), and with its defaults.
    unclip = dict(_class_name="UnCLIPScheduler", num_train_timesteps=1000)
    cases.append(dict(name="unclip_prior", sampler="ddpm", steps=25,
                      config=dict(unclip, variance_type="fixed_small_log", prediction_type="sample",
                                  clip_sample=True, clip_sample_range=5.0)))
    cases.append(dict(name="unclip_decoder", sampler="ddpm", steps=25, var_channels=True,
                      config=dict(unclip, variance_type="learned_range", prediction_type="epsilon",
                                  clip_sample=True, clip_sample_range=1.0)))
    cases.append(dict(name="unclip_super_res", sampler="ddpm", steps=7,
                      config=dict(unclip, variance_type="fixed_small_log", prediction_type="epsilon")))
    cases.append(dict(name="unclip_defaults", sampler="ddpm", steps=12, config=dict(_class_name="UnCLIPScheduler")))
    # DDIM: eta x spacing x treatment.
    for eta in [0.0, 0.5, 1.0]:
        for spacing in ["leading", "trailing"]:
            for tname in ["none", "dynamic"]:
                cases.append(dict(name=f"ddim_eta{eta}_{spacing}_{tname}", sampler="ddim", steps=20, eta=eta,
                                  config=dict(base, timestep_spacing=spacing, **treatments[tname])))
    cases.append(dict(name="ddim_clip_offset1", sampler="ddim", steps=50, eta=0.0,
                      config=dict(base, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                                  **treatments["clip"])))
    # ε̂ re-derived from the thresholded or clipped x̂_0 (GLIDE; `use_clipped_model_output`).
    cases.append(dict(name="ddim_clipped_v_dynamic", sampler="ddim", steps=20, eta=0.0, clipped=True,
                      config=dict(base, prediction_type="v_prediction", **treatments["dynamic"])))
    cases.append(dict(name="ddim_clipped_eta0.5_clip", sampler="ddim", steps=20, eta=0.5, clipped=True,
                      config=dict(base, **treatments["clip"])))
    for pred in ["v_prediction", "sample"]:
        cases.append(dict(name=f"ddim_{pred}", sampler="ddim", steps=10, eta=0.0,
                          config=dict(base, prediction_type=pred, clip_sample=False)))
    cases.append(dict(name="ddim_scaled_linear_100", sampler="ddim", steps=100, eta=0.0, save_every=10,
                      config=dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)))
    # DPM-Solver++(2M): spacing x treatment, short (lower-order final) and long runs.
    for spacing in ["linspace", "leading", "trailing"]:
        for tname in ["none", "dynamic"]:
            tcfg = {k: v for k, v in treatments[tname].items() if k != "clip_sample"}
            cases.append(dict(name=f"dpm_{spacing}_{tname}", sampler="dpmsolver++", steps=10,
                              config=dict(base, timestep_spacing=spacing, **tcfg)))
    cases.append(dict(name="dpm_linspace_20", sampler="dpmsolver++", steps=20, config=dict(base)))
    cases.append(dict(name="dpm_heun", sampler="dpmsolver++", steps=12, config=dict(base, solver_type="heun")))
    cases.append(dict(name="dpm_v_prediction", sampler="dpmsolver++", steps=15,
                      config=dict(base, prediction_type="v_prediction")))
    cases.append(dict(name="dpm_learned_range", sampler="dpmsolver++", steps=10, var_channels=True,
                      config=dict(base, variance_type="learned_range", thresholding=True,
                                  dynamic_thresholding_ratio=0.95, sample_max_value=1.5)))
    return cases


def schedules(tensors: dict, meta: dict) -> None:
    """β and ᾱ as diffusers computes them, plus the DDPM paper's `quad` schedule
    (float64, from the reference get_beta_schedule) which diffusers lacks."""
    configs = {
        "linear": dict(beta_schedule="linear"),
        "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
        "sigmoid": dict(beta_schedule="sigmoid"),
        "linear_zero_snr": dict(beta_schedule="linear", rescale_betas_zero_snr=True),
        "squaredcos_cap_v2_100": dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=100),
    }
    for name, cfg in configs.items():
        cfg = dict(dict(num_train_timesteps=1000), **cfg)
        s = DDPMScheduler(**cfg)
        tensors[f"schedule/{name}/betas"] = s.betas.clone()
        tensors[f"schedule/{name}/alphas_cumprod"] = s.alphas_cumprod.clone()
        meta[name] = cfg
    quad = np.linspace(1e-4**0.5, 0.02**0.5, 1000, dtype=np.float64) ** 2
    tensors["schedule/quadratic/betas"] = torch.from_numpy(quad.astype(np.float32))
    tensors["schedule/quadratic/alphas_cumprod"] = torch.from_numpy(np.cumprod(1.0 - quad).astype(np.float32))
    meta["quadratic"] = dict(num_train_timesteps=1000, beta_schedule="quadratic")

    # ADM's derived quantities (gaussian_diffusion.py), in float64 from diffusers' f32 ᾱ.
    ac = s_ac = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    betas = 1.0 - ac / torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), s_ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    tensors["derived/posterior_variance"] = post_var
    tensors["derived/posterior_log_variance_clipped"] = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    tensors["derived/posterior_mean_coef1"] = betas * torch.sqrt(ac_prev) / (1.0 - ac)
    tensors["derived/posterior_mean_coef2"] = (1.0 - ac_prev) * torch.sqrt(1.0 - betas) / (1.0 - ac)
    tensors["derived/snr"] = ac / (1.0 - ac)


def timestep_lists() -> list[dict]:
    out = []
    for sampler, cls in [("ddpm", DDPMScheduler), ("ddim", DDIMScheduler), ("dpmsolver++", DPMSolverMultistepScheduler)]:
        for spacing in ["leading", "trailing", "linspace"]:
            for offset in [0, 1]:
                for steps in [10, 20, 50, 100, 250, 1000, 7, 33]:
                    if sampler == "dpmsolver++" and steps == 1000:
                        continue  # DPM-Solver++ with every training step is degenerate in diffusers
                    s = cls(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
                    s.set_timesteps(steps)
                    out.append(dict(sampler=sampler, spacing=spacing, steps_offset=offset, steps=steps,
                                    timesteps=[int(t) for t in s.timesteps]))
    return out


def diffusion_fixtures() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"diffusers": diffusers.__version__, "torch": torch.__version__, "shape": list(SHAPE),
                  "conds": CONDS, "scales": SCALES, "seeds": SEEDS}
    sched_meta: dict = {}
    schedules(tensors, sched_meta)
    meta["schedules"] = sched_meta
    cases = trajectory_cases()
    for case in cases:
        run_case(case, tensors)
    meta["cases"] = cases
    meta["timesteps"] = timestep_lists()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(OUT / "diffusers.safetensors"))
    (OUT / "diffusers.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = (OUT / "diffusers.safetensors").stat().st_size
    print(f"wrote {len(cases)} trajectories, {len(tensors)} tensors ({size / 1e6:.1f} MB) to {OUT}")


# Each part writes its own folder under tests/fixtures; `--only` regenerates one.
PARTS = {
    "diffusion": diffusion_fixtures,
    "unet": lambda: __import__("fixtures_unet").generate(ROOT / "tests" / "fixtures" / "unet"),
    "text": lambda: __import__("fixtures_text").generate(ROOT / "tests" / "fixtures" / "text", ROOT),
    "pipeline": lambda: __import__("fixtures_pipeline").generate(ROOT / "tests" / "fixtures" / "cascade", ROOT),
    "unclip": lambda: __import__("fixtures_unclip").generate(ROOT / "tests" / "fixtures" / "unclip"),
    # Reads the cascade fixture: after "pipeline".
    "edit": lambda: __import__("fixtures_edit").generate(ROOT / "tests" / "fixtures" / "edit", ROOT),
}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(PARTS), action="append", help="regenerate only these parts")
    parser.add_argument("--setup", action="store_true", help="only create the pinned environment")
    args = parser.parse_args()
    if args.setup:
        return
    for name in args.only or list(PARTS):
        PARTS[name]()


if __name__ == "__main__":
    main()
