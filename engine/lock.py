"""One writer per OUT_DIR: a lock file that names its holder, with a heartbeat.

``OUT_DIR/.covidct-batch.lock`` is created with O_EXCL and holds the host, boot id, pid,
the pid's start time and the run's start. The running run touches it every few seconds.
A second run exits before any work and names the holder. A lock is stale, and taken over,
when its holder is on this machine (same host and boot) and that process is gone, or when
it is on another machine and has not been touched for ``stale_after`` seconds (shared
storage: NFS, Lustre). A run whose lock was taken from it stops writing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

LOCK = ".covidct-batch.lock"
HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0
#: An empty or unreadable lock file older than this is a run killed while creating it: taken over.
TORN_AFTER_S = 5.0


class LockedError(RuntimeError):
    """OUT_DIR is held by a live run."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_ns() -> str:
    """This process's pid namespace ("pid:[4026531836]"); '' where it cannot be read."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (tells a reused pid apart); '' if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return ""


def holder_text(h: dict) -> str:
    return f"host {h.get('host', '?')}, pid {h.get('pid', '?')}, started {h.get('started', '?')}"


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    now = _pid_start(pid)
    return not (start and now and now != start)


class OutDirLock:
    def __init__(self, out: Path, stale_after: float = STALE_AFTER_S, heartbeat: float = HEARTBEAT_S):
        self.path = Path(out) / LOCK
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self.token = uuid.uuid4().hex
        self.lost = threading.Event()
        self.took_over: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> "OutDirLock":
        me = {"host": socket.gethostname(), "boot_id": _boot_id(), "pid_ns": _pid_ns(), "pid": os.getpid(),
              "pid_start": _pid_start(os.getpid()), "token": self.token,
              "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None or not self._stale(holder):
                    h = holder or {}
                    if set(h) == {"_age"}:
                        raise LockedError(f"{self.path} is empty or unreadable and only {h['_age']:.0f} s old (a run "
                                          f"starting this instant?); it is taken over after {TORN_AFTER_S:g} s")
                    raise LockedError(f"{self.path.parent} is in use by another covidct-batch run ("
                                      f"{holder_text(h)}); wait for it to end, or give another --out")
                self._break(holder)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._beat, name="covidct-lock", daemon=True)
            self._thread.start()
            return self
        raise LockedError(f"could not take the lock {self.path}: other runs keep taking it")

    def _read(self) -> dict | None:
        try:
            text = self.path.read_bytes().decode("utf-8", "replace")
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return {"_gone": True}
        except OSError:
            return None
        try:
            h = json.loads(text)
        except ValueError:  # being written this instant, or a torn write by a killed run
            h = {}
        if not isinstance(h, dict):  # valid JSON, but not a lock: damage
            h = {}
        h["_age"] = age
        return h

    def _stale(self, h: dict) -> bool:
        if h.get("_gone"):
            return True
        if set(h) == {"_age"}:  # empty or garbage: a run killed between creating and writing it, or damage
            return h["_age"] > TORN_AFTER_S
        same_machine = h.get("host") == socket.gethostname() and h.get("boot_id", "") == _boot_id()
        # a pid means something only in the holder's own pid namespace (containers sharing host and boot id)
        if same_machine and "pid" in h and h.get("pid_ns", _pid_ns()) == _pid_ns():
            try:
                return not _alive(int(h["pid"]), str(h.get("pid_start", "")))
            except (TypeError, ValueError):
                return h["_age"] > self.stale_after
        return h["_age"] > self.stale_after  # another machine or namespace: judged by its heartbeat

    def _break(self, holder: dict) -> None:
        """Move a stale lock aside; of two runs that try at once, one rename succeeds."""
        if holder.get("_gone"):
            return
        aside = self.path.with_name(f"{LOCK}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_bytes().decode("utf-8", "replace"))
        except (OSError, ValueError):
            moved = {}
        moved = moved if isinstance(moved, dict) else {}
        if moved.get("token") != holder.get("token"):  # not the one judged stale: put it back
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        else:
            self.took_over = {k: holder.get(k) for k in ("host", "pid", "started")}
            log.warning("took over a stale lock of OUT_DIR (%s): that run is gone", holder_text(holder))
        with contextlib.suppress(OSError):
            aside.unlink()

    def _mine(self) -> bool:
        try:
            return json.loads(self.path.read_bytes().decode("utf-8", "replace")).get("token") == self.token
        except (OSError, ValueError, AttributeError):
            return False

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            if not self._mine():
                log.error("the lock of OUT_DIR was taken by another run: this run stops writing")
                self.lost.set()
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._mine():
            with contextlib.suppress(OSError):
                self.path.unlink()
