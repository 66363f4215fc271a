"""Prediction rows to Parquet part files, atomically, and the index that makes runs resumable."""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_file
from .reasons import INTERNAL, RETRY_CODES
from .rows import COLUMNS, SCHEMA, Row, Status, as_row, row_dict  # noqa: F401  (SCHEMA, COLUMNS: here as before)

log = logging.getLogger(__name__)

PREDICTIONS = "predictions"

_STRINGS = [f.name for f in SCHEMA if pa.types.is_string(f.type)]


class OutputError(RuntimeError):
    """A part could not be written (disk full, permissions): the run stops, earlier parts intact."""


def readable(text: str) -> str:
    """``text`` as valid UTF-8: bytes of a name that is not UTF-8 (surrogate escapes) become \\xNN."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # lone surrogates that are not escapes of bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def clean_row(row: Row) -> Row:
    """The row with every text valid UTF-8; a path that was not keeps its exact bytes in ``path_bytes``."""
    for c in _STRINGS:
        v = getattr(row, c)
        if isinstance(v, str):
            r = readable(v)
            if r is not v:
                if c == "path":
                    row.path_bytes = os.fsencode(v)
                setattr(row, c, r)
    return row


def exact_path(path: str, path_bytes: bytes | None) -> bytes:
    """The file name on disk of a row (README: how to get the exact path back)."""
    return path_bytes if path_bytes is not None else path.encode("utf-8")


SECRET = ".covidct-secret"


def out_secret(out: Path) -> bytes | None:
    """OUT_DIR's own key for row keys (32 random bytes, mode 0600), made with its first run.

    Keys are then MACs: a row's key cannot be searched for the redacted parts of its path. An
    OUT_DIR whose parts predate the secret keeps unkeyed keys (None), so that it still resumes."""
    path = Path(out) / SECRET
    parts = sorted((Path(out) / PREDICTIONS).glob("part-*.parquet"))
    if path.exists():
        secret = path.read_bytes()
        marks = _part_fingerprints(parts)
        if marks and secret_fingerprint(secret) not in marks:
            raise SecretError(f"{path} is not the secret this OUT_DIR's parts were keyed with (fingerprint "
                              f"{secret_fingerprint(secret)}, parts: {', '.join(sorted(marks))}): restore the right "
                              "file, or start afresh with --overwrite")
        return secret
    if parts:
        if _part_fingerprints(parts):
            raise SecretError(f"{path} is missing, but the parts in {Path(out) / PREDICTIONS} were keyed with it "
                              "(a copy or backup that skips dotfiles?). Without it nothing already screened can "
                              "be recognised and every file would be screened twice: restore the file from where "
                              "OUT_DIR came from, or start afresh with --overwrite")
        log.warning("OUT_DIR has rows without a secret (an older version wrote them): its row keys stay unkeyed")
        return None
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
        f.flush()
        os.fsync(f.fileno())
    return path.read_bytes()


#: Columns a part must have to be one of ours (a foreign Parquet file in predictions/ is set aside).
_PART_COLUMNS = {"path", "status", "key", "model_sha256", "run_id"}
DAMAGED = "damaged"


def set_aside_damaged(pred_dir: Path) -> list[dict]:
    """Move every part that cannot be read whole (truncated, empty, not Parquet, a foreign table) to
    ``predictions/damaged/``; returns what was moved and why. Its files are then not done, so the run
    screens them again: nothing is lost, and nothing is read from a broken file."""
    moved = []
    for part in sorted(Path(pred_dir).glob("part-*.parquet")):
        try:
            with open(part, "rb") as f:
                meta = pq.ParquetFile(f).metadata
                names = set(meta.schema.to_arrow_schema().names)
            why = None if _PART_COLUMNS <= names else f"not a covidct-batch part (columns {sorted(names)[:8]})"
        except (OSError, pa.ArrowException, ValueError) as e:
            why = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        if why is None:
            continue
        dest_dir = Path(pred_dir) / DAMAGED
        dest_dir.mkdir(exist_ok=True)
        dest = dest_dir / f"{part.name}.{uuid.uuid4().hex[:6]}"
        os.replace(part, dest)
        log.warning("set aside %s: %s (moved to %s; its files are screened again)", part.name, why, dest)
        moved.append({"part": part.name, "reason": why, "moved_to": str(dest)})
    return moved


class SecretError(RuntimeError):
    """OUT_DIR's secret is missing or not the one its parts were keyed with: resuming would duplicate rows."""


#: Parquet metadata key of a part: the fingerprint of the secret its keys were made with.
FINGERPRINT_KEY = b"covidct_secret_fingerprint"


def secret_fingerprint(secret: bytes | None) -> str:
    """What a part records of the secret (never the secret itself): 16 hex digits of a hash of it."""
    return hashlib.blake2b(b"fingerprint\0" + (secret or b""), digest_size=8).hexdigest() if secret else ""


def _part_fingerprints(parts: list[Path], sample: int = 3) -> set[str]:
    """Fingerprints recorded by the first and last few parts (older parts record none)."""
    marks = set()
    for p in parts[:sample] + parts[-sample:]:
        try:
            with open(p, "rb") as f:  # a file object: pyarrow takes only UTF-8 paths
                meta = pq.read_schema(f).metadata or {}
        except (OSError, pa.ArrowException):
            continue
        if meta.get(FINGERPRINT_KEY):
            marks.add(meta[FINGERPRINT_KEY].decode())
    return marks


def row_key(path: str, size: int, mtime_ns: int, model_sha256: str, secret: bytes | None = None) -> int:
    """64-bit key of (path, size, mtime, model): 8 bytes per file in the resume index; keyed by
    OUT_DIR's secret (a MAC) when there is one."""
    h = hashlib.blake2b(f"{model_sha256}\0{size}\0{mtime_ns}\0{path}".encode("utf-8", "surrogateescape"),
                        digest_size=8, key=secret or b"")
    return int.from_bytes(h.digest(), "little", signed=True)


def file_key(path: str, secret: bytes | None = None) -> int:
    """64-bit identity of a file by its exact path, keyed by OUT_DIR's secret like ``row_key``."""
    h = hashlib.blake2b(b"file\0" + path.encode("utf-8", "surrogateescape"), digest_size=8, key=secret or b"")
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
        """Keys of this model's rows, read column-wise (8 bytes per row, no Python object per row).

        Rows whose cause may have gone (``RETRY_CODES``: a worker that died beyond Ray's
        retries) are not done: the next run tries them again."""
        import pyarrow.compute as pc

        chunks = []
        for part in sorted(Path(pred_dir).glob("part-*.parquet")):
            with open(part, "rb") as f:  # a file object: OUT_DIR's name need not be UTF-8
                t = pq.read_table(f, columns=["key", "model_sha256", "reason"])
            keep = pc.and_(pc.equal(t["model_sha256"], model_sha256),
                           pc.invert(pc.fill_null(pc.is_in(t["reason"], pa.array(sorted(RETRY_CODES))), False)))
            chunks.append(np.unique(t["key"].filter(keep).to_numpy()))
        return cls(np.concatenate(chunks) if chunks else np.zeros(0, np.int64))


class KeySet:
    """A set of int64 keys at 8 bytes each (sorted array plus a small unsorted buffer)."""

    def __init__(self, buffer: int = 65536):
        self._sorted = np.zeros(0, np.int64)
        self._recent: set[int] = set()
        self._cap = buffer

    def add(self, key: int) -> None:
        self._recent.add(key)
        if len(self._recent) >= self._cap:
            self._sorted = np.union1d(self._sorted, np.fromiter(self._recent, np.int64, len(self._recent)))
            self._recent = set()

    def __contains__(self, key: int) -> bool:
        if key in self._recent:
            return True
        i = np.searchsorted(self._sorted, key)
        return bool(i < len(self._sorted) and self._sorted[i] == key)


class PartWriter:
    """Buffers rows and writes them as ``part-<run>-<seq>.parquet``: temporary file, fsync, rename.

    A part is written when it holds ``rows_per_part`` rows, when ``max_seconds`` have passed
    since the last one, and for the very first rows of a run (so the first predictions reach
    the disk within seconds). A run killed at any moment leaves only whole parts.
    """

    def __init__(self, pred_dir: Path, run_id: str, rows_per_part: int = 20000, max_seconds: float = 30.0,
                 secret: bytes | None = None):
        self.dir = Path(pred_dir)
        self.fingerprint = secret_fingerprint(secret)
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

    def add(self, rows: list[Row]) -> None:
        """Buffer ``rows`` (``Row``; a dict is accepted only with the schema's fields: RowFieldError names
        any other) and write a part when one is due."""
        rows = [clean_row(as_row(r)) for r in rows]  # every row checked before any is buffered
        for row in rows:
            for c in COLUMNS:
                self._buf[c].append(getattr(row, c))
        self._n += len(rows)
        if self._n and (self._seq == 0 or self._n >= self.rows_per_part
                        or time.monotonic() - self._last >= self.max_seconds):
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one part. Raises OutputError when the part cannot be written."""
        if not self._n:
            return
        table = self._table()
        if self.fingerprint:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                   FINGERPRINT_KEY: self.fingerprint.encode()})
        final = self.dir / f"part-{self.run_id}-{self._seq:05d}.parquet"
        tmp = final.with_name(final.name + ".tmp")
        try:  # Ctrl-C or SIGTERM mid-write: no half part left behind (atomic_file removes it)
            with atomic_file(final, tmp=tmp) as f:
                pq.write_table(table, f, compression="zstd")
        except OSError as e:
            raise OutputError(f"cannot write {final.name} in {self.dir}: {e.strerror or e}") from None
        if self.first_write_at is None:
            self.first_write_at = time.time()
        self.rows_written += self._n
        self._seq += 1
        self._buf = {c: [] for c in COLUMNS}
        self._n = 0
        self._last = time.monotonic()

    def _table(self) -> pa.Table:
        """The buffer as a table; a row that does not fit the schema becomes an ``internal`` row alone."""
        try:
            return pa.Table.from_pydict(self._buf, schema=SCHEMA)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            pass
        rows = []
        for i in range(self._n):
            row = {c: self._buf[c][i] for c in COLUMNS}
            try:
                pa.Table.from_pylist([row], schema=SCHEMA)
            except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
                log.error("a row could not be written (%s); it is kept as an internal error row", type(e).__name__)
                keep = {k: row.get(k) if isinstance(row.get(k), t) else None
                        for k, t in (("path", str), ("key", int), ("model_sha256", str), ("run_id", str),
                                     ("path_bytes", bytes), ("file_id", int))}
                row = row_dict(Row(**keep, status=Status.ERROR, reason=INTERNAL,
                                   message=f"the row could not be written ({type(e).__name__}); rerun to retry"))
            rows.append(row)
        return pa.Table.from_pylist(rows, schema=SCHEMA)
