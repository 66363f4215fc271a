"""A contract-carrying ONNX model with no training: probability = mean grey level / 255.

For tests and benchmarks where the model's cost must be negligible or its output must be
computable independently. Never a screening model.
"""

from __future__ import annotations

from pathlib import Path

from covidct.engine.contract import Contract

from covidct.engine.contract import embed_contract


def tiny_model(path: Path, image_size=(64, 64), threshold=0.5, contract: Contract | None = None,
               with_contract: bool = True) -> Path:
    import onnx
    from onnx import TensorProto, helper

    h, w = image_size
    nodes = [
        helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["f"], ["m"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["m", "shape"], ["r"]),
        helper.make_node("Mul", ["r", "scale"], ["probability"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", h, w, 1])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
        initializer=[helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 1]),
                     helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / 255.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if with_contract:
        embed_contract(model, contract or Contract(image_size=tuple(image_size), class_names=("neg", "pos"),
                                                   positive_class="pos", threshold=threshold))
    onnx.save(model, path)
    return path
