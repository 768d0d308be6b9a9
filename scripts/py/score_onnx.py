"""Scores the ULB sample with Python's onnxruntime and prints the fraud probabilities as a
JSON list: the reference the Rust scorer is checked against (tests/parity.rs)."""

import json
import sys

import numpy as np
import onnxruntime as ort
import pandas as pd

COLUMNS = ["Time"] + [f"V{i}" for i in range(1, 29)] + ["Amount"]


def main():
    model, sample = sys.argv[1], sys.argv[2]
    # round_trip: correctly rounded text -> float64, then -> float32, as Rust parses.
    df = pd.read_csv(sample, float_precision="round_trip")
    x = df[COLUMNS].to_numpy(dtype=np.float64).astype(np.float32)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    p = sess.run(["probabilities"], {"input": x})[0][:, 1]
    json.dump([float(v) for v in p], sys.stdout)


if __name__ == "__main__":
    main()
