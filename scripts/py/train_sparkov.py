"""Train the Sparkov model on fraudstream's own stateful features and export it to ONNX.

Inputs are training tables written by `fraudstream replay` (the scorer's online feature
code; CSV columns transaction_id, event_time_ms, label, <feature names...>):

    TRAIN_TABLE   replay of sparkov_train only (the train period)
    TEST_TABLE    replay of sparkov_train + sparkov_test together, so that each customer's
                  history from the train period is in the state when the test period starts,
                  as it would be online; only its rows at or after the test period's first
                  event time (min unix_time of sparkov_test) are used, for evaluation only.

Features: every feature column of the table, in table order, except the global-table features
(*_fraud_labels, *_blocklisted: no labels or blocklists are fed during replay) and the
session_* features (Sparkov has no navigation events); those are constant here.

Split of the train period by event time, never shuffled:
    first ~85 % of the period   train       (fit the trees)
    last  ~15 % of the period   validation  (hyper-parameter choice, early stopping, thresholds)
The test period (sparkov_test) is only measured; nothing is chosen on it.

Writes, into the output directory:
    sparkov-xgb.onnx             the model (input "input" float[N,F], output "probabilities")
    sparkov-xgb.manifest.json    version, ordered feature names, thresholds, metrics
    sparkov-xgb.metrics.md       the metrics tables that models/README.md quotes
    sparkov-xgb-pr.png           precision-recall curve on the test period
    sparkov-xgb-scores.png       score histogram on the test period (log y, fraud vs legit)
"""

import argparse
import datetime as dt
import json
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import xgboost as xgb
from onnxmltools import convert_xgboost
from onnxmltools.convert.common.data_types import FloatTensorType
from sklearn.metrics import average_precision_score, roc_auc_score

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evaluate import plots, sha256, test_metrics  # noqa: E402

SEED = 20261122
NAME = "sparkov-xgb"
VERSION = "sparkov-xgb-v1"
REGISTRY_VERSION = 3
META = ["transaction_id", "event_time_ms", "label"]
VALIDATION_SHARE = 0.15
# A few candidates, chosen on validation PR-AUC; each with early stopping (<= 300 trees).
CANDIDATES = [
    {"max_depth": 6, "learning_rate": 0.1, "subsample": 0.8, "colsample_bytree": 0.8, "min_child_weight": 1},
    {"max_depth": 8, "learning_rate": 0.1, "subsample": 0.8, "colsample_bytree": 0.8, "min_child_weight": 5},
    {"max_depth": 4, "learning_rate": 0.1, "subsample": 0.8, "colsample_bytree": 0.8, "min_child_weight": 1},
]
MAX_TREES = int(os.environ.get("SPARKOV_MAX_TREES", 300))
EARLY_STOP = 30


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def iso(ms):
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def model_features(columns):
    feats = [c for c in columns if c not in META]
    return [c for c in feats
            if not (c.endswith("_fraud_labels") or c.endswith("_blocklisted") or c.startswith("session_"))]


def read_table(path, features=None):
    head = pd.read_csv(path, nrows=0).columns.tolist()
    feats = features or model_features(head)
    missing = [c for c in feats if c not in head]
    if missing:
        raise SystemExit(f"{path}: missing feature columns {missing}")
    dtypes = {c: np.float32 for c in feats}
    dtypes.update(transaction_id=str, event_time_ms=np.int64, label=np.int8)
    df = pd.read_csv(path, usecols=META + feats, dtype=dtypes)
    return df, feats


def decline_threshold(y, p, min_precision=0.9):
    """The ULB rule, vectorised: walking down from the highest validation score, the lowest
    threshold of the first run of thresholds whose precision is >= min_precision."""
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    tp = np.cumsum(ys)
    # Last position of each distinct score (ties flag together).
    last = np.r_[np.nonzero(ps[1:] != ps[:-1])[0], len(ps) - 1]
    prec = tp[last] / (last + 1)
    ok = prec >= min_precision
    if not ok.any():
        return None
    first = int(np.argmax(ok))
    end = first
    while end + 1 < len(ok) and ok[end + 1]:
        end += 1
    return float(ps[last[end]])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("train_table", help="replay table of sparkov_train")
    ap.add_argument("test_table", help="replay table of sparkov_train + sparkov_test (test-period rows are used)")
    ap.add_argument("--train-source", required=True, help="sparkov_train.csv.xz (sha256 in the manifest)")
    ap.add_argument("--test-source", required=True, help="sparkov_test.csv.xz (sha256; its min unix_time starts the test period)")
    ap.add_argument("--out", default="models", help="output directory")
    args = ap.parse_args()
    t_start = time.time()

    test_start_ms = int(pd.read_csv(args.test_source, usecols=["unix_time"])["unix_time"].min()) * 1000
    log(f"test period starts at {iso(test_start_ms)} ({test_start_ms} ms)")

    tr, feats = read_table(args.train_table)
    full, _ = read_table(args.test_table, feats)
    tr = tr.sort_values("event_time_ms", kind="stable").reset_index(drop=True)
    full = full.sort_values("event_time_ms", kind="stable").reset_index(drop=True)
    if tr["event_time_ms"].max() >= test_start_ms:
        raise SystemExit("train table reaches into the test period")
    te = full[full["event_time_ms"] >= test_start_ms].reset_index(drop=True)
    log(f"features ({len(feats)}): {', '.join(feats)}")

    # The train-period rows of the combined replay must equal the train-only replay (the
    # replay is causal): a check that the test rows' state is the online one.
    before = full[full["event_time_ms"] < test_start_ms]
    causal = None
    if len(before) == len(tr):
        a = tr.set_index("transaction_id")[feats]
        b = before.set_index("transaction_id")[feats].reindex(a.index)
        d = np.abs(a.to_numpy() - b.to_numpy())
        causal = float(np.nanmax(d)) if np.isfinite(d).any() else float("nan")
        log(f"train-period rows of the combined replay vs the train-only replay: max |diff| {causal:.3g}")
    else:
        log(f"warning: combined replay has {len(before)} train-period rows, train replay {len(tr)}")
    del before, full

    t_min, t_max = int(tr["event_time_ms"].min()), int(tr["event_time_ms"].max())
    t_val = t_min + int((1 - VALIDATION_SHARE) * (t_max - t_min))
    is_val = tr["event_time_ms"].to_numpy() >= t_val
    X = tr[feats].to_numpy(dtype=np.float32)
    y = tr["label"].astype(int).to_numpy()
    Xtr, ytr, Xva, yva = X[~is_val], y[~is_val], X[is_val], y[is_val]
    Xte, yte = te[feats].to_numpy(dtype=np.float32), te["label"].astype(int).to_numpy()
    log(f"rows: train {len(ytr)} ({ytr.sum()} fraud), validation {len(yva)} ({yva.sum()} fraud), "
        f"test {len(yte)} ({yte.sum()} fraud)")
    constant = [f for f, s in zip(feats, X.std(axis=0)) if s == 0]
    if constant:
        log(f"constant in the train period (kept, unused by the trees): {', '.join(constant)}")

    # Hyper-parameter candidates, each with early stopping on validation PR-AUC.
    tried = []
    for cand in CANDIDATES:
        t0 = time.time()
        m = xgb.XGBClassifier(n_estimators=MAX_TREES, eval_metric="aucpr", early_stopping_rounds=EARLY_STOP,
                              tree_method="hist", n_jobs=2, random_state=SEED, **cand)
        m.fit(Xtr, ytr, eval_set=[(Xva, yva)], verbose=False)
        best = m.best_iteration + 1
        pva = m.predict_proba(Xva, iteration_range=(0, best))[:, 1]
        score = float(average_precision_score(yva, pva))
        tried.append({"params": cand, "trees": best, "validation_pr_auc": score, "seconds": round(time.time() - t0, 1)})
        log(f"candidate {cand}: {best} trees, validation PR-AUC {score:.4f}, {time.time() - t0:.0f} s")
    chosen = max(tried, key=lambda r: r["validation_pr_auc"])
    best, params = chosen["trees"], chosen["params"]

    # Refit with the chosen number of trees so the exported model has no unused trees.
    t0 = time.time()
    model = xgb.XGBClassifier(n_estimators=best, eval_metric="aucpr", tree_method="hist", n_jobs=2,
                              random_state=SEED, **params)
    model.fit(Xtr, ytr, verbose=False)
    log(f"final fit: {best} trees, {time.time() - t0:.0f} s")

    pva = model.predict_proba(Xva)[:, 1]
    # Review the top 0.5 % of the validation period; decline where validation precision >= 90 %.
    review = float(np.quantile(pva, 1 - 0.005))
    decline = decline_threshold(yva, pva, 0.9)
    decline_from = "rule"
    if decline is None or decline < review:
        # As in train_ulb.py: the decline band must lie inside the review band.
        log(f"decline by the precision rule = {decline}, below review {review:.4f}: using max(review, 0.9)")
        decline, decline_from = max(review, 0.9), f"fallback max(review, 0.9); the precision rule gave {decline}"

    os.makedirs(args.out, exist_ok=True)
    onnx_path = os.path.join(args.out, f"{NAME}.onnx")
    onx = convert_xgboost(model, initial_types=[("input", FloatTensorType([None, len(feats)]))], target_opset=15)
    onnx.save_model(onx, onnx_path)

    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in sess.get_outputs()]
    assert "probabilities" in outputs, outputs
    pte = sess.run(["probabilities"], {"input": Xte})[0][:, 1]
    drift = float(np.max(np.abs(pte - model.predict_proba(Xte)[:, 1])))
    log(f"max |onnx - xgboost| on the test period ({len(yte)} rows): {drift:.2e}")
    assert drift < 1e-5, drift

    test = test_metrics(yte, pte, review, decline)
    validation = {
        "roc_auc": float(roc_auc_score(yva, pva)),
        "pr_auc": float(average_precision_score(yva, pva)),
        "rows": int(len(yva)),
        "frauds": int(yva.sum()),
    }
    te_min, te_max = int(te["event_time_ms"].min()), int(te["event_time_ms"].max())
    train_seconds = round(sum(r["seconds"] for r in tried) + (time.time() - t0), 1)
    manifest = {
        "model_version": VERSION,
        "onnx": f"{NAME}.onnx",
        "onnx_sha256": sha256(onnx_path),
        "input": "input",
        "output": "probabilities",
        "output_column": 1,
        "features": feats,
        "registry_version": REGISTRY_VERSION,
        "thresholds": {"review": review, "decline": decline},
        "training": {
            "data": "Sparkov synthetic card transactions (sparkov_train.csv.xz), features from `fraudstream replay --partitions 1`",
            "data_sha256": sha256(args.train_source),
            "test_data_sha256": sha256(args.test_source),
            "data_range": {
                "train": [iso(t_min), iso(t_val - 1)],
                "validation": [iso(t_val), iso(t_max)],
                "test": [iso(te_min), iso(te_max)],
            },
            "split": (f"train period by event time: train [start, {100 * (1 - VALIDATION_SHARE):.0f}% of the period), "
                      f"validation [{100 * (1 - VALIDATION_SHARE):.0f}%, end]; test = sparkov_test period, "
                      "replayed after the train period (state carried over)"),
            "algorithm": f"xgboost {xgb.__version__} XGBClassifier (hist)",
            "trees": best,
            "params": {k: params[k] for k in ("max_depth", "learning_rate", "subsample", "colsample_bytree", "min_child_weight")},
            "candidates": tried,
            "threshold_rule": "review = top 0.5 % of validation scores; decline = lowest score with validation precision >= 0.9",
            "decline_from": decline_from,
            "train_seconds": train_seconds,
            "onnx_max_abs_diff_test": drift,
            "replay_causality_max_abs_diff": causal,
            "trained_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "metrics": {"validation": validation, "test": test},
    }
    with open(os.path.join(args.out, f"{NAME}.manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")

    with open(os.path.join(args.out, f"{NAME}.metrics.md"), "w") as f:
        f.write("| period | rows | frauds | ROC-AUC | PR-AUC |\n|---|---|---|---|---|\n")
        f.write(f"| validation (choices made here) | {validation['rows']} | {validation['frauds']} | "
                f"{validation['roc_auc']:.4f} | {validation['pr_auc']:.4f} |\n")
        f.write(f"| test (held out, sparkov_test period) | {test['rows']} | {test['frauds']} | "
                f"{test['roc_auc']:.4f} | {test['pr_auc']:.4f} |\n\n")
        f.write("| decision on the test period | threshold | flagged | precision | recall |\n|---|---|---|---|---|\n")
        for name in ("review", "decline"):
            r = test[f"at_{name}"]
            f.write(f"| {name} (score >= threshold) | {r['threshold']:.4f} | {100 * r['flagged_rate']:.3f} % | "
                    f"{r['precision']:.3f} | {r['recall']:.3f} |\n")
        f.write("\n| review rate on the test period (top scores) | flagged | precision | recall |\n|---|---|---|---|\n")
        for r in test["at_review_rate"].values():
            f.write(f"| {100 * r['rate']:g} % | {r['flagged']} | {r['precision']:.3f} | {r['recall']:.3f} |\n")

    plots(yte, pte, os.path.join(args.out, NAME), "sparkov-xgb, Sparkov test period",
          {"review": review, "decline": decline})
    log(f"total {time.time() - t_start:.0f} s")
    print(json.dumps({"test": test, "thresholds": manifest["thresholds"], "trees": best,
                      "train_seconds": train_seconds}, indent=2))


if __name__ == "__main__":
    main()
