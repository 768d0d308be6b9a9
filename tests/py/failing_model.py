"""Writes ONNX models that load and pass fraudstream's checks (float input [N, WIDTH] named
"input", an output named "probabilities") but cannot serve, for the degraded-mode tests:

- `failing`: fails on every run: it reshapes the N * WIDTH input values into a fixed
  [3, 3, 3], which no batch fills;
- `slow`: answers [N, 2] probabilities of 0.5, but only after LAYERS multiplications by a
  512 x 512 matrix per row (tens of milliseconds a row on one core).

    python tests/py/failing_model.py failing|slow OUT.onnx WIDTH
"""

import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LAYERS = 4000
SIDE = 512


def failing(width):
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [3, 3, 3])
    return helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["probabilities"])],
        "fails-at-run-time",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, None)],
        [shape],
    )


def slow(width):
    rng = np.random.default_rng(7)
    # Orthogonal, so the values neither vanish nor blow up through the layers.
    q, _ = np.linalg.qr(rng.standard_normal((SIDE, SIDE)))
    inits = [
        numpy_helper.from_array(rng.standard_normal((width, SIDE)).astype(np.float32) / width, "w_in"),
        numpy_helper.from_array(q.astype(np.float32), "w"),
        numpy_helper.from_array(np.zeros((SIDE, 2), dtype=np.float32), "w_out"),
        numpy_helper.from_array(np.array([0.0, 0.0], dtype=np.float32), "logit"),
    ]
    nodes = [helper.make_node("MatMul", ["input", "w_in"], ["h0"])]
    for i in range(LAYERS):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]))
    nodes += [
        helper.make_node("MatMul", [f"h{LAYERS}", "w_out"], ["z"]),
        helper.make_node("Add", ["z", "logit"], ["zl"]),
        helper.make_node("Softmax", ["zl"], ["probabilities"], axis=1),
    ]
    return helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])],
        inits,
    )


def main():
    kind, out, width = sys.argv[1], sys.argv[2], int(sys.argv[3])
    graph = {"failing": failing, "slow": slow}[kind](width)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save_model(model, out)


if __name__ == "__main__":
    main()
