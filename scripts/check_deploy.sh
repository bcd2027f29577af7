#!/usr/bin/env bash
# Offline checks of the container and Kubernetes files (docker/, deploy/):
#
#   1. hadolint: docker/Dockerfile; shellcheck: the deploy scripts
#   2. yamllint: compose files and manifests (syntax, duplicate keys)
#   3. the Dockerfile's runtime stage and docker/runtime-files.txt parse the way
#      scripts/runtime_tree.sh reads them
#   4. kustomize (kubectl's) renders deploy/base and both overlays
#   5. every rendered object validates, strictly (unknown fields fail), against
#      the Kubernetes schemas of each version in $K8S_VERSIONS; the KEDA
#      ScaledObject against deploy/schemas/; a kind with no schema fails
#   6. docker/compose*.yaml against the Compose Specification schema
#   7. docker/nginx.conf with `nginx -t` (the upstream names resolved to
#      127.0.0.1 in a private mount namespace)
#   8. deploy/check_consistency.py: the files agree with each other and with
#      the server (names, limits, timeouts; DIFFUSIOND_* names against
#      `serve --help` of $BINARY, default target/release/diffusiond, if present)
#
# Tools are pinned (deploy/tools-requirements.txt) and installed from PyPI into
# the git-ignored .tools/venv when missing; nginx comes from Debian's packages
# (apt-get, as root) when it is not installed. Exits 1 if any check fails.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
TOOLS=$REPO/.tools/venv
K8S_VERSIONS=${K8S_VERSIONS:-1.30.0 1.37.0}
BINARY=${BINARY:-$REPO/target/release/diffusiond}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/check-deploy.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
OVERLAYS=(base overlays/cpu overlays/gpu)
# CRDs the Kubernetes schemas do not cover: apiVersion/kind -> our schema.
declare -A CRD_SCHEMAS=(["keda.sh/v1alpha1/ScaledObject"]=deploy/schemas/scaledobject-keda-v1alpha1.json)

failed=()
step() { printf '\n== %s\n' "$1"; }
run() {  # NAME COMMAND...: runs it, records a failure, goes on
    local name=$1
    shift
    if "$@"; then
        echo "   ok: $name"
    else
        echo "   FAIL: $name"
        failed+=("$name")
    fi
}

install_tools() {
    local want have=""
    want=$(cat deploy/tools-requirements.txt docker/stage-requirements.txt | sha256sum | cut -d' ' -f1)
    [[ -f $TOOLS/.requirements.sha256 ]] && have=$(cat "$TOOLS/.requirements.sha256")
    if [[ $want != "$have" || ! -x $TOOLS/bin/kubectl ]]; then
        echo "installing deploy/tools-requirements.txt into $TOOLS"
        python3 -m venv "$TOOLS"
        "$TOOLS/bin/pip" install --quiet --disable-pip-version-check \
            -r deploy/tools-requirements.txt -r docker/stage-requirements.txt
        echo "$want" >"$TOOLS/.requirements.sha256"
    fi
    if ! command -v nginx >/dev/null; then
        [[ $(id -u) == 0 ]] || { echo "nginx is missing: apt-get install nginx (as root)" >&2; exit 1; }
        echo "installing nginx from Debian's packages"
        apt-get install -y -qq --no-install-recommends nginx >/dev/null 2>&1 \
            || { apt-get update -qq && apt-get install -y -qq --no-install-recommends nginx >/dev/null; }
    fi
}

install_tools
export PATH=$TOOLS/bin:$PATH
echo "tools: hadolint $(hadolint --version | awk '{print $NF}'), shellcheck $(shellcheck --version | awk '/^version/ {print $2}')," \
    "kubectl $(kubectl version --client | awk '/Client/ {print $3}') ($(kubectl version --client | awk '/Kustomize/ {print "kustomize " $3}')),"
echo "       kubernetes-validate $(kubernetes-validate --version), check-jsonschema $(check-jsonschema --version | awk '{print $NF}')," \
    "yamllint $(yamllint --version | awk '{print $2}'), $(nginx -v 2>&1 | sed 's/.*: //')"

step "lint: Dockerfile and scripts"
run "hadolint docker/Dockerfile" hadolint docker/Dockerfile
run "shellcheck" shellcheck scripts/check_deploy.sh scripts/runtime_tree.sh docker/healthcheck.sh
run "python syntax" "$TOOLS/bin/python" -c 'import ast, sys; [ast.parse(open(f).read(), f) for f in sys.argv[1:]]' \
    docker/stage_runtime.py deploy/check_consistency.py

step "YAML: compose and manifests"
YAMLLINT_CONFIG='{extends: default, rules: {line-length: {max: 140}, document-start: disable, comments: {min-spaces-from-content: 1}, truthy: {check-keys: false}}}'
run "yamllint" yamllint --strict -d "$YAMLLINT_CONFIG" docker/compose.yaml docker/compose.gpu.yaml deploy/

step "Dockerfile runtime stage as scripts/runtime_tree.sh reads it"
run_spec() { "$TOOLS/bin/python" docker/stage_runtime.py run-spec --root /nonexistent >"$WORK/run-spec"; }
run "run-spec" run_spec
sed 's/^/   /' "$WORK/run-spec"

step "kustomize build"
render() { kubectl kustomize "$1" >"$2"; }
for overlay in "${OVERLAYS[@]}"; do
    run "render deploy/$overlay" render "deploy/$overlay" "$WORK/${overlay//\//-}.yaml"
done

step "Kubernetes schemas (strict; versions $K8S_VERSIONS) and CRD schemas"
split_docs() {  # RENDERED OUTDIR: core.yaml for kubernetes-validate, crd-*.yaml with their schema
    local key pairs=()
    for key in "${!CRD_SCHEMAS[@]}"; do pairs+=("$key=${CRD_SCHEMAS[$key]}"); done
    "$TOOLS/bin/python" - "$@" "${pairs[@]}" <<'EOF'
import sys, yaml
from pathlib import Path
rendered, outdir = sys.argv[1], Path(sys.argv[2])
schemas = dict(pair.split("=", 1) for pair in sys.argv[3:])
outdir.mkdir(parents=True, exist_ok=True)
core = []
for i, doc in enumerate(d for d in yaml.safe_load_all(Path(rendered).read_text()) if d):
    key = f"{doc['apiVersion']}/{doc['kind']}"
    if key in schemas:
        name = f"crd-{i}-{doc['kind']}-{doc['metadata']['name']}.yaml"
        (outdir / name).write_text(yaml.safe_dump(doc))
        print(f"{name} {schemas[key]}")
    else:
        core.append(doc)
(outdir / "core.yaml").write_text(yaml.safe_dump_all(core))
print(f"# {len(core)} objects for the Kubernetes schemas", file=sys.stderr)
EOF
}
validate_core() {  # FILE VERSION: strict; a kind without a schema fails
    local log
    log=$(kubernetes-validate --strict --quiet -k "$2" "$1" 2>&1) || { echo "$log"; return 1; }
    if grep -q "Couldn't find schema" <<<"$log"; then
        echo "$log"
        return 1
    fi
}
for overlay in "${OVERLAYS[@]}"; do
    name=${overlay//\//-}
    dir=$WORK/split-$name
    split_docs "$WORK/$name.yaml" "$dir" 2>/dev/null >"$dir.plan" || { failed+=("split $overlay"); continue; }
    for version in $K8S_VERSIONS; do
        run "deploy/$overlay: $(grep -c '^kind:' "$dir/core.yaml") objects, Kubernetes $version" validate_core "$dir/core.yaml" "$version"
    done
    while read -r file schema; do
        run "deploy/$overlay: ${file#crd-*-} against $schema" check-jsonschema --schemafile "$schema" "$dir/$file"
    done <"$dir.plan"
done

step "Compose Specification schema"
run "docker/compose.yaml docker/compose.gpu.yaml" \
    check-jsonschema --builtin-schema vendor.compose-spec docker/compose.yaml docker/compose.gpu.yaml

step "nginx -t"
nginx_test() {
    local hosts=$WORK/hosts conf=$REPO/docker/nginx.conf names
    names=$(sed -n '/upstream/,/}/ s/^[[:space:]]*server[[:space:]]\{1,\}\([A-Za-z0-9_.-]*\):.*/\1/p' "$conf" | sort -u | tr '\n' ' ')
    mkdir -p "$WORK/nginx"
    printf '127.0.0.1 localhost %s\n' "$names" >"$hosts"
    echo "   upstream names resolved to 127.0.0.1 for the test: $names"
    if unshare -m true 2>/dev/null; then
        # shellcheck disable=SC2016  # $1..$3 are the inner shell's arguments
        unshare -m sh -c 'mount --bind "$1" /etc/hosts && exec nginx -t -q -p "$2" -c "$3"' sh "$hosts" "$WORK/nginx" "$conf"
    else
        echo "   note: no mount namespace here; testing a copy with the upstream names replaced by 127.0.0.1"
        local copy=$WORK/nginx/nginx.conf name
        cp "$conf" "$copy"
        for name in $names; do sed -i "s/server $name:/server 127.0.0.1:/" "$copy"; done
        nginx -t -q -p "$WORK/nginx" -c "$copy"
    fi
}
run "docker/nginx.conf" nginx_test

step "consistency across files and with the server"
consistency=(--rendered base="$WORK/base.yaml" --rendered cpu="$WORK/overlays-cpu.yaml" --rendered gpu="$WORK/overlays-gpu.yaml")
if [[ -x $BINARY ]]; then
    consistency+=(--binary "$BINARY")
else
    echo "   note: no binary at $BINARY; DIFFUSIOND_* names not checked against serve --help (set BINARY=...)"
fi
run "deploy/check_consistency.py" "$TOOLS/bin/python" deploy/check_consistency.py "${consistency[@]}"

echo
if ((${#failed[@]})); then
    echo "check_deploy: ${#failed[@]} failed: ${failed[*]}"
    exit 1
fi
echo "check_deploy: all checks passed"
echo "not covered here (no Docker engine or cluster): building the image, running compose, applying the manifests"
