"""ONNX Runtime inference on uint8 batches, with the provider actually in use reported."""

from __future__ import annotations

import logging
import time

import numpy as np

from .contract import Contract, contract_from_metadata

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class ModelError(RuntimeError):
    """The model cannot be loaded or used; raised before any work starts."""


def cuda_available() -> bool:
    """True when ONNX Runtime was built with CUDA *and* this machine has an NVIDIA device.

    ``get_available_providers()`` lists CUDA for the onnxruntime-gpu wheel even on a machine
    without a GPU (and the session then falls back to the CPU, noisily), so look for a device
    too; the session's own provider list is still what gets reported.
    """
    import glob

    import onnxruntime as ort

    return CUDA in ort.get_available_providers() and bool(glob.glob("/dev/nvidia[0-9]*"))


def make_session(model_path: str, threads: int, device: str = "auto"):
    """An InferenceSession with ``threads`` intra-op threads; returns (session, provider in use).

    ``device``: "auto" (CUDA when a GPU answers, else CPU), "cuda" (fail if no GPU), "cpu".
    Spinning is off: idle inference threads yield their core to the decode tasks beside them
    instead of burning it while they wait for the next batch.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    providers = [CPU]
    if device in ("auto", "cuda") and cuda_available():
        try:
            ort.preload_dlls()  # CUDA/cuDNN libraries installed from pip (nvidia-* wheels)
        except Exception as e:  # missing libraries: CUDA will fail below and we fall back or raise
            log.debug("preload_dlls: %s", e)
        providers = [(CUDA, {"device_id": 0}), CPU]
    try:  # a path, or the bytes of the file (engine.runtimes.load hashed them)
        session = ort.InferenceSession(model_path if isinstance(model_path, bytes) else str(model_path), opts,
                                       providers=providers)
    except Exception as e:
        name = "the model" if isinstance(model_path, bytes) else model_path
        raise ModelError(f"cannot load {name} with {providers}: {e}") from None
    in_use = session.get_providers()[0]
    if device == "cuda" and in_use != CUDA:
        raise ModelError("--device cuda was asked for but ONNX Runtime fell back to the CPU "
                         "(no GPU, or CUDA/cuDNN libraries missing: pip install 'onnxruntime-gpu[cuda,cudnn]')")
    return session, in_use


class Predictor:
    """Loads the model once; maps a uint8 (N, H, W, 1) batch to N probabilities.

    ``runtime``/``precision``: what ``engine.runtimes.choose`` decided for the run (``model_path`` is
    already the file of that precision)."""

    def __init__(self, model_path: str, threads: int, device: str = "auto", runtime: str = "onnxruntime",
                 precision: str = "fp32", expected_sha256: str | None = None):
        from .runtimes import load

        self.backend = load(model_path, runtime, precision, threads, device, expected_sha256)
        self.provider = self.backend.device
        self.runtime, self.precision = runtime, precision
        self.contract: Contract = contract_from_metadata(self.backend.metadata, source=str(model_path))
        c = self.contract
        self.backend.run(np.zeros((1, c.height, c.width, c.channels), np.uint8))  # warm

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        """Probabilities of the positive class, and the batch's inference seconds."""
        t = time.perf_counter()
        out = self.backend.run(images)
        return out.astype(np.float32), time.perf_counter() - t
