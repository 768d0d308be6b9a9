"""Exports the trees of a model's ONNX file for explanations (src/model/explain.rs).

Reads the TreeEnsembleClassifier of the ONNX file the manifest names (the model the scorer
runs, so the explanation can never describe other trees), gives every split node the mean leaf
weight of the TRAINING rows that reach it (a leaf keeps its weight), checks that the exported
trees reproduce ONNX Runtime's scores, writes `<name>.trees.json` beside the manifest and names
it in the manifest (`explain`, `explain_sha256`).

    python scripts/py/export_trees.py models/sparkov-xgb.manifest.json TRAIN_TABLE.csv

TRAIN_TABLE is a `fraudstream replay` table holding the manifest's features; only rows before
the manifest's validation period (training.data_range.validation[0]) are used.
"""

import argparse
import datetime
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd

from evaluate import sha256


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def trees_of(onnx_path):
    model = onnx.load(onnx_path)
    nodes = [n for n in model.graph.node if n.op_type == "TreeEnsembleClassifier"]
    if len(nodes) != 1:
        sys.exit("expected one TreeEnsembleClassifier node")
    a = {x.name: onnx.helper.get_attribute_value(x) for x in nodes[0].attribute}
    if a.get("post_transform") != b"LOGISTIC" or len(a["base_values"]) != 1 or set(a["class_ids"]) != {0}:
        sys.exit("expected a binary logistic ensemble (XGBoost via onnxmltools)")
    leaf = {(t, n): w for t, n, w in zip(a["class_treeids"], a["class_nodeids"], a["class_weights"])}
    trees = {}
    for i, (t, n) in enumerate(zip(a["nodes_treeids"], a["nodes_nodeids"])):
        trees.setdefault(t, {})[n] = i
    out = []
    for t in sorted(trees):
        ids = trees[t]
        size = max(ids) + 1
        if sorted(ids) != list(range(size)):
            sys.exit(f"tree {t}: node ids are not 0..{size - 1}")
        tree = {"feature": [], "threshold": [], "yes": [], "no": [], "missing_yes": [], "leaf": []}
        for n in range(size):
            i = ids[n]
            mode = a["nodes_modes"][i]
            if mode == b"LEAF":
                tree["feature"].append(-1)
                tree["threshold"].append(0.0)
                tree["yes"].append(0)
                tree["no"].append(0)
                tree["missing_yes"].append(False)
                tree["leaf"].append(float(leaf[(t, n)]))
            elif mode == b"BRANCH_LT":
                tree["feature"].append(int(a["nodes_featureids"][i]))
                tree["threshold"].append(float(np.float32(a["nodes_values"][i])))
                tree["yes"].append(int(a["nodes_truenodeids"][i]))
                tree["no"].append(int(a["nodes_falsenodeids"][i]))
                tree["missing_yes"].append(bool(a["nodes_missing_value_tracks_true"][i]))
                tree["leaf"].append(None)
            else:
                sys.exit(f"tree {t}: unsupported node mode {mode}")
        out.append(tree)
    return float(a["base_values"][0]), out


def route(tree, x, node):
    """One step down for rows at `node` (arrays)."""
    f = np.array(tree["feature"])[node]
    leafish = f < 0
    fx = x[np.arange(len(node)), np.where(leafish, 0, f)]
    thr = np.array(tree["threshold"], dtype=np.float32)[node]
    yes = np.where(np.isnan(fx), np.array(tree["missing_yes"])[node], fx < thr)
    nxt = np.where(yes, np.array(tree["yes"])[node], np.array(tree["no"])[node])
    return np.where(leafish, node, nxt), leafish


def node_values(tree, x):
    """Leaf weight for leaves; mean leaf weight of the rows reaching each split."""
    size = len(tree["feature"])
    leaf_w = np.array([w if w is not None else 0.0 for w in tree["leaf"]])
    node = np.zeros(len(x), dtype=np.int64)
    paths = [node]
    while True:
        node, done = route(tree, x, node)
        if done.all():
            break
        paths.append(node)
    w = leaf_w[node]
    total, count = np.zeros(size), np.zeros(size)
    for p in paths:
        # A row counts once per node on its path (it stays at its leaf once there).
        first = np.ones(len(p), dtype=bool) if p is paths[0] else p != prev
        np.add.at(total, p[first], w[first])
        np.add.at(count, p[first], 1)
        prev = p
    value = [0.0] * size
    for n in reversed(range(size)):  # children have larger ids than their parent
        if tree["feature"][n] < 0:
            value[n] = leaf_w[n]
        elif count[n] > 0:
            value[n] = total[n] / count[n]
        else:  # no training row here: the children's mean
            value[n] = (value[tree["yes"][n]] + value[tree["no"][n]]) / 2
    return value, w


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("manifest")
    ap.add_argument("table")
    args = ap.parse_args()

    with open(args.manifest) as f:
        manifest = json.load(f)
    folder = os.path.dirname(os.path.abspath(args.manifest))
    onnx_path = os.path.join(folder, manifest["onnx"])
    base, trees = trees_of(onnx_path)
    features = manifest["features"]
    log(f"{len(trees)} trees, {sum(len(t['feature']) for t in trees)} nodes, base margin {base}")

    df = pd.read_csv(args.table)
    cut = manifest["training"]["data_range"]["validation"][0]
    cut_ms = int(datetime.datetime.fromisoformat(cut.replace("Z", "+00:00")).timestamp() * 1000)
    df = df[df["event_time_ms"] < cut_ms]
    x = df[features].to_numpy(dtype=np.float64).astype(np.float32)
    log(f"{len(x)} training rows (before {cut})")

    margin = np.full(len(x), base)
    out = []
    for t in trees:
        value, w = node_values(t, x)
        margin += w
        out.append({k: t[k] for k in ("feature", "threshold", "yes", "no", "missing_yes")} | {"value": value})

    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    p = sess.run([manifest["output"]], {manifest["input"]: x})[0][:, manifest["output_column"]]
    drift = float(np.max(np.abs(1 / (1 + np.exp(-margin)) - p)))
    log(f"max |trees - onnxruntime| on the training rows: {drift:.2e}")
    if drift > 1e-5:
        sys.exit("the exported trees do not reproduce the ONNX model")

    name = manifest["onnx"].removesuffix(".onnx") + ".trees.json"
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump({"format": "fraudstream-trees-1", "base_margin": base, "features": features,
                   "node_values": "split: mean leaf weight of the training rows reaching it",
                   "trees": out}, f, separators=(",", ":"))
    manifest["explain"] = name
    manifest["explain_sha256"] = sha256(path)
    with open(args.manifest, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    log(f"wrote {path} and named it in {args.manifest}")


if __name__ == "__main__":
    main()
