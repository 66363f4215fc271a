"""Bounded-memory latency statistics and the terminal progress line."""

from __future__ import annotations

import sys
import time

import numpy as np


class Reservoir:
    """Uniform sample of at most ``capacity`` values (Vitter's algorithm R): flat memory."""

    def __init__(self, capacity: int = 100_000, seed: int = 0):
        self.values = np.empty(capacity, np.float32)
        self.n = 0
        self._rng = np.random.default_rng(seed)

    def add(self, values) -> None:
        cap = len(self.values)
        for v in values:
            if self.n < cap:
                self.values[self.n] = v
            else:
                j = self._rng.integers(0, self.n + 1)
                if j < cap:
                    self.values[j] = v
            self.n += 1

    def percentiles(self) -> dict[str, float | None]:
        k = min(self.n, len(self.values))
        if k == 0:
            return {"p50": None, "p95": None, "p99": None, "mean": None}
        v = self.values[:k]
        p50, p95, p99 = np.percentile(v, [50, 95, 99])
        return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3),
                "mean": round(float(v.mean()), 3)}


class Progress:
    """One progress line on stderr: files done of total (when known), images/s, errors so far.

    On a terminal it redraws in place a few times a second; elsewhere (CI, logs) it prints a
    line every ``log_every`` seconds.
    """

    def __init__(self, enabled: bool = True, log_every: float = 10.0):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.interval = 0.25 if self.tty else log_every
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, done: int, total: int | None, errors: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < self.interval):
            return
        self._last = now
        rate = done / max(now - self.start, 1e-9)
        of = f"/{total:,}" if total is not None else ""
        line = f"{done:,}{of} files  {rate:,.1f} img/s  errors {errors:,}"
        if self.tty:
            sys.stderr.write("\r" + line.ljust(60))
            if force:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
