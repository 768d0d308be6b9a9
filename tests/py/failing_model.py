"""Writes an ONNX model that loads and passes fraudstream's checks (float input [N, WIDTH]
named "input", an output named "probabilities") but fails on every run: it reshapes the
N * WIDTH input values into a fixed [3, 3, 3], which no batch fills. For the degraded-mode test.

    python tests/py/failing_model.py OUT.onnx WIDTH
"""

import sys

import onnx
from onnx import TensorProto, helper


def main():
    out, width = sys.argv[1], int(sys.argv[2])
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [3, 3, 3])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["probabilities"])],
        "fails-at-run-time",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, None)],
        [shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save_model(model, out)


if __name__ == "__main__":
    main()
