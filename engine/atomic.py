"""One way to write a file that must be whole: a temporary file beside it, fsync, rename, fsync of the folder.

A reader (or a run killed at any moment) sees the old file or the new one, never a part of one. Every
file covidct-batch, covidct-export, covidct-report and covidct-evaluate write whole goes through here:
Parquet parts, studies.parquet, run.json, report.html, evaluation.json, the model, the runtime cache.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_file(path: Path | str, mode: str = "wb", *, tmp: Path | None = None,
                encoding: str | None = None) -> Iterator[IO]:
    """A file object whose content replaces ``path`` only when the block ends without an exception.

    ``tmp`` names the temporary file (default: ``<name>.<pid>.<random>.tmp`` beside ``path``); it is
    removed on any failure, Ctrl-C and SIGTERM included. Raises OSError when the file cannot be written."""
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    try:
        with open(tmp, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        discard(tmp)
        raise


def write_atomic(path: Path | str, data: bytes | str) -> None:
    """``data`` (bytes, or text written as UTF-8) as the whole of ``path``, atomically."""
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w", encoding="utf-8") as f:
        f.write(data)


def fsync_dir(path: Path | str) -> None:
    """Make a rename in ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def discard(tmp: Path) -> None:
    """Remove a temporary file, if it is there."""
    with contextlib.suppress(OSError):
        Path(tmp).unlink(missing_ok=True)
