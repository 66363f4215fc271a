"""The model behind one predictor: uint8 batches in, probabilities out, with what runs it reported.

The backends (ONNX Runtime sessions, OpenVINO) live in ``engine.runtimes``; this module only holds
one of them and the contract that came with it."""

from __future__ import annotations

import time

import numpy as np

from .contract import Contract, contract_from_metadata
from .runtimes import CPU, CUDA, ModelError, cuda_available, load, make_session  # noqa: F401  (their old home)


class Predictor:
    """Loads the model once; maps a uint8 (N, H, W, 1) batch to N probabilities.

    ``runtime``/``precision``: what ``engine.runtimes.choose`` decided for the run (``model_path`` is
    already the file of that precision)."""

    def __init__(self, model_path: str, threads: int, device: str = "auto", runtime: str = "onnxruntime",
                 precision: str = "fp32", expected_sha256: str | None = None):
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
