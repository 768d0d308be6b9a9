"""Train the first fraudstream model on the ULB credit-card data and export it to ONNX.

The 30 columns Time, V1..V28, Amount become the transaction's passthrough `features`
vector, in that order. The data is split by time, never shuffled:

    first 64 %  train        (fit the trees)
    next  16 %  validation   (early stopping, decision thresholds)
    last  20 %  test         (reported metrics only; nothing is chosen on it)

Writes, into the output directory:
    ulb-xgb.onnx                 the model (input "input" float[N,30], output "probabilities")
    ulb-xgb.manifest.json        version, ordered feature names, thresholds, metrics
    ulb-xgb.metrics.md           the metrics table that models/README.md quotes
and, into the sample directory, a small held-out sample for the demo and tests.
"""

import argparse
import datetime as dt
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import xgboost as xgb
from onnxmltools import convert_xgboost
from onnxmltools.convert.common.data_types import FloatTensorType
from sklearn.metrics import average_precision_score, roc_auc_score

from evaluate import at_threshold, sha256

COLUMNS = ["Time"] + [f"V{i}" for i in range(1, 29)] + ["Amount"]
SEED = 20261122


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="path to creditcard.csv.gz (ULB), e.g. ../shared/data/ulb-creditcard/creditcard.csv.gz")
    ap.add_argument("--out", default="models", help="output directory for the model and manifest")
    ap.add_argument("--sample-out", default="tests/data", help="where to write the held-out demo sample")
    ap.add_argument("--sample-legit", type=int, default=3000, help="legitimate rows in the demo sample")
    args = ap.parse_args()

    df = pd.read_csv(args.data)
    df = df.sort_values("Time", kind="stable").reset_index(drop=True)
    n = len(df)
    i_val, i_test = int(n * 0.64), int(n * 0.80)
    X = df[COLUMNS].to_numpy(dtype=np.float32)
    y = df["Class"].astype(int).to_numpy()
    Xtr, ytr = X[:i_val], y[:i_val]
    Xva, yva = X[i_val:i_test], y[i_val:i_test]
    Xte, yte = X[i_test:], y[i_test:]
    print(f"rows: train {len(ytr)} ({ytr.sum()} fraud), validation {len(yva)} ({yva.sum()} fraud), "
          f"test {len(yte)} ({yte.sum()} fraud)", file=sys.stderr)

    # onnxmltools maps XGBoost features by the names f0..fN.
    model = xgb.XGBClassifier(
        n_estimators=400,
        max_depth=4,
        learning_rate=0.05,
        subsample=0.8,
        colsample_bytree=0.8,
        min_child_weight=1,
        eval_metric="aucpr",
        early_stopping_rounds=40,
        tree_method="hist",
        n_jobs=2,
        random_state=SEED,
    )
    model.fit(Xtr, ytr, eval_set=[(Xva, yva)], verbose=False)
    best = model.best_iteration + 1
    print(f"best iteration: {best}", file=sys.stderr)
    # Refit with the chosen number of trees so the exported model has no unused trees.
    params = model.get_params()
    params.update(n_estimators=best, early_stopping_rounds=None)
    model = xgb.XGBClassifier(**params)
    model.fit(Xtr, ytr, verbose=False)

    pva = model.predict_proba(Xva)[:, 1]
    # Review the top 0.5 % of the validation period; decline where validation precision >= 90 %.
    review = float(np.quantile(pva, 1 - 0.005))
    decline = None
    for t in np.unique(pva)[::-1]:
        r = at_threshold(yva, pva, t)
        if r["precision"] >= 0.9:
            decline = float(t)
        elif decline is not None:
            break
    if decline is None or decline < review:
        decline = max(review, 0.9)

    os.makedirs(args.out, exist_ok=True)
    onnx_path = os.path.join(args.out, "ulb-xgb.onnx")
    onx = convert_xgboost(model, initial_types=[("input", FloatTensorType([None, len(COLUMNS)]))], target_opset=15)
    onnx.save_model(onx, onnx_path)

    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in sess.get_outputs()]
    assert "probabilities" in outputs, outputs
    pte = sess.run(["probabilities"], {"input": Xte})[0][:, 1]
    drift = float(np.max(np.abs(pte - model.predict_proba(Xte)[:, 1])))
    print(f"max |onnx - xgboost| on test: {drift:.2e}", file=sys.stderr)
    assert drift < 1e-4, drift

    test = {
        "roc_auc": float(roc_auc_score(yte, pte)),
        "pr_auc": float(average_precision_score(yte, pte)),
        "at_review": at_threshold(yte, pte, review),
        "at_decline": at_threshold(yte, pte, decline),
        "rows": int(len(yte)),
        "frauds": int(yte.sum()),
    }
    validation = {
        "roc_auc": float(roc_auc_score(yva, pva)),
        "pr_auc": float(average_precision_score(yva, pva)),
        "rows": int(len(yva)),
        "frauds": int(yva.sum()),
    }
    manifest = {
        "model_version": "ulb-xgb-v1",
        "onnx": "ulb-xgb.onnx",
        "onnx_sha256": sha256(onnx_path),
        "input": "input",
        "output": "probabilities",
        "output_column": 1,
        "features": [f"features[{i}]" for i in range(len(COLUMNS))],
        "feature_sources": COLUMNS,
        "thresholds": {"review": review, "decline": decline},
        "training": {
            "data": "ULB credit-card fraud (creditcard.csv.gz), Time-ordered",
            "data_sha256": sha256(args.data),
            "split": "train rows [0, 64%), validation [64%, 80%), test [80%, 100%) by Time",
            "algorithm": f"xgboost {xgb.__version__} XGBClassifier",
            "trees": best,
            "params": {k: params[k] for k in ("max_depth", "learning_rate", "subsample", "colsample_bytree")},
            "threshold_rule": "review = top 0.5 % of validation scores; decline = lowest score with validation precision >= 0.9",
            "trained_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "metrics": {"validation": validation, "test": test},
    }
    with open(os.path.join(args.out, "ulb-xgb.manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")

    with open(os.path.join(args.out, "ulb-xgb.metrics.md"), "w") as f:
        f.write("| period | rows | frauds | ROC-AUC | PR-AUC |\n|---|---|---|---|---|\n")
        f.write(f"| validation (choices made here) | {validation['rows']} | {validation['frauds']} | "
                f"{validation['roc_auc']:.4f} | {validation['pr_auc']:.4f} |\n")
        f.write(f"| test (held out, last 20 %) | {test['rows']} | {test['frauds']} | "
                f"{test['roc_auc']:.4f} | {test['pr_auc']:.4f} |\n\n")
        f.write("| decision on the test period | threshold | flagged | precision | recall |\n|---|---|---|---|---|\n")
        for name in ("review", "decline"):
            r = test[f"at_{name}"]
            f.write(f"| {name} (score >= threshold) | {r['threshold']:.4f} | {100 * r['flagged_rate']:.3f} % | "
                    f"{r['precision']:.3f} | {r['recall']:.3f} |\n")

    # Demo/test sample: every fraud of the test period plus a random set of legitimate rows,
    # in time order. Fraud is enriched on purpose so the demo shows declines; the README says so.
    test_df = df.iloc[i_test:]
    rng = np.random.default_rng(SEED)
    legit_idx = test_df.index[test_df["Class"] == 0]
    pick = np.sort(np.concatenate([
        test_df.index[test_df["Class"] == 1].to_numpy(),
        rng.choice(legit_idx.to_numpy(), size=args.sample_legit, replace=False),
    ]))
    os.makedirs(args.sample_out, exist_ok=True)
    sample = df.loc[pick, COLUMNS + ["Class"]]
    sample.insert(0, "row", pick)
    sample_path = os.path.join(args.sample_out, "ulb-holdout-sample.csv.gz")
    sample.to_csv(sample_path, index=False, float_format="%.9g", compression={"method": "gzip", "mtime": 0})
    print(json.dumps({"test": test, "thresholds": manifest["thresholds"], "sample": sample_path}, indent=2))


if __name__ == "__main__":
    main()
