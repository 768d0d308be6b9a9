"""The HTTP scoring service that fraudstream replaces, as such services are commonly built: a
stateless FastAPI app behind gunicorn with uvicorn workers, one ONNX Runtime session per worker,
`POST /predict` with a transaction's 30 passthrough features as JSON, answering its score.

It serves the model named by the manifest in $FRAUDSTREAM_MODEL (default
models/ulb-xgb.manifest.json): the ONNX file beside it, its input and output names, its output
column, and the order of the features (the manifest's `feature_sources`: Time, V1..V28,
Amount), so it scores exactly what fraudstream scores with that model.

Run by bench/peers/http/run; by hand:
    FRAUDSTREAM_MODEL=models/ulb-xgb.manifest.json gunicorn -w 2 \
        -k uvicorn_worker.UvicornWorker --chdir bench/peers/http app:app
"""

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import create_model

REPO = Path(__file__).resolve().parents[3]
MANIFEST_PATH = Path(os.environ.get("FRAUDSTREAM_MODEL", REPO / "models/ulb-xgb.manifest.json"))
MANIFEST = json.loads(MANIFEST_PATH.read_text())
FEATURES = MANIFEST["feature_sources"]


def load_session():
    """One thread per session: gunicorn runs one worker per core, so a second ONNX Runtime
    thread in each would only contend with the other workers."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(MANIFEST_PATH.parent / MANIFEST["onnx"]), options,
                                providers=["CPUExecutionProvider"])


SESSION = load_session()

# The request body, one required number per feature, built from the manifest so that the
# field order is the model's input order and a missing or non-numeric feature is a 422.
Transaction = create_model("Transaction", **{name: (float, ...) for name in FEATURES})

app = FastAPI(title="HTTP fraud scorer (benchmark peer)")


@app.get("/health")
async def health():
    return {"model_version": MANIFEST["model_version"]}


@app.post("/predict")
async def predict(tx: Transaction):
    """Scored inline on the event loop (`async def`): one row takes tens of microseconds, less
    than the hop to FastAPI's thread pool that a plain `def` endpoint would cost."""
    row = np.array([[getattr(tx, name) for name in FEATURES]], dtype=np.float32)
    (probabilities,) = SESSION.run([MANIFEST["output"]], {MANIFEST["input"]: row})
    return {"score": float(probabilities[0, MANIFEST["output_column"]]),
            "model_version": MANIFEST["model_version"]}
