#!/usr/bin/env python3
"""Summarises `diffusiond train` runs as the small training log committed next to
the shipped weights: per stage the hardware, steps, images seen, wall time,
throughput and losses (means over windows of steps, so the curve is readable),
and the held-out validation lines (`val step ...`) when the run wrote any.

    scripts/training_log.py runs/base-eps runs/base-v runs/base-minsnr runs/base runs/base-ground runs/sr64-eps runs/sr64 runs/sr128-eps runs/sr128 > models/default/TRAINING.md

A run's hardware is read from `<run>/hardware.txt` when there is one (a run
made on another machine), else it is this machine's CPU.

A resumed run repeats the steps after its last checkpoint; the later line wins.
Wall time adds up the gaps between consecutive time-stamped lines (a gap over
ten minutes is a pause, not training); lines written before time stamps
existed are counted at the run's mean step time and marked as estimated.
"""

import json
import os
import platform
import sys

WINDOW = 250
PAUSE = 600


def read(run):
    """The step lines by step, and the validation lines by step."""
    steps, validations = {}, {}
    for line in open(os.path.join(run, "train.log")):
        if line.startswith("#"):
            continue  # a run's start or resume, or a skipped mixed-precision step
        f = line.split()
        held_out = f[0] == "val"
        if held_out:
            f = f[1:]
        fields = dict(zip(f[0::2], f[1::2]))
        (validations if held_out else steps)[int(fields["step"])] = fields
    return [steps[k] for k in sorted(steps)], [validations[k] for k in sorted(validations)]


def learning_rates(rows, config):
    """The configured rate, or each rate the log shows between warm-up and
    cool-down with its steps when a resumed run changed it; then the cool-down."""
    cooldown = config.get("cooldown_steps", 0)
    cool_start = config["steps"] - cooldown
    spans = []
    for r in rows:
        if int(r["step"]) <= config["warmup_steps"] or int(r["step"]) > cool_start or "lr" not in r:
            continue
        lr = float(r["lr"])
        if spans and spans[-1][0] == lr:
            spans[-1][2] = r["step"]
        else:
            spans.append([lr, r["step"], r["step"]])
    text = str(config["lr"]) if len(spans) <= 1 else ", then ".join(f"{lr:g} (steps {a}–{b})" for lr, a, b in spans)
    if cooldown:
        text += f", then a 1 − sqrt cool-down to 0 over steps {cool_start + 1}–{config['steps']}"
    return text


def cpu():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} threads"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def precision(run):
    """The arithmetic a CPU run's start lines name (`# … precision bf16 …`)."""
    names = {"f32": "f32", "bf16": "bf16 products in f32 layers (f32 weights)"}
    for line in open(os.path.join(run, "train.log")):
        f = line.split()
        if line.startswith("#") and "precision" in f[:-1]:
            kind = f[f.index("precision") + 1].rstrip(",")
            return names.get(kind, kind)
    return "f32"


def main(runs):
    print("# Training log of the default cascade\n")
    print("Made by `scripts/training_log.py` from each run's `train.log`; configs in `train/`.")
    print("Stages that trained at the same time shared the machine, so each one's images/s is its share.\n")
    for run in runs:
        name = os.path.basename(os.path.normpath(run))
        config = json.load(open(os.path.join("models/default/train", f"{name}.json")))
        hardware_file = os.path.join(run, "hardware.txt")
        hardware = open(hardware_file).read().strip() if os.path.exists(hardware_file) else f"{cpu()}; libtorch CPU, {precision(run)}"
        target = "v" if config["scheduler"].get("prediction_type") == "v_prediction" else "ε"
        # Steps a stopped run took past its last checkpoint are not in the weights.
        rows, validations = read(run)
        rows = [r for r in rows if int(r["step"]) <= config["steps"]]
        validations = [v for v in validations if int(v["step"]) <= config["steps"]]
        stamps = [int(r["unix"]) for r in rows if "unix" in r]
        gaps = [b - a for a, b in zip(stamps, stamps[1:]) if 0 <= b - a < PAUSE]
        per_step = sum(gaps) / len(gaps) if gaps else 0.0
        unstamped = sum(1 for r in rows if "unix" not in r)
        wall = sum(gaps) + unstamped * per_step
        last = rows[-WINDOW // 2 :]
        mean = lambda key, rs: sum(float(r[key]) for r in rs) / len(rs)
        print(f"## {name}\n")
        print(f"- hardware: {hardware}")
        if config.get("init"):
            init = os.path.normpath(config["init"])
            # `runs/<name>/stage` names its run; a shipped stage folder names itself.
            source = os.path.basename(os.path.dirname(init)) if os.path.basename(init) == "stage" else os.path.basename(init)
            print(f"- starts from the weights of `{source}` (`init`)")
        print(f"- prediction: {target}; schedule {config['scheduler']['beta_schedule']}")
        print(f"- steps: {len(rows)} of batch {config['batch']} ({len(rows) * config['batch']} images), lr {learning_rates(rows, config)}, EMA {config['ema_decay']}")
        if config.get("min_snr_gamma"):
            print(f"- loss weighting: Min-SNR-γ, γ = {config['min_snr_gamma']}")
        grounded = bool(config.get("grounding_weight")) and all("ground" in r for r in rows)
        if grounded:
            print(f"- grounding loss: weight {config['grounding_weight']}; its mean over the last {len(last)} steps {mean('ground', last):.4f}")
        estimate = f" ({unstamped} early steps estimated at the mean step time)" if unstamped else ""
        print(f"- wall time: {wall / 3600:.2f} h{estimate}; {config['batch'] / per_step if per_step else 0:.1f} images/s on average")
        print(f"- final losses (mean of the last {len(last)} steps): total {mean('loss', last):.4f}, {target}-MSE {mean('mse', last):.4f}, λ·L_vlb {mean('vlb', last):.5f}\n")
        extra = " grounding |" if grounded else ""
        print(f"| steps | {target}-MSE | total |{extra}\n|---:|---:|---:|" + ("---:|" if grounded else ""))
        for start in range(0, len(rows), WINDOW):
            window = rows[start : start + WINDOW]
            ground = f" {mean('ground', window):.4f} |" if grounded else ""
            print(f"| {int(window[0]['step'])}–{int(window[-1]['step'])} | {mean('mse', window):.4f} | {mean('loss', window):.4f} |{ground}")
        print()
        if validations:
            levels = [k[3:] for k in validations[0] if k.startswith("x0_") and k != "x0_mean"]
            for what, cond, null in [("all pixels", "x0_", "null_"), ("the objects' pixels", "obj_", "objnull_")]:
                if cond + "mean" not in validations[0]:
                    continue
                print(f"Held-out x̂₀ MSE of the EMA over {what} at timestep t, with the caption / with the empty prompt:\n")
                print("| step | " + " | ".join(f"t = {t}" for t in levels) + " | mean |")
                print("|---:|" + "---:|" * (len(levels) + 1))
                for v in validations:
                    cells = [f"{float(v[cond + t]):.4f} / {float(v[null + t]):.4f}" for t in levels + ["mean"]]
                    print(f"| {v['step']} | " + " | ".join(cells) + " |")
                print()


if __name__ == "__main__":
    main(sys.argv[1:])
