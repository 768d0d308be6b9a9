"""ONNX Runtime tuning for the default model: time per row by batch size, intra-op threads and
graph optimization level, on real feature rows (the committed Sparkov sample replayed through
fraudstream's feature code), with the same ONNX Runtime release the scorer loads (1.31.1).

Wall time and process CPU time per row are both reported: a setting that only spreads the
same work over more threads lowers the first, not the second, and on a machine whose cores
are busy with other partitions only the second counts.

    bench/ort_tuning.py --rows FILE.csv [--model models/sparkov-xgb.onnx] [--out FILE.md]

`bench/ort-tuning` replays the sample and runs this; see bench/README.md.
"""

import argparse
import json
import os
import time

import numpy as np
import onnxruntime as ort
import pandas as pd


def session(model, threads, level):
    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.graph_optimization_level = level
    # The scorer never lets threads spin: the cores belong to other partitions too.
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, o, providers=["CPUExecutionProvider"])


def measure(sess, x, batch, seconds=2.0):
    """Per-row wall and CPU microseconds scoring `x` in batches of `batch`, repeated for
    about `seconds`."""
    n = len(x) - len(x) % batch
    chunks = [x[i : i + batch] for i in range(0, n, batch)]
    for c in chunks[:20]:
        sess.run(None, {"input": c})
    rows, w0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - w0 < seconds:
        for c in chunks:
            sess.run(None, {"input": c})
        rows += n
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return 1e6 * wall / rows, 1e6 * cpu / rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", required=True, help="`fraudstream replay` CSV")
    ap.add_argument("--model", default="models/sparkov-xgb.onnx")
    ap.add_argument("--manifest", default="models/sparkov-xgb.manifest.json")
    ap.add_argument("--out")
    a = ap.parse_args()
    features = json.load(open(a.manifest))["features"]
    x = pd.read_csv(a.rows)[features].to_numpy(dtype=np.float32)
    levels = {
        "all (scorer)": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    lines = [
        f"ONNX Runtime {ort.__version__}, `{os.path.basename(a.model)}`, {len(x):,} feature rows "
        "of the replayed sample; µs per row (wall / process CPU).",
        "",
        "| batch | 1 thread, optimization all (the scorer) | 2 threads | optimization basic | none |",
        "|---|---|---|---|---|",
    ]
    sessions = {
        "1": session(a.model, 1, levels["all (scorer)"]),
        "2": session(a.model, 2, levels["all (scorer)"]),
        "basic": session(a.model, 1, levels["basic"]),
        "none": session(a.model, 1, levels["none"]),
    }
    for batch in [1, 8, 64, 256, 1000]:
        cells = []
        for s in sessions.values():
            wall, cpu = measure(s, x, batch)
            cells.append(f"{wall:.2f} / {cpu:.2f}")
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        open(a.out, "w").write(text)


if __name__ == "__main__":
    main()
