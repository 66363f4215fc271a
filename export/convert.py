"""Keras to ONNX through tf2onnx, with the preprocessing contract embedded in the model."""

from __future__ import annotations

import logging

from covidct.engine.contract import Contract, embed_contract

log = logging.getLogger(__name__)

#: Opset 17 is supported by every onnxruntime >= 1.14 the engine may meet on a cluster node.
OPSET = 17
BATCH_AXIS = "batch"


def keras_to_onnx(model, contract: Contract, opset: int = OPSET):
    """Convert a Keras model to an ONNX ModelProto taking uint8 NHWC images.

    ``tf2onnx.convert.from_keras`` breaks on Keras 3 (``KeyError: 'keras_tensor_N'``), so we
    convert a tf.function with an explicit input signature, as Keras' own ONNX export does.
    The cast to float happens in the graph; the model's first layer rescales to [0, 1].
    """
    import tensorflow as tf
    import tf2onnx

    spec = tf.TensorSpec([None, contract.height, contract.width, contract.channels], tf.uint8,
                         name=contract.input_name)

    @tf.function(input_signature=[spec])
    def serve(image):
        return {contract.output_name: model(tf.cast(image, tf.float32), training=False)}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=[spec], opset=opset)
    for value in list(proto.graph.input) + list(proto.graph.output):
        dim0 = value.type.tensor_type.shape.dim[0]
        dim0.ClearField("dim_value")
        dim0.dim_param = BATCH_AXIS  # tf2onnx names it unk__N; a stable name helps readers
    embed_contract(proto, contract)
    return proto
