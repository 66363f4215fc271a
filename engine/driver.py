"""The driver of a screening run, in named parts with explicit state, testable without Ray.

- :class:`RunContext`: what a run is (config, contract, model hash, run id, OUT_DIR's secret, the
  inference choice, when it started), frozen.
- :class:`Admission`: which input files are screened: each once however it is named, none already done
  in OUT_DIR, special files as rows straight from the driver.
- :class:`Tally`: counts by status, label and reason, stage latencies and the shift histograms of
  the rows written.
- :class:`Pool`: the predictors, behind four calls (``start``, ``submit``, ``wait``, ``result``);
  :class:`RayPool` is the only code that calls ``ray.remote``. Tests drive the driver with a fake.
- :class:`Driver`: ``run`` (least-busy dispatch of batches, at most ``max_in_flight`` out), ``drain``
  (each batch's rows written as soon as it is back), ``finalize`` (figures, shift verdict, studies and
  report, exit code). An interrupted or failed run writes its record as such and re-raises.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
import platform
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import __version__
from .contract import DISCLAIMER, Contract
from .exits import Exit, RunError
from .privacy import shown_path
from .reasons import INTERNAL
from .report import RUN, build_report, write_json
from .rows import Row, Status
from .shift import STATS, Histograms, compare
from .sink import KeySet, OutputError, file_key, row_key
from .sources import iter_inputs
from .stats import Progress, Reservoir

log = logging.getLogger("covidct.engine.pipeline")

STAGES = ("read_ms", "decode_ms", "infer_ms", "batch_latency_ms")


@dataclass
class RunSummary:
    """What a run did: the counts, figures and exit code covidct-batch prints, and its run record."""

    out: Path
    counts: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    already_done: int = 0
    provider: str = ""
    seconds: float = 0.0
    steady_images_per_s: float | None = None
    images_per_s: float = 0.0
    exit_code: int = Exit.OK
    run: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RunContext:
    """One run, as decided before its first batch."""

    cfg: Any  # engine.pipeline.ScreenConfig
    contract: Contract
    model_sha: str
    run_id: str
    out: Path
    secret: bytes | None
    choice: Any  # engine.runtimes.Choice
    started: float  # time.time() at the start
    t_start: float  # time.monotonic() at the start
    t_ray: float  # time.monotonic() once Ray was up
    damaged: tuple = ()  # parts set aside before the run (engine.sink.set_aside_damaged)

    def driver_row(self, item, key: int, file_id: int, reason: str, message: str,
                   status: Status = Status.ERROR) -> Row:
        """A row the driver writes itself (a special file, a batch whose worker died)."""
        return Row(path=shown_path(item.path, self.cfg.pseudonym_key), key=key, file_id=file_id, status=status,
                   reason=reason, message=message, threshold=self.contract.threshold, model_sha256=self.model_sha,
                   file_size=item.size if item.size >= 0 else None,
                   mtime_ns=item.mtime_ns if item.mtime_ns >= 0 else None, run_id=self.run_id)


class Admission:
    """The files a run screens, lazily: each input file once, none that OUT_DIR has done (``done``), and
    special files (``item.error``) passed to ``write`` as rows straight away. Memory: 8 bytes a file found
    (``seen``, which decides which earlier error rows still count) and a set for files named explicitly."""

    def __init__(self, ctx: RunContext, done, write: Callable[[list[Row]], None], summary: RunSummary):
        self.ctx, self.done, self.write, self.summary = ctx, done, write, summary
        self.listed = KeySet()  # files named on the command line or in --from-list may be named twice
        self.seen = KeySet()  # file_id of every file this run found
        self.total = 0
        self.finished = False

    def __iter__(self) -> Iterator[tuple[Any, int, int]]:
        """(item, row key, file id) of each file to screen."""
        cfg, secret = self.ctx.cfg, self.ctx.secret
        for item in iter_inputs(cfg.inputs, cfg.from_list, exclude=[self.ctx.out, *cfg.exclude]):
            self.total += 1
            fid = file_key(item.path, secret)  # which file a row is about, once per file
            self.seen.add(fid)
            key = row_key(item.path, item.size, item.mtime_ns, self.ctx.model_sha, secret)
            if key in self.done:
                self.summary.already_done += 1
                continue
            if item.listed:  # a walk yields each file once; only named files can come twice
                if key in self.listed:
                    continue
                self.listed.add(key)
            if item.error:  # not opened (special file) or could not be stat'ed: a row straight from the driver
                self.write([self.ctx.driver_row(item, key, fid, item.reason, item.error,
                                                Status.SKIPPED if item.skipped else Status.ERROR)])
                continue
            yield item, key, fid
        self.finished = True


class Tally:
    """What the written rows add up to: counts, latency reservoirs, the shift histograms (bounded memory)."""

    def __init__(self, summary: RunSummary):
        self.summary = summary
        self.shift = Histograms()  # this run's slices, in the reference's fixed bins
        self.stages = {k: Reservoir() for k in STAGES}

    def add(self, rows: Iterable[Row]) -> None:
        s = self.summary
        for r in rows:
            s.counts[Status(r.status)] += 1
            if r.status == Status.OK:
                s.labels[r.label] += 1
                self.shift.add({k: getattr(r, k) for k in STATS} if r.input_detail is not None else None,
                               r.probability)
            else:
                s.reasons[(str(r.status), str(r.reason))] += 1
            for k in ("read_ms", "decode_ms", "infer_ms"):
                v = getattr(r, k)
                if v is not None and (k != "decode_ms" or r.status == Status.OK):
                    self.stages[k].add((v,))

    @property
    def rows(self) -> int:
        return sum(self.summary.counts.values())


class BatchFailed(Exception):
    """A batch whose worker died beyond its retries; ``kind`` names the error (never its text: it may quote a
    path). Its files become ``internal`` rows, retried by the next run."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


class Pool(Protocol):
    """The predictors a driver submits batches to."""

    size: int  # predictors started
    first_wave: int  # how many start with the first batch (the others once the first rows are written)
    total: int  # how many the plan has

    def start(self, n: int) -> None:
        """Start predictors up to the ``n``-th."""

    def prepare(self, items: list[tuple]) -> Any:
        """What a predictor is sent for a batch of (path, size, mtime_ns, key, file_id): the items themselves, or
        (with GPUs) a decode task already submitted, before the first predictors start."""

    def submit(self, batch: Any, predictor: int) -> Any:
        """Send one prepared batch to predictor ``predictor``; a reference to its rows."""

    def wait(self, refs: list, n: int) -> list:
        """Block until ``n`` of ``refs`` are done; those."""

    def result(self, ref) -> list[Row]:
        """The rows of a done batch. Raises BatchFailed."""

    def ready(self, predictor: int) -> dict:
        """The predictor's info once it answered (``provider``, ``note``). Raises RunError if it cannot start."""


class Driver:
    """Batches to the pool, rows to the writer; see the module docstring."""

    def __init__(self, ctx: RunContext, pool: Pool, writer, done, plan: dict, lock_lost: Callable[[], bool],
                 progress: Progress | None = None):
        self.ctx, self.pool, self.writer, self.plan = ctx, pool, writer, plan
        self.summary = RunSummary(out=ctx.out)
        self.tally = Tally(self.summary)
        self.admission = Admission(ctx, done, self.write, self.summary)
        self.lock_lost = lock_lost
        self.progress = progress or Progress(ctx.cfg.progress)
        self.in_flight: dict = {}  # ref -> (batch, submitted monotonic, predictor index)
        self.load: Counter = Counter()  # predictor index -> batches in flight on it
        self.providers: list[str] = []
        self.ready: set[int] = set()
        self.first_rows: tuple[float, int] | None = None  # when the first rows came back, and how many

    # -- rows -------------------------------------------------------------------------------------------
    def write(self, rows: list[Row]) -> None:
        if self.lock_lost():
            raise OutputError("the lock of OUT_DIR was taken by another run; this run stopped writing")
        self.writer.add(rows)
        self.tally.add(rows)

    def predictor_ready(self, i: int) -> None:
        """A predictor's rows are written only once it answered: a model it cannot load stops the run."""
        if i in self.ready:
            return
        info = self.pool.ready(i)
        self.ready.add(i)
        if info["provider"] not in self.providers:
            self.providers.append(info["provider"])
        if info.get("note") and info["note"] not in self.ctx.choice.notes:
            self.ctx.choice.notes.append(info["note"])
        self.summary.provider = ",".join(self.providers)

    # -- batches ----------------------------------------------------------------------------------------
    def least_busy(self) -> int:
        return min(range(self.pool.size), key=lambda i: self.load[i])

    def dispatch(self, batch: list[tuple]) -> None:
        """Submit one batch of (item, key, file id) to the least busy predictor."""
        prepared = self.pool.prepare([(i.path, i.size, i.mtime_ns, key, fid) for i, key, fid in batch])
        self.pool.start(self.pool.first_wave)
        a = self.least_busy()
        ref = self.pool.submit(prepared, a)
        self.load[a] += 1
        self.in_flight[ref] = (batch, time.monotonic(), a)

    def drain(self, block_for: int = 1) -> None:
        """Write the rows of ``block_for`` finished batches (a dead worker's batch as ``internal`` rows)."""
        for ref in self.pool.wait(list(self.in_flight), min(block_for, len(self.in_flight))):
            batch, t_sub, a = self.in_flight.pop(ref)
            self.load[a] -= 1
            self.predictor_ready(a)
            try:
                rows = self.pool.result(ref)
            except BatchFailed as e:
                rows = [self.ctx.driver_row(it, key, fid, INTERNAL, f"worker failed ({e.kind}); rerun to retry")
                        for it, key, fid in batch]
            self.tally.stages["batch_latency_ms"].add(((time.monotonic() - t_sub) * 1e3,))
            self.write(rows)
            if self.first_rows is None:
                log.debug("startup: first rows written at %.2f s", time.monotonic() - self.ctx.t_start)
                self.first_rows = (time.monotonic(), self.tally.rows)
                self.pool.start(self.pool.total)
        a = self.admission
        self.progress.update(self.tally.rows, a.total - self.summary.already_done if a.finished else None,
                             self.summary.counts[Status.ERROR])

    def record(self, state: str) -> dict:
        return {"state": state, **run_record(self.ctx, self.plan, self.providers, self.summary, self.tally.stages,
                                             self.writer), "damaged_parts": list(self.ctx.damaged)}

    def run(self, batches: Callable[[Iterable], Iterable[list]]) -> RunSummary:
        """Screen every admitted file (``batches`` groups them) and finalize; returns the summary."""
        out = self.ctx.out
        write_json(out / RUN, self.record("running"))  # covidct-report can rebuild from OUT_DIR even if this dies
        try:
            for batch in batches(self.admission):
                while len(self.in_flight) >= self.plan["max_in_flight"]:
                    self.drain(1)
                if not self.pool.size:
                    log.debug("startup: first batch submitted at %.2f s", time.monotonic() - self.ctx.t_start)
                self.dispatch(batch)
            while self.in_flight:  # one at a time: each batch's rows are written as soon as it is back
                self.drain(1)
            for i in range(self.pool.size):
                self.predictor_ready(i)
            log.info("Ray: %d node(s), %d CPU(s), %d GPU(s); %d predictor(s) x %d thread(s) on %s (ready at %.1f s)",
                     self.plan["nodes"], self.plan["cpus"], self.plan["gpus"], self.pool.size,
                     self.plan["inference_threads"], self.summary.provider or "-", time.monotonic() - self.ctx.t_start)
            self.writer.flush()
        except (OutputError, KeyboardInterrupt) as e:
            self.progress.update(self.tally.rows, None, self.summary.counts[Status.ERROR], force=True)
            with contextlib.suppress(OSError, OutputError):  # the disk may be full: the record is best effort
                write_json(out / RUN, self.record("stopped: output not written" if isinstance(e, OutputError)
                                                  else "interrupted"))
            raise
        return self.finalize()

    def finalize(self) -> RunSummary:
        """Figures, the shift verdict, studies and report, and the exit code of a run that screened everything."""
        s, a, out = self.summary, self.admission, self.ctx.out
        self.progress.update(self.tally.rows, a.total - s.already_done, s.counts[Status.ERROR], force=True)
        t_end = time.monotonic()
        n = self.tally.rows
        s.seconds = t_end - self.ctx.t_start
        s.images_per_s = n / s.seconds if s.seconds else 0.0
        if self.first_rows and n - self.first_rows[1] >= 100 and t_end > self.first_rows[0]:
            s.steady_images_per_s = (n - self.first_rows[1]) / (t_end - self.first_rows[0])  # else no steady state
        s.exit_code = Exit.FILE_ERRORS if s.counts[Status.ERROR] else Exit.OK
        if a.total == 0:  # an empty folder, an unmounted share: nothing was done, and the code says so
            s.exit_code = Exit.BAD_INPUT
        s.run = self.record("complete")
        s.run["files_found"] = a.total
        s.run["shift"] = compare(self.ctx.contract.reference, self.tally.shift)
        s.run["shift"]["scope"] = "the slices predicted by this run"
        write_json(out / RUN, s.run)
        try:
            s.run = build_report(out, self.ctx.cfg.top_k, self.ctx.cfg.group_by, seen=a.seen)
        except OutputError:
            raise
        except Exception as e:  # noqa: BLE001  OSError, DuckDB's IOException: studies/report could not be written
            if not is_output_failure(e):
                raise
            raise OutputError(f"studies.parquet/report.html could not be written ({str(e).splitlines()[0][:200]}); "
                              "every prediction part is intact, and covidct-report OUT_DIR rebuilds them") from None
        cur = s.run["current"]
        if cur["error"] - s.run.get("current_errors_not_found", 0) and s.exit_code == Exit.OK:
            # error rows of earlier runs are still there (deterministic ones are not retried): say so
            s.exit_code = s.run["exit_code"] = Exit.FILE_ERRORS
            write_json(out / RUN, s.run)
        return s


class RayPool:
    """The predictor actors of a run on Ray (the only code that calls ``ray.remote``).

    Predictor i runs on node i % nodes. The first starts with the first batch, with those on other
    nodes; the others on the first node once the first rows are written, so that on a small machine
    they do not slow the first row down. On CPU nodes each predictor decodes its own batches
    (``screen``); with GPUs, decode tasks on every CPU feed them (``predict``)."""

    def __init__(self, ctx: RunContext, plan: dict, spec: dict):
        import ray

        from .workers import PredictorActor, decode_batch

        self.ray, self.ctx, self.plan = ray, ctx, plan
        self.device = "cuda" if plan["use_gpu"] else "cpu"  # Ray saw no GPU: do not let ONNX Runtime try one
        self.actor_cls = ray.remote(PredictorActor)
        self.decode = ray.remote(decode_batch).options(num_cpus=ctx.cfg.decode_cpus, max_retries=3)
        self.spec_ref = ray.put(spec)
        nodes = len(plan["node_ids"])
        n = plan["predictors"]
        self.order = [0] + [i for i in range(1, n) if i % nodes] + [i for i in range(1, n) if not i % nodes]
        self.first_wave = 1 + sum(1 for i in range(1, n) if i % nodes)
        self.total = n
        self.actors: list = []
        self.info_refs: list = []

    @property
    def size(self) -> int:
        return len(self.actors)

    def _placement(self, i: int):
        # SPREAD is best effort and packs zero-CPU actors on one node: pin them round-robin.
        if self.plan["use_gpu"]:
            return "SPREAD"
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return NodeAffinitySchedulingStrategy(self.plan["node_ids"][i % len(self.plan["node_ids"])], soft=False)

    def start(self, n: int) -> None:
        plan, ctx = self.plan, self.ctx
        for k in range(len(self.actors), min(n, len(self.order))):
            self.actors.append(self.actor_cls.options(
                num_cpus=plan["actor_cpus"] if plan["fused"] else 1, num_gpus=1 if plan["use_gpu"] else 0,
                max_restarts=3, max_task_retries=3, scheduling_strategy=self._placement(self.order[k]),
            ).remote(str(Path(ctx.choice.model).resolve()), plan["inference_threads"], self.device, ctx.model_sha,
                     ctx.run_id, ctx.choice.runtime, ctx.choice.precision))
            self.info_refs.append(self.actors[-1].info.remote())

    def prepare(self, items: list[tuple]):
        # with GPUs, decode first: the first decode takes a worker Ray started beforehand
        return items if self.plan["fused"] else self.decode.remote(items, self.spec_ref)

    def submit(self, batch, predictor: int):
        if self.plan["fused"]:
            return self.actors[predictor].screen.remote(batch, self.spec_ref)
        # the actor call holds the only reference to the decoded batch: it is freed once predicted
        return self.actors[predictor].predict.remote(batch)

    def wait(self, refs: list, n: int) -> list:
        return self.ray.wait(refs, num_returns=n)[0]

    def result(self, ref) -> list[Row]:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as e:  # task/actor died beyond retries: rows, not loss
            raise BatchFailed(type(e).__name__) from None

    def ready(self, predictor: int) -> dict:
        try:
            return self.ray.get(self.info_refs[predictor])
        except self.ray.exceptions.RayActorError as e:
            raise RunError(f"predictor actors could not start: {e}") from None


def is_output_failure(e: Exception) -> bool:
    """A write that failed for want of space or permission (OSError, or DuckDB's IO error saying so)."""
    if isinstance(e, OSError):
        return True
    text = str(e).lower()
    return type(e).__name__ in ("IOException", "IOError") or any(
        w in text for w in ("no space left", "disk quota", "read-only file system", "permission denied",
                            os.strerror(errno.ENOSPC).lower()))


def config_record(cfg) -> dict:
    """The run's options for run.json. Input paths may name patients: under --pseudonymize they are
    recorded as pseudonyms, and the key itself never."""
    rec = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    if cfg.pseudonym_key:
        rec["pseudonym_key"] = "<set>"
        rec["inputs"] = [shown_path(os.path.abspath(p), cfg.pseudonym_key) for p in cfg.inputs]
        rec["from_list"] = "<set>" if cfg.from_list else None
    return rec


def run_record(ctx: RunContext, plan: dict, providers: list[str], summary: RunSummary, stages: dict,
               writer) -> dict:
    """run.json's record of the run so far."""
    import cv2
    import onnxruntime
    import pyarrow
    import ray

    first_row_s = (writer.first_write_at - ctx.started) if writer.first_write_at else None
    ray_up = ctx.t_ray - ctx.t_start
    return {
        "disclaimer": DISCLAIMER,
        "run_id": ctx.run_id,
        "started": dt.datetime.fromtimestamp(ctx.started, dt.timezone.utc).isoformat(),
        "ended": dt.datetime.now(dt.timezone.utc).isoformat(),
        "config": config_record(ctx.cfg),
        "workers": plan,
        "model": {"path": str(ctx.cfg.model), "sha256": ctx.model_sha, "contract": json.loads(ctx.contract.to_json())},
        "execution_providers": providers,
        "inference": ctx.choice.to_dict(),
        "versions": {"covidct-batch": __version__, "onnxruntime": onnxruntime.__version__, "ray": ray.__version__,
                     "opencv": cv2.__version__, "pyarrow": pyarrow.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "counts": {"ok": summary.counts[Status.OK], "error": summary.counts[Status.ERROR],
                   "skipped": summary.counts[Status.SKIPPED], "already_done": summary.already_done,
                   "by_label": dict(summary.labels),
                   "by_reason": [{"status": s, "reason": r, "files": n} for (s, r), n in
                                 sorted(summary.reasons.items(), key=lambda kv: -kv[1])]},
        "seconds": round(summary.seconds, 3),
        "images_per_s": round(summary.images_per_s, 2),
        "steady_images_per_s": round(summary.steady_images_per_s, 2) if summary.steady_images_per_s else None,
        "first_row_on_disk_s": round(first_row_s, 3) if first_row_s is not None else None,
        "startup_s": {"ray_up": round(ray_up, 3),
                      "first_row_after_ray": round(first_row_s - ray_up, 3) if first_row_s is not None else None},
        "latency_ms": {k: r.percentiles() for k, r in stages.items()},
        "rows_written": writer.rows_written,
        "exit_code": summary.exit_code,
    }
