# Shared settings for fraudstream's scripts. Source it; do not run it.
#
# Everything heavy lives in a cache directory outside the clone, so a second run (and CI on
# the same machine) reuses it: FRAUDSTREAM_CACHE, default ~/.cache/fraudstream.

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FRAUDSTREAM_CACHE:-$HOME/.cache/fraudstream}"
VENV="$CACHE/venv"
PY="$VENV/bin/python"
NISSHI_VERSION="0.8.1"
NISSHI="$CACHE/nisshi-$NISSHI_VERSION/bin/nisshi"
BROKER="${FRAUDSTREAM_BROKER:-127.0.0.1:9092}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# The ONNX Runtime shared library from the onnxruntime wheel in the venv.
ort_library() {
    local lib
    lib=$(ls "$VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n 1)
    [ -n "$lib" ] || die "ONNX Runtime library not found in $VENV; run scripts/setup"
    printf '%s\n' "$lib"
}

# True when something accepts TCP connections on host:port.
port_open() {
    local host=${1%:*} port=${1##*:}
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}
