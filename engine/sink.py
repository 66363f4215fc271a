"""Prediction rows to Parquet part files, atomically, and the index that makes runs resumable."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

PREDICTIONS = "predictions"

#: One row per input file. Documented in the README; add columns at the end only.
SCHEMA = pa.schema([
    ("path", pa.string()),
    ("status", pa.string()),        # ok | error | skipped
    ("reason", pa.string()),        # stable code; null when ok
    ("message", pa.string()),       # human-readable detail; null when ok
    ("probability", pa.float32()),  # of the positive class; null unless ok
    ("label", pa.string()),         # class name at the threshold; null unless ok
    ("positive", pa.bool_()),       # probability >= threshold; null unless ok
    ("threshold", pa.float32()),
    ("model_sha256", pa.string()),
    ("provider", pa.string()),      # ONNX Runtime execution provider actually used
    ("read_ms", pa.float32()),
    ("decode_ms", pa.float32()),    # decode + resize
    ("infer_ms", pa.float32()),     # this image's share of its batch's inference
    ("file_size", pa.int64()),
    ("mtime_ns", pa.int64()),       # file modification time, ns since the epoch
    ("run_id", pa.string()),
    ("node", pa.string()),          # Ray node id (first 12 hex digits) of the predictor
    ("key", pa.int64()),            # resume key of (path, size, mtime, model); the path may be redacted
    ("study_uid", pa.string()),     # DICOM only (keyed hashes with --pseudonymize)
    ("series_uid", pa.string()),
    ("sop_uid", pa.string()),
    ("instance_number", pa.int32()),
    ("slice_position", pa.float64()),  # z of ImagePositionPatient (mm)
    ("frame", pa.int32()),          # frame index within the DICOM object (0 for single-frame)
    ("thumbnail", pa.binary()),     # 96x96 JPEG of the model's input, positive rows only (for the report)
    # What the preprocessing found (engine.preprocess, engine.shift); null for schema 1 models.
    ("framing", pa.string()),       # null, or the fallback taken: no_body / no_lungs
    ("dark_anchor", pa.float32()),  # grey of aerated lung before mapping (reveals the export window)
    ("tissue_anchor", pa.float32()),  # grey of soft tissue before mapping
    ("lung_fraction", pa.float32()),  # share of the body in the lung fields
    ("input_mean", pa.float32()),   # mean of the model's input inside the body
    ("input_detail", pa.float32()),  # mean |Laplacian| of the model's input (resolution, blur, noise)
])
COLUMNS = SCHEMA.names


def row_key(path: str, size: int, mtime_ns: int, model_sha256: str) -> int:
    """64-bit key of (path, size, mtime, model): 8 bytes per file in the resume index."""
    h = hashlib.blake2b(f"{model_sha256}\0{size}\0{mtime_ns}\0{path}".encode("utf-8", "surrogateescape"),
                        digest_size=8)
    return int.from_bytes(h.digest(), "little", signed=True)


class DoneIndex:
    """Keys of the files already predicted in OUT_DIR by this model (sorted int64 array)."""

    def __init__(self, keys: np.ndarray):
        self._keys = np.unique(keys.astype(np.int64))

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: int) -> bool:
        i = np.searchsorted(self._keys, key)
        return bool(i < len(self._keys) and self._keys[i] == key)

    @classmethod
    def load(cls, pred_dir: Path, model_sha256: str) -> "DoneIndex":
        keys = []
        for part in sorted(Path(pred_dir).glob("part-*.parquet")):
            t = pq.read_table(part, columns=["key", "model_sha256", "reason"])
            for batch in t.to_batches(65536):
                d = batch.to_pydict()
                # a worker that died beyond Ray's retries ("internal") is retried by the next run
                keys.extend(k for k, h, r in zip(d["key"], d["model_sha256"], d["reason"])
                            if h == model_sha256 and r != "internal")
        return cls(np.asarray(keys, np.int64))


class PartWriter:
    """Buffers rows and writes them as ``part-<run>-<seq>.parquet``: temporary file, fsync, rename.

    A part is written when it holds ``rows_per_part`` rows, when ``max_seconds`` have passed
    since the last one, and for the very first rows of a run (so the first predictions reach
    the disk within seconds). A run killed at any moment leaves only whole parts.
    """

    def __init__(self, pred_dir: Path, run_id: str, rows_per_part: int = 20000, max_seconds: float = 30.0):
        self.dir = Path(pred_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("*.tmp"):  # left by a killed run: never renamed, never counted
            stale.unlink()
        self.run_id = run_id
        self.rows_per_part = rows_per_part
        self.max_seconds = max_seconds
        self._buf: dict[str, list] = {c: [] for c in COLUMNS}
        self._n = 0
        self._seq = 0
        self._last = time.monotonic()
        self.rows_written = 0
        self.first_write_at: float | None = None

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            for c in COLUMNS:
                self._buf[c].append(row.get(c))
        self._n += len(rows)
        if self._n and (self._seq == 0 or self._n >= self.rows_per_part
                        or time.monotonic() - self._last >= self.max_seconds):
            self.flush()

    def flush(self) -> None:
        if not self._n:
            return
        table = pa.Table.from_pydict(self._buf, schema=SCHEMA)
        final = self.dir / f"part-{self.run_id}-{self._seq:05d}.parquet"
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        if self.first_write_at is None:
            self.first_write_at = time.time()
        self.rows_written += self._n
        self._seq += 1
        self._buf = {c: [] for c in COLUMNS}
        self._n = 0
        self._last = time.monotonic()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
