"""The Ray side of a run: decode tasks and predictor actors. No driver state, no file writing.

``decode_batch`` reads and decode+resizes a batch of files with the contract's preprocessing
into one uint8 array, plus a small meta row per frame or failed file. Predictor actors
(``PredictorActor``) hold the model (ONNX Runtime or OpenVINO, ``engine.runtimes``) and return the
rows the driver writes. On CPU nodes each predictor decodes its own batches (``screen``: one
process a core, no hand-off); with a GPU, ``decode_batch`` runs as Ray tasks on every CPU and the
GPU predictor takes their arrays from the object store (``predict``). Pixels never reach the driver.
"""

from __future__ import annotations

import os
import time

import numpy as np

from .contract import Contract
from .decode import CORRUPT, DecodeError, decode_inputs, read_file
from .privacy import pseudonymize, redact, shown_path
from .predictor import Predictor
from .rows import Decoded, Row, Status
from .shift import slice_stats


def decode_batch(items: list[tuple[str, int, int, int, int]], spec: dict) -> dict:
    """Ray task: read and decode+resize each file; one uint8 (k, H, W, 1) array for the k frames that decoded.

    ``items`` are (path, size, mtime_ns, key, file_id). Returns ``{"images": array, "meta": [Decoded, ...]}``:
    one row per frame (or per failed file) in input order; rows with status ok map to images in
    order. Paths and messages of DICOM rows carry no identifying header value.
    """
    import cv2

    cv2.setNumThreads(1)  # one Ray CPU per task: OpenCV must not start a pool of its own
    h, w = spec["image_size"]
    images, meta = [], []
    pkey = spec.get("pseudonym_key")
    # under --pseudonymize no raster thumbnail at all: burned-in text can survive the lung crop
    thumbs = "off" if pkey else spec.get("thumbnails", "auto")
    for path, size, mtime_ns, key, file_id in items:
        shown = shown_path(path, pkey)
        t0 = time.perf_counter()
        try:
            data = read_file(path)
            t1 = time.perf_counter()
            frames = decode_inputs(data, spec["image_size"], spec["interpolation"], window=spec["window"],
                                   preprocessing=spec["preprocessing"], max_pixels=spec["max_pixels"],
                                   reduced_jpeg=spec["fast_jpeg"])
            t2 = time.perf_counter()
        except Exception as e:  # noqa: BLE001  a file's failure, whatever it is, is that file's row alone
            if not isinstance(e, DecodeError):
                e = DecodeError(CORRUPT, f"could not be decoded ({type(e).__name__})")
            meta.append(Decoded(Row(path=redact(shown, e.redact), file_size=size, mtime_ns=mtime_ns, key=key,
                                    file_id=file_id, status=Status.SKIPPED if e.skipped else Status.ERROR,
                                    reason=e.code, message=redact(e.message, e.redact),
                                    read_ms=(time.perf_counter() - t0) * 1e3, decode_ms=0.0)))
            continue
        for img, sl, framing in frames:
            images.append(img)
            row = Row(path=shown, file_size=size, mtime_ns=mtime_ns, key=key, file_id=file_id, status=Status.OK,
                      read_ms=(t1 - t0) * 1e3, decode_ms=(t2 - t1) * 1e3 / len(frames))
            stats = slice_stats(img, framing)  # the shift alarm's statistics: a few floats, no pixels
            if stats is not None:
                for name, value in stats.items():
                    setattr(row, name, value)
                row.framing = framing.fallback
            if sl is not None:
                row.path = redact(shown, sl.identifying)
                row.study_uid, row.series_uid, row.sop_uid = (pseudonymize(u, pkey) for u in
                                                              (sl.study_uid, sl.series_uid, sl.sop_uid))
                row.instance_number, row.slice_position, row.frame = sl.instance_number, sl.slice_position, sl.frame
            # a thumbnail only where no burned-in text can show: never for DICOM unless BurnedInAnnotation is NO
            meta.append(Decoded(row, thumbs == "on" or (thumbs == "auto" and (sl is None or sl.burned_in_text_absent))))
    batch = np.stack(images)[..., None] if images else np.empty((0, h, w, 1), np.uint8)
    return {"images": batch, "meta": meta}


def thumbnail(img: np.ndarray, size: int = 96) -> bytes:
    """A small JPEG of what the model saw, for the report's flagged studies."""
    import cv2
    ok, buf = cv2.imencode(".jpg", cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA),
                           [cv2.IMWRITE_JPEG_QUALITY, 80])
    return buf.tobytes() if ok else None


class PredictorActor:
    """Ray actor around :class:`Predictor`: decoded batch in, result rows out."""

    def __init__(self, model_path: str, threads: int, device: str, model_sha256: str, run_id: str,
                 runtime: str = "onnxruntime", precision: str = "fp32"):
        import ray

        from .runtimes import OPENVINO, openvino_installed

        self.node = ray.get_runtime_context().get_node_id()[:12]
        self.note = None
        if runtime == OPENVINO and not openvino_installed():  # a cluster node without it: same file, same maths
            self.note = f"OpenVINO is not installed on Ray node {self.node}: it runs ONNX Runtime"
            runtime = "onnxruntime"
        # the bytes the run hashed, or none: a model re-exported to the same path mid-run is refused here
        self.predictor = Predictor(model_path, threads, device, runtime, precision, expected_sha256=model_sha256)
        self.sha = model_sha256
        self.run_id = run_id

    def info(self) -> dict:
        import socket
        return {"provider": self.predictor.provider, "host": socket.gethostname(), "pid": os.getpid(),
                "node": self.node, "runtime": self.predictor.runtime, "note": self.note}

    def screen(self, items: list[tuple[str, int, int, int, int]], spec: dict) -> list[Row]:
        """CPU nodes: decode the batch in this process, then predict it (no hand-off between processes)."""
        return self.predict(decode_batch(items, spec))

    def predict(self, decoded: dict) -> list[Row]:
        c: Contract = self.predictor.contract
        images, meta = decoded["images"], decoded["meta"]
        probs, seconds = (self.predictor.predict(images) if len(images) else (np.zeros(0, np.float32), 0.0))
        share = seconds * 1e3 / max(1, len(images))
        rows, k = [], 0
        for d in meta:
            row = d.row
            row.threshold, row.model_sha256, row.provider = c.threshold, self.sha, self.predictor.provider
            row.run_id, row.node = self.run_id, self.node
            if row.status == Status.OK:
                p = float(probs[k])
                pos = p >= c.threshold
                row.probability, row.positive, row.label, row.infer_ms = p, pos, c.class_names[int(pos)], share
                row.thumbnail = thumbnail(images[k, :, :, 0]) if pos and d.thumbnail_allowed else None
                k += 1
            rows.append(row)
        return rows
