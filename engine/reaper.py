"""The local Ray runtime dies with its driver, however the driver ends.

Ray's local runtime is started by the driver (``ray.init``): GCS, raylet, workers and two agents
(DashboardAgent, RuntimeEnvAgent). When the driver is killed with SIGKILL, or ends while Ray is still
starting or shutting down, the agents are left running for good (about 170 MB each, and the
RuntimeEnvAgent listens on a network port). So the driver starts this small watcher as its child. It
keeps the list of the driver's descendants (pid and start time, read from /proc every second) and, once
the driver is gone, ends those still alive: SIGTERM, then SIGKILL after a grace period. It ends only
processes that were the driver's own descendants, by id; it exits with the driver.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 1.0
GRACE_S = 3.0


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time in clock ticks) of every process this user can see."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(name)] = (int(fields[1]), fields[19])
    return table


def descendants(root: int, table: dict[int, tuple[int, str]] | None = None) -> dict[int, str]:
    """pid -> start time of every descendant of ``root``."""
    table = _proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, stack = {}, [root]
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in out:
                out[c] = table[c][1]
                stack.append(c)
    return out


def _alive(pid: int, start: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[19] == start


def _end(known: dict[int, str]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = {p: s for p, s in known.items() if _alive(p, s)}
        for pid in left:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + GRACE_S
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = {p: s for p, s in left.items() if _alive(p, s)}
        if not left:
            return


def watch(driver: int) -> None:
    """Follow ``driver``'s descendants; when it is gone, end the ones still alive."""
    me = os.getpid()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a scheduler's SIGTERM to the group: outlive the driver
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    known: dict[int, str] = {}
    while os.getppid() == driver:
        for pid, start in descendants(driver).items():
            if pid != me:
                known[pid] = start
        time.sleep(POLL_S)
    _end(known)


def start() -> subprocess.Popen | None:
    """Start the watcher for this process (the driver); None where /proc is not there to read."""
    if not os.path.isdir("/proc/self"):
        return None
    return subprocess.Popen([sys.executable, "-m", __name__ if __name__ != "__main__" else "covidct.engine.reaper",
                             str(os.getpid())], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            close_fds=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
