"""Test-period metrics and plots shared by the training scripts, and the ULB model's evaluation.

As a library (train_ulb.py, train_sparkov.py): `sha256`, `test_metrics`, `at_threshold`,
`at_rate`, `plots`.
As a command, evaluates the committed ULB model on its own test period (the last 20 % of the
rows by Time, the split of train_ulb.py) and writes models/ulb-xgb-pr.png and
models/ulb-xgb-scores.png:

    python scripts/py/evaluate.py ulb ../shared/data/ulb-creditcard/creditcard.csv.gz
"""

import argparse
import hashlib
import json
import os
import sys

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

REVIEW_RATES = (0.005, 0.01)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def at_threshold(y, p, t):
    flagged = p >= t
    tp = int((flagged & (y == 1)).sum())
    n_flag = int(flagged.sum())
    return {
        "threshold": float(t),
        "flagged_rate": n_flag / len(y),
        "precision": tp / n_flag if n_flag else 0.0,
        "recall": tp / int((y == 1).sum()),
    }


def at_rate(y, p, rate):
    """Precision and recall when the top `rate` of this period's scores are reviewed
    (exactly k = round(rate * n) rows, ties broken by order; a measure, not a threshold)."""
    k = max(1, int(round(rate * len(y))))
    top = np.argsort(-p, kind="stable")[:k]
    tp = int(y[top].sum())
    return {
        "rate": rate,
        "flagged": k,
        "score_at_cut": float(p[top[-1]]),
        "precision": tp / k,
        "recall": tp / int((y == 1).sum()),
    }


def test_metrics(y, p, review, decline):
    """The ULB manifest's test block plus precision/recall at fixed review rates."""
    return {
        "roc_auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        "at_review": at_threshold(y, p, review),
        "at_decline": at_threshold(y, p, decline),
        "at_review_rate": {f"{100 * r:g}%": at_rate(y, p, r) for r in REVIEW_RATES},
        "rows": int(len(y)),
        "frauds": int(y.sum()),
    }


def plots(y, p, prefix, title, thresholds=None):
    """Writes PREFIX-pr.png (precision-recall curve) and PREFIX-scores.png (score histogram,
    log y, fraud vs legit). Returns the two paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prec, rec, _ = precision_recall_curve(y, p)
    ap = average_precision_score(y, p)
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    ax.plot(rec, prec, lw=1.5, label=f"PR-AUC (average precision) {ap:.3f}")
    ax.axhline(y.mean(), color="grey", ls=":", lw=1, label=f"fraud rate {100 * y.mean():.2f} %")
    for r in REVIEW_RATES:
        m = at_rate(y, p, r)
        ax.plot(m["recall"], m["precision"], "o", ms=5, label=f"review top {100 * r:g} %: "
                f"P {m['precision']:.2f}, R {m['recall']:.2f}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{title}: precision-recall", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    pr_path = f"{prefix}-pr.png"
    fig.savefig(pr_path, metadata={"Software": None})
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    bins = np.linspace(0, 1, 51)
    ax.hist(p[y == 0], bins=bins, alpha=0.6, label=f"legit ({int((y == 0).sum()):,})", color="tab:blue")
    ax.hist(p[y == 1], bins=bins, alpha=0.6, label=f"fraud ({int((y == 1).sum()):,})", color="tab:red")
    for name, t in (thresholds or {}).items():
        ax.axvline(t, color="black", ls="--", lw=1)
        ax.text(t, 0.98, f" {name} {t:.3f}", rotation=90, va="top", ha="right", fontsize=8,
                transform=ax.get_xaxis_transform())
    ax.set_yscale("log")
    ax.set_xlabel("fraud score")
    ax.set_ylabel("transactions (log scale)")
    ax.set_title(f"{title}: score distribution", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    sc_path = f"{prefix}-scores.png"
    fig.savefig(sc_path, metadata={"Software": None})
    plt.close(fig)
    return pr_path, sc_path


def ulb(args):
    import onnxruntime as ort
    import pandas as pd

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_ulb import COLUMNS

    with open(os.path.join(args.models, "ulb-xgb.manifest.json")) as f:
        manifest = json.load(f)
    df = pd.read_csv(args.data).sort_values("Time", kind="stable").reset_index(drop=True)
    i_test = int(len(df) * 0.80)  # the split of train_ulb.py
    X = df[COLUMNS].to_numpy(dtype=np.float32)[i_test:]
    y = df["Class"].astype(int).to_numpy()[i_test:]
    sess = ort.InferenceSession(os.path.join(args.models, manifest["onnx"]), providers=["CPUExecutionProvider"])
    p = sess.run([manifest["output"]], {manifest["input"]: X})[0][:, manifest["output_column"]]
    th = manifest["thresholds"]
    m = test_metrics(y, p, th["review"], th["decline"])
    plots(y, p, os.path.join(args.models, "ulb-xgb"), "ulb-xgb, ULB test period (last 20 %)", th)
    print(json.dumps(m, indent=2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("ulb", help="evaluate models/ulb-xgb on the ULB test period, write its PNGs")
    u.add_argument("data", help="creditcard.csv.gz")
    u.add_argument("--models", default="models")
    args = ap.parse_args()
    if args.cmd == "ulb":
        ulb(args)


if __name__ == "__main__":
    main()
