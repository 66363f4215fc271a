"""The driver without Ray (engine.driver): admission and de-duplication, least-busy dispatch, the tally,
finalize, and an interrupted run, driven with a fake predictor pool."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from covidct.engine.contract import Contract
from covidct.engine.driver import BatchFailed, Driver, RunContext
from covidct.engine.exits import Exit
from covidct.engine.pipeline import ScreenConfig, _chunks
from covidct.engine.rows import Row, Status
from covidct.engine.sink import DoneIndex, PartWriter
from tests.conftest import read_rows


class Choice:
    model, runtime, precision, isa = "m.onnx", "onnxruntime", "fp32", "AVX2"

    def __init__(self):
        self.notes = []

    def to_dict(self):
        return {"runtime": self.runtime, "precision": self.precision, "isa": self.isa, "cpu_flags": [],
                "notes": self.notes, "source": "fake"}


class FakePool:
    """Predictors that answer in submission order (the oldest batch first) once ``wait`` asks; every
    ``fail``-th batch's worker dies, and ``interrupt_at`` raises Ctrl-C while that batch is read."""

    def __init__(self, total=3, first_wave=1, fail=None, interrupt_at=None):
        self.total, self.first_wave, self.size = total, first_wave, 0
        self.fail, self.interrupt_at = fail, interrupt_at
        self.batches: dict[int, tuple[list, int]] = {}
        self.loads_at_submit: list[tuple[int, list[int]]] = []
        self.driver: Driver | None = None

    def start(self, n):
        self.size = max(self.size, min(n, self.total))

    def prepare(self, items):
        return items

    def submit(self, batch, predictor):
        ref = len(self.batches)
        self.loads_at_submit.append((predictor, [self.driver.load[i] for i in range(self.size)]))
        self.batches[ref] = (batch, predictor)
        return ref

    def wait(self, refs, n):
        return sorted(refs)[:n]

    def result(self, ref):
        if self.interrupt_at is not None and ref == self.interrupt_at:
            raise KeyboardInterrupt
        if self.fail and ref % self.fail == self.fail - 1:
            raise BatchFailed("RayActorError")
        items, predictor = self.batches[ref]
        return [Row(path=p, file_size=size, mtime_ns=mtime, key=key, file_id=fid, status=Status.OK, probability=0.7,
                    label="pos", positive=True, threshold=0.5, model_sha256="0" * 64, provider=f"fake{predictor}",
                    run_id="s00000001-x", read_ms=0.1, decode_ms=1.0, infer_ms=0.5)
                for p, size, mtime, key, fid in items]

    def ready(self, i):
        return {"provider": "fake", "note": None}


def _driver(tmp_path: Path, inputs, pool: FakePool, max_in_flight=6, batch=4) -> Driver:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    cfg = ScreenConfig(inputs=tuple(str(i) for i in inputs), model=tmp_path / "m.onnx", out=out, progress=False,
                       batch_size=batch)
    contract = Contract(image_size=(32, 32), class_names=("neg", "pos"), positive_class="pos", threshold=0.5)
    now = time.monotonic()
    ctx = RunContext(cfg, contract, "0" * 64, "s00000001-x", out, None, Choice(), time.time(), now, now)
    plan = {"max_in_flight": max_in_flight, "nodes": 1, "cpus": 2, "gpus": 0, "inference_threads": 1}
    writer = PartWriter(out / "predictions", ctx.run_id, rows_per_part=1000, max_seconds=3600)
    d = Driver(ctx, pool, writer, DoneIndex(np.zeros(0, np.int64)), plan, lock_lost=lambda: False)
    pool.driver = d
    return d


def _files(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"f{i:02d}.png").write_bytes(b"x" * (i + 1))
    return sorted(root.iterdir())


def _batches(size):
    return lambda admitted: _chunks(admitted, size)


def test_each_file_once_however_it_is_named_and_dispatch_to_the_least_busy(tmp_path):
    files = _files(tmp_path / "data", 24)
    pool = FakePool(total=3, first_wave=1)
    d = _driver(tmp_path, [tmp_path / "data", f"{tmp_path / 'data'}/", files[0], files[5]], pool)
    summary = d.run(_batches(2))
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 24 and rows.path.nunique() == 24 and summary.counts["ok"] == 24
    # one predictor until the first rows are written, then all three; each batch to a least busy one
    assert pool.size == 3 and {p for p, _ in pool.loads_at_submit} == {0, 1, 2}
    for predictor, loads in pool.loads_at_submit:
        assert loads[predictor] == min(loads), (predictor, loads)
    assert not d.in_flight and all(v == 0 for v in d.load.values())


def test_the_tally_and_finalize_count_what_was_written_and_a_dead_worker_is_internal_rows(tmp_path):
    _files(tmp_path / "data", 10)
    d = _driver(tmp_path, [tmp_path / "data"], FakePool(total=2, first_wave=2, fail=3))
    summary = d.run(_batches(2))
    rows = read_rows(tmp_path / "out")
    internal = rows[rows.reason == "internal"]
    assert len(rows) == 10 and len(internal) == 2 and internal.message.str.contains("RayActorError").all()
    assert summary.counts == {"ok": 8, "error": 2} and summary.labels == {"pos": 8}
    assert summary.reasons == {("error", "internal"): 2} and summary.exit_code == Exit.FILE_ERRORS
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["state"] == "complete" and run["counts"]["ok"] == 8 and run["files_found"] == 10
    assert run["latency_ms"]["decode_ms"]["p50"] == pytest.approx(1.0) and run["rows_written"] == 10


def test_an_interrupted_run_keeps_its_parts_records_it_and_reraises(tmp_path):
    _files(tmp_path / "data", 12)
    d = _driver(tmp_path, [tmp_path / "data"], FakePool(total=1, first_wave=1, interrupt_at=3), max_in_flight=2)
    d.writer.rows_per_part = 1  # a part for each batch
    with pytest.raises(KeyboardInterrupt):
        d.run(_batches(2))
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["state"] == "interrupted"
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 6 and rows.path.nunique() == 6  # batches 0-2, whole; nothing of the rest
    assert not list((tmp_path / "out" / "predictions").glob("*.tmp"))


def test_nothing_found_is_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    summary = _driver(tmp_path, [tmp_path / "empty"], FakePool()).run(_batches(2))
    assert summary.exit_code == Exit.BAD_INPUT and summary.counts == {}
