#!/usr/bin/env python3
"""Cross-file checks of the deployment files, the ones no schema can make.

Run by scripts/check_deploy.sh with the tool venv's Python (PyYAML):

    check_consistency.py --rendered cpu=/tmp/cpu.yaml --rendered gpu=/tmp/gpu.yaml [--binary FILE]

Checks that the settings agree across docker/compose.yaml, docker/nginx.conf,
the rendered Kubernetes overlays, the Dockerfile and the server itself: replica
names, the Redis store URL and queue names, the 8 MiB body limit, the grace
period against preStop + drain timeout, probes, ports, the API-key secret, and
(given a binary) that every DIFFUSIOND_* variable set is one `serve` reads.
Prints one line per failed check and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
STORE_URL = "redis://redis:6379/0"
QUEUE_STREAM = "diffusiond:queue"
QUEUE_GROUP = "workers"
PORT = 8080

failures: list[str] = []


def check(ok: bool, what: str) -> None:
    if not ok:
        failures.append(what)


def seconds(value) -> int:
    """'45s', '1m30s', 45 -> seconds."""
    if isinstance(value, int):
        return value
    total = 0
    for number, unit in re.findall(r"(\d+)(h|m|s)", str(value)):
        total += int(number) * {"h": 3600, "m": 60, "s": 1}[unit]
    return total


def server_body_limit() -> int | None:
    text = (REPO / "src/api/state.rs").read_text()
    match = re.search(r"DEFAULT_MAX_BODY_BYTES: usize = (\d+) \* 1024", text)
    return int(match.group(1)) * 1024 if match else None


def nginx_size(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmM]?)", value).groups()
    return int(number) * {"": 1, "k": 1024, "m": 1024 * 1024}[unit.lower()]


def check_compose_and_nginx(body_limit: int | None) -> set[str]:
    compose = yaml.safe_load((REPO / "docker/compose.yaml").read_text())
    services = compose["services"]
    replicas = {name for name, s in services.items() if "diffusiond" in str(s.get("image", ""))}
    check(len(replicas) >= 2, f"compose: {len(replicas)} diffusiond services, want at least 2")
    check("redis" in services, "compose: no `redis` service for --store")
    for name in sorted(replicas):
        s = services[name]
        command = s.get("command", [])
        check(STORE_URL in command and "--store" in command, f"compose: {name} does not run `serve --store {STORE_URL}`")
        drain = int(s.get("environment", {}).get("DIFFUSIOND_DRAIN_TIMEOUT", 30))
        grace = seconds(s.get("stop_grace_period", "10s"))
        check(grace > drain, f"compose: {name} stop_grace_period {grace}s does not exceed DIFFUSIOND_DRAIN_TIMEOUT {drain}s")
    gpu = yaml.safe_load((REPO / "docker/compose.gpu.yaml").read_text())
    check(set(gpu["services"]) == replicas, f"compose.gpu.yaml covers {sorted(gpu['services'])}, compose.yaml has {sorted(replicas)}")

    conf = (REPO / "docker/nginx.conf").read_text()
    upstream = re.search(r"upstream\s+diffusiond\s*\{(.*?)\}", conf, re.S)
    servers = set(re.findall(r"^\s*server\s+([\w.-]+):(\d+)", upstream.group(1), re.M)) if upstream else set()
    check({h for h, _ in servers} == replicas, f"nginx.conf upstream {sorted(servers)} is not compose's replicas {sorted(replicas)}")
    check(all(int(p) == PORT for _, p in servers), f"nginx.conf upstream ports {sorted(servers)} are not {PORT}")
    size = re.search(r"client_max_body_size\s+(\w+);", conf)
    check(size is not None and nginx_size(size.group(1)) == body_limit, f"nginx.conf client_max_body_size is not the server's {body_limit} bytes")
    check(f"larger than {body_limit} bytes" in conf, "nginx.conf's 413 bodies do not name the server's limit")
    events = re.search(r"location ~ \^/jobs/\[\^/\]\+/events\$ \{(.*?)\}", conf, re.S)
    check(events is not None and "proxy_buffering off;" in events.group(1), "nginx.conf: the SSE location does not turn proxy_buffering off")
    check("proxy_set_header X-Request-Id" in conf, "nginx.conf does not pass X-Request-Id upstream")
    sync = int(services[sorted(replicas)[0]].get("environment", {}).get("DIFFUSIOND_SYNC_TIMEOUT", 300)) if replicas else 300
    read = re.search(r"^\s{8}proxy_read_timeout\s+(\w+);", conf, re.M)
    check(read is not None and seconds(read.group(1)) > sync, f"nginx.conf proxy_read_timeout does not exceed DIFFUSIOND_SYNC_TIMEOUT {sync}s")
    return {k for s in services.values() for k in (s.get("environment") or {}) if k.startswith("DIFFUSIOND_")}


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d and d.get("kind") == kind]


def check_overlay(name: str, docs: list[dict], body_limit: int | None) -> set[str]:
    where = f"overlay {name}"
    deployments = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    configmaps = {d["metadata"]["name"]: d for d in by_kind(docs, "ConfigMap")}
    secrets = {d["metadata"]["name"]: d for d in by_kind(docs, "Secret")}
    services = {d["metadata"]["name"]: d for d in by_kind(docs, "Service")}
    deployment = deployments.get("diffusiond")
    if deployment is None:
        failures.append(f"{where}: no Deployment diffusiond")
        return set()
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "diffusiond")
    config = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef", {}).get("name")
        if ref:
            check(ref in configmaps, f"{where}: envFrom names ConfigMap {ref}, which is not rendered")
            config.update(configmaps.get(ref, {}).get("data", {}))
    env = {e["name"]: e for e in container.get("env", [])}

    check(config.get("DIFFUSIOND_STORE") == STORE_URL, f"{where}: DIFFUSIOND_STORE is {config.get('DIFFUSIOND_STORE')!r}, want {STORE_URL}")
    check("--store=$(DIFFUSIOND_STORE)" in container.get("args", []), f"{where}: args do not pass --store=$(DIFFUSIOND_STORE)")
    check(pod.get("enableServiceLinks") is False, f"{where}: enableServiceLinks would inject DIFFUSIOND_* service variables")

    keys = env.get("DIFFUSIOND_API_KEYS", {}).get("valueFrom", {}).get("secretKeyRef", {})
    check(bool(keys), f"{where}: DIFFUSIOND_API_KEYS does not come from a Secret")
    if keys:
        secret = secrets.get(keys.get("name"), {})
        check(keys.get("key") in {**secret.get("data", {}), **secret.get("stringData", {})}, f"{where}: Secret {keys.get('name')} has no key {keys.get('key')}")

    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    check(ports.get("http") == PORT, f"{where}: container port http is {ports.get('http')}, the image listens on {PORT}")
    ready = container.get("readinessProbe", {}).get("httpGet", {})
    live = container.get("livenessProbe", {}).get("httpGet", {})
    check(ready.get("path") == "/ready", f"{where}: readiness probe is not GET /ready")
    check(live.get("path") == "/health", f"{where}: liveness probe is not GET /health")

    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    sleep = int(pre_stop[1]) if len(pre_stop) == 2 and pre_stop[0] == "sleep" else 0
    check(sleep > 0, f"{where}: no preStop sleep")
    drain = int(config.get("DIFFUSIOND_DRAIN_TIMEOUT", 30))
    grace = int(pod.get("terminationGracePeriodSeconds", 30))
    check(grace > sleep + drain, f"{where}: terminationGracePeriodSeconds {grace} does not exceed preStop {sleep} + drain {drain}")
    security = pod.get("securityContext", {})
    check(security.get("runAsNonRoot") is True and security.get("runAsUser") == 10001, f"{where}: pod does not run as the image's uid 10001")

    device = config.get("DIFFUSIOND_DEVICE")
    limits = container.get("resources", {}).get("limits", {})
    if name == "gpu":
        check(device == "cuda", f"{where}: DIFFUSIOND_DEVICE is {device!r}, want cuda")
        check(str(limits.get("nvidia.com/gpu")) == "1", f"{where}: no nvidia.com/gpu: 1 limit")
        check(any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), f"{where}: no nvidia.com/gpu toleration")
    elif name == "cpu":
        check(device == "cpu", f"{where}: DIFFUSIOND_DEVICE is {device!r}, want cpu")
        check("nvidia.com/gpu" not in limits, f"{where}: asks for a GPU")

    ingress = next(iter(by_kind(docs, "Ingress")), {})
    notes = ingress.get("metadata", {}).get("annotations", {})
    check(notes.get("nginx.ingress.kubernetes.io/proxy-buffering") == "off", f"{where}: Ingress buffers (SSE needs proxy-buffering off)")
    body = notes.get("nginx.ingress.kubernetes.io/proxy-body-size", "1m")
    check(nginx_size(body) == body_limit, f"{where}: Ingress proxy-body-size {body} is not the server's {body_limit} bytes")
    sync = int(config.get("DIFFUSIOND_SYNC_TIMEOUT", 300))
    check(int(notes.get("nginx.ingress.kubernetes.io/proxy-read-timeout", 60)) > sync, f"{where}: Ingress read timeout does not exceed DIFFUSIOND_SYNC_TIMEOUT")
    backends = {p["backend"]["service"]["name"] for r in ingress.get("spec", {}).get("rules", []) for p in r["http"]["paths"]}
    check(backends <= set(services), f"{where}: Ingress backends {sorted(backends)} are not all rendered Services")

    redis = services.get("redis")
    check(redis is not None, f"{where}: no Service redis")
    scaled = next(iter(by_kind(docs, "ScaledObject")), None)
    check(scaled is not None, f"{where}: no ScaledObject")
    if scaled and redis:
        check(scaled["spec"]["scaleTargetRef"]["name"] == "diffusiond", f"{where}: ScaledObject targets {scaled['spec']['scaleTargetRef']['name']}")
        triggers = [t for t in scaled["spec"]["triggers"] if t["type"] == "redis-streams"]
        check(len(triggers) == 1, f"{where}: want one redis-streams trigger")
        for t in triggers:
            meta = t["metadata"]
            check(meta.get("stream") == QUEUE_STREAM, f"{where}: trigger stream {meta.get('stream')!r}, want {QUEUE_STREAM}")
            check(meta.get("consumerGroup") == QUEUE_GROUP, f"{where}: trigger consumerGroup {meta.get('consumerGroup')!r}, want {QUEUE_GROUP}")
            want = f"redis.{redis['metadata'].get('namespace')}.svc.cluster.local:6379"
            check(meta.get("address") == want, f"{where}: trigger address {meta.get('address')!r}, want {want} (Redis's namespace)")
            check(meta.get("databaseIndex", "0") == STORE_URL.rsplit("/", 1)[1], f"{where}: trigger databaseIndex is not the store URL's")
            check("pendingEntriesCount" not in meta, f"{where}: pendingEntriesCount cannot grow past the running jobs (replicas claim only what they start); scale on lagCount")
            check(meta.get("lagCount") == config.get("DIFFUSIOND_MAX_ACTIVE_JOBS"), f"{where}: lagCount is not DIFFUSIOND_MAX_ACTIVE_JOBS")
        check(scaled["spec"].get("minReplicaCount", 0) >= 2, f"{where}: fewer than 2 replicas at minimum (the PDB allows one down)")
    return set(config) | set(env)


def check_server_variables(binary: Path, used: set[str]) -> None:
    try:
        help_text = subprocess.run([str(binary), "serve", "--help"], check=True, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        failures.append(f"{binary} serve --help: {e}")
        return
    known = set(re.findall(r"\[env: (DIFFUSIOND_\w+)[=\]]", help_text))  # `NAME]` when the value is hidden
    has_store = "--store" in help_text
    for name in sorted(v for v in used if v.startswith("DIFFUSIOND_")):
        if name == "DIFFUSIOND_STORE" and not has_store:
            continue
        check(name in known, f"{name} is not a variable `{binary.name} serve` reads (typo?)")
    if not has_store:
        print(f"note: {binary} has no --store flag yet; the manifests pass --store {STORE_URL}")
    print(f"checked {len([v for v in used if v.startswith('DIFFUSIOND_')])} DIFFUSIOND_* variables against `{binary} serve --help`")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rendered", action="append", default=[], metavar="NAME=FILE", help="a rendered overlay")
    parser.add_argument("--binary", type=Path, help="a diffusiond binary, to check variable names")
    args = parser.parse_args()
    limit = server_body_limit()
    check(limit is not None, "src/api/state.rs: DEFAULT_MAX_BODY_BYTES not found")
    used = check_compose_and_nginx(limit)
    for item in args.rendered:
        name, _, path = item.partition("=")
        docs = list(yaml.safe_load_all(Path(path).read_text()))
        used |= check_overlay(name, docs, limit)
    if args.binary:
        check_server_variables(args.binary, used)
    for failure in failures:
        print(f"FAIL: {failure}")
    if not failures:
        print(f"consistency: compose, nginx.conf and {len(args.rendered)} overlays agree")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
