# Shared settings for fraudstream's scripts. Source it; do not run it.
#
# Everything heavy lives in a cache directory outside the clone, so a second run (and CI on
# the same machine) reuses it: FRAUDSTREAM_CACHE, default ~/.cache/fraudstream.

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FRAUDSTREAM_CACHE:-$HOME/.cache/fraudstream}"
VENV="$CACHE/venv"
PY="$VENV/bin/python"
# The Apache Kafka release pinned by scripts/kafka/pom.xml, installed by scripts/setup.
KAFKA_VERSION=$(sed -n 's|.*<kafka.version>\(.*\)</kafka.version>.*|\1|p' "$REPO/scripts/kafka/pom.xml")
KAFKA_LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"
BROKER="${FRAUDSTREAM_BROKER:-127.0.0.1:9092}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
# RocksDB's C++ library, compiled once, optimised, by scripts/setup and linked by every build
# (tests, clippy, release): left to the rocksdb crate, each profile compiles it anew, and
# clippy too (its build-script fingerprint differs), 12-16 minutes each on two cores.
ROCKSDB_SYS_VERSION=$(sed -n '/^name = "librocksdb-sys"$/{n;s/^version = "\(.*\)"$/\1/p}' "$REPO/Cargo.lock")
export ROCKSDB_LIB_DIR="$CACHE/rocksdb-$ROCKSDB_SYS_VERSION"
export ROCKSDB_STATIC=1

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# The ONNX Runtime shared library from the onnxruntime wheel in the venv.
ort_library() {
    local lib
    lib=$(ls "$VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n 1)
    [ -n "$lib" ] || die "ONNX Runtime library not found in $VENV; run scripts/setup"
    printf '%s\n' "$lib"
}

# Runs a class of the installed Kafka (the broker's storage tool) with the tools' logging.
kafka_java() {
    "$JAVA" -Xmx512m -Dlog4j2.configurationFile="$REPO/scripts/kafka/tools-log4j2.xml" \
        -cp "$KAFKA_LIBS/*" "$@"
}

# True when something accepts TCP connections on host:port.
port_open() {
    local host=${1%:*} port=${1##*:}
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}
