"""The table of bench/profile: a `perf record` of the scorer (sampled at --frequency Hz of CPU
time, every thread) grouped by component, as CPU microseconds per transaction, and the top
symbols. Components are recognised by library (dso) and symbol name; what matches none is
"other" and its top symbols are listed, so nothing is hidden.

    python bench/profile.py PERF_DATA --transactions N [--frequency 999] [--out FILE.md]
"""

import argparse
import re
import subprocess
import sys
from collections import Counter

# (component, test on (dso, symbol)), first match wins.
COMPONENTS = [
    ("ONNX Runtime (model)", lambda d, s: "onnxruntime" in d),
    ("kernel (syscalls, network, scheduling)", lambda d, s: d.startswith("[kernel")),
    ("librdkafka (client threads, protocol)", lambda d, s: s.startswith(("rd_", "rd_kafka", "rdk", "tinycthread", "cnd_", "mtx_", "thrd_"))),
    ("compression, checksums (lz4, zstd, crc32c)", lambda d, s: re.search(r"lz4|zstd|ZSTD|LZ4|crc32|snappy", s) is not None),
    ("RocksDB (state store)", lambda d, s: "rocksdb" in s.lower()),
    ("allocator (malloc, free)", lambda d, s: (re.search(r"malloc|free|realloc|calloc|_int_|tcache|arena", s) is not None and "libc" in d) or s.startswith(("mi_", "_mi_"))),
    ("memcpy, memmove, memset", lambda d, s: re.search(r"mem(cpy|move|set|cmp)", s) is not None),
    ("JSON (serde_json)", lambda d, s: "serde_json" in s or "zmij" in s or "itoa" in s),
    ("Avro (apache_avro)", lambda d, s: "apache_avro" in s),
    ("tokio runtime", lambda d, s: "tokio" in s),
    ("metrics", lambda d, s: "metrics" in s),
    ("OpenSSL, libc other", lambda d, s: "libc" in d or "libssl" in d or "libcrypto" in d or "ld-linux" in d),
    ("fraudstream (decode, merge, features, verdicts, pipeline)", lambda d, s: "fraudstream" in s),
    ("Rust std, hashing, formatting", lambda d, s: re.search(r"core::|alloc::|std::|hashbrown|foldhash|rapidhash|fmt", s) is not None),
]

LINE = re.compile(r"^\s*([\d.]+)%\s+(\d+)\s+(\S+)\s+\[(.)\]\s+(.*?)\s*$")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--transactions", type=int, required=True)
    ap.add_argument("--frequency", type=int, default=999)
    ap.add_argument("--out")
    args = ap.parse_args()
    report = subprocess.run(
        ["perf", "report", "-i", args.data, "--stdio", "--no-children", "--sort", "dso,sym",
         "-g", "none", "--percent-limit", "0", "--show-nr-samples"],
        capture_output=True, text=True, check=True).stdout
    by_component, by_symbol, other = Counter(), Counter(), Counter()
    total = 0
    for line in report.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        samples, dso, sym = int(m.group(2)), m.group(3), m.group(5)
        total += samples
        name = next((c for c, test in COMPONENTS if test(dso, sym)), "other")
        by_component[name] += samples
        by_symbol[(sym[:90], dso)] += samples
        if name == "other":
            other[(sym[:90], dso)] += samples
    if not total:
        sys.exit(f"no samples in {args.data}")
    per_tx = lambda s: s / args.frequency / args.transactions * 1e6
    lines = [
        f"{total:,} samples at {args.frequency} Hz = {total / args.frequency:.1f} CPU-s for "
        f"{args.transactions:,} transactions: {per_tx(total):.1f} CPU-µs per transaction "
        "(with whatever navigation events and repartition hop the run had)",
        "",
        "| component | share | CPU-µs per transaction |",
        "|---|---|---|",
    ]
    for name, s in by_component.most_common():
        lines.append(f"| {name} | {100 * s / total:.1f} % | {per_tx(s):.1f} |")
    lines += ["", "Top symbols:", "", "| symbol | library | share |", "|---|---|---|"]
    for (sym, dso), s in by_symbol.most_common(25):
        lines.append(f"| `{sym}` | {dso} | {100 * s / total:.1f} % |")
    if other:
        lines += ["", "Largest unclassified: " + ", ".join(
            f"`{sym}` ({100 * s / total:.1f} %)" for (sym, _), s in other.most_common(8))]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
