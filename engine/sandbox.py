"""Native decoders that can take their process down run in a child process of the worker.

GDCM and the JPEG/JPEG 2000 libraries behind pydicom's compressed transfer syntaxes are C/C++: on
damaged data some of them throw a C++ exception nobody catches (``terminate called after throwing...``),
abort or segfault. In the predictor's own process that kills the actor, and every later batch of the
run with it. So compressed DICOM pixel data is decoded here: one long-lived child per worker process
(started on first use), fed one file at a time over a pipe. A child that dies or overruns the time
budget costs that file alone: it becomes a ``corrupt`` (or ``timeout``) row, the child is replaced, and
the worker goes on.

The child reads requests from stdin until EOF (the worker is gone) and also exits when its parent
changes, so it never outlives the worker that started it.
"""

from __future__ import annotations

import io
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time

from .reasons import CORRUPT, TIMEOUT, DecodeError

#: Seconds one file's pixel data may take to decode (a 512x512 JPEG 2000 slice takes ~20 ms).
DECODE_BUDGET_S = 30.0
_HEADER = struct.Struct("<Q")


class DecoderCrashed(DecodeError):
    """The child died while decoding this file."""


class Sandbox:
    """One child process decoding DICOM pixel data; restarted after a crash or a timeout."""

    def __init__(self, budget_s: float = DECODE_BUDGET_S):
        self.budget_s = budget_s
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, "-m", __name__ if __name__ != "__main__" else "covidct.engine.sandbox"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, close_fds=True,
                                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
        return self._proc

    def close(self) -> None:
        p, self._proc = self._proc, None
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()

    def pixel_array(self, data: bytes):
        """``pydicom.dcmread(data).pixel_array``, decoded in the child.

        Raises:
            DecoderCrashed: the decoder killed its process (this file's data is damaged).
            DecodeError(TIMEOUT): it ran past the budget.
            Exception: what pydicom raised in the child (its type name and message), as ``ChildError``.
        """
        with self._lock:
            proc = self._start()
            try:
                proc.stdin.write(_HEADER.pack(len(data)) + data)
                proc.stdin.flush()
                status, payload = pickle.loads(self._read(proc, self._read(proc, _HEADER.size, as_len=True)))
            except (BrokenPipeError, EOFError, ConnectionError):
                code = proc.wait()
                self._proc = None
                raise DecoderCrashed(CORRUPT, "the pixel-data decoder crashed on this file (damaged compressed "
                                              f"data; exit {_exit_name(code)}); only this file is affected") from None
        if status == "ok":
            return payload
        raise ChildError(*payload)

    def _read(self, proc: subprocess.Popen, n: int, as_len: bool = False):
        deadline = time.monotonic() + self.budget_s
        fd = proc.stdout.fileno()
        chunks, got = [], 0
        while got < n:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, left))
            if not ready:
                self.close()
                raise DecodeError(TIMEOUT, f"decoding the pixel data took more than {self.budget_s:g} s: stopped")
            chunk = os.read(fd, min(n - got, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            got += len(chunk)
        data = b"".join(chunks)
        return _HEADER.unpack(data)[0] if as_len else data


class ChildError(Exception):
    """An ordinary exception in the child, by type name and message."""

    def __init__(self, type_name: str, message: str):
        super().__init__(message)
        self.type_name = type_name


def _exit_name(code: int) -> str:
    if code is not None and code < 0:
        import signal
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return str(code)


_SANDBOX: Sandbox | None = None


def sandbox() -> Sandbox:
    """This process's sandbox (one per worker)."""
    global _SANDBOX
    if _SANDBOX is None:
        _SANDBOX = Sandbox()
    return _SANDBOX


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(1.0)


def _serve() -> None:
    import warnings

    import pydicom

    warnings.simplefilter("ignore")
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    # replies go out on a private copy of stdout; whatever a decoder prints lands on stderr
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    while True:
        head = inp.read(_HEADER.size)
        if len(head) < _HEADER.size:
            return
        data = inp.read(_HEADER.unpack(head)[0])
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            reply = ("ok", ds.pixel_array)
        except Exception as e:  # noqa: BLE001  the parent names it
            reply = ("error", (type(e).__name__, str(e)[:500]))
        blob = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        out.write(_HEADER.pack(len(blob)) + blob)
        out.flush()


if __name__ == "__main__":
    _serve()
