"""Static INT8 (QDQ) quantization with ONNX Runtime, calibrated on training images."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from covidct.engine.contract import Contract

from covidct.engine.contract import embed_contract

log = logging.getLogger(__name__)


class _Reader:
    """CalibrationDataReader over uint8 batches."""

    def __init__(self, images: np.ndarray, input_name: str, batch: int = 8):
        self._batches = iter([{input_name: images[i:i + batch]} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self._batches, None)


def quantize_int8(fp32_proto, calibration: np.ndarray, contract: Contract):
    """Return (int8 ModelProto, int8 contract): QDQ, per-channel int8 weights, uint8 activations.

    ``reduce_range`` (7-bit weights): without VNNI, x86 int8 kernels multiply u8 x s8 pairs into
    saturating 16-bit sums; full-range weights overflow them. Measured on the real subset with
    the trained model: label agreement with FP32 99.8% with it, 92.3% without.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(fp32_proto, src)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), _Reader(calibration, contract.input_name),
                        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax)
        proto = onnx.load(dst)
    int8_contract = dataclasses.replace(contract, precision="int8")
    embed_contract(proto, int8_contract)
    return proto, int8_contract


def throughput(model_bytes: bytes, images: np.ndarray, input_name: str, batch: int = 32, repeats: int = 3) -> float:
    """Images per second of one CPU session on ``images`` (best of ``repeats`` passes)."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    x = images[:batch]
    session.run(None, {input_name: x})  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, {input_name: x})
        best = min(best, time.perf_counter() - t)
    return len(x) / best
