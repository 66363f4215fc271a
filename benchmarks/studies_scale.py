"""Studies and the report at archive scale: time and peak RSS of ``covidct-report``'s work
(engine.report.build_report) over synthetic prediction parts of 1 and 10 million rows.

The parts have the project's own row schema (engine.sink.SCHEMA): half DICOM rows grouped by
their UIDs, half PNG rows grouped by folder, ~300 slices per study, 1% error rows, a second run
that re-predicts 1% of the files (so the newest-row rule has work), thumbnails on 0.2% of rows.
Each size runs in its own process; its peak RSS is that process's ``ru_maxrss`` (wait4).

    python -m benchmarks.studies_scale                 # 1M and 10M rows, writes benchmarks/results/
    python -m benchmarks.studies_scale --rows 200000   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from covidct.engine.runtimes import cpu_flags
from covidct.engine.shift import STATS, Histograms
from covidct.engine.sink import PREDICTIONS, SCHEMA

RESULTS = Path(__file__).resolve().parent / "results"
SHA = "ab" * 32
SLICES_PER_STUDY = 300


def _part(rng: np.random.Generator, idx: np.ndarray, run_id: str) -> pa.Table:
    """Rows of the files numbered ``idx``, as one run of covidct-batch writes them."""
    n = len(idx)
    study = idx // SLICES_PER_STUDY
    dicom = study % 2 == 0
    series = (idx // (SLICES_PER_STUDY // 3)) % 3
    path = [f"/archive/{'dcm' if d else 'png'}/patient{s:07d}/series{r}/slice{i:09d}.{'dcm' if d else 'png'}"
            for s, r, i, d in zip(study.tolist(), series.tolist(), idx.tolist(), dicom.tolist())]
    status = np.where(rng.random(n) < 0.01, "error", "ok")
    ok = status == "ok"
    prob = np.where(ok, rng.beta(0.6, 1.4, n), np.nan).astype(np.float32)
    uid = lambda prefix, v: [f"1.2.826.0.1.3680043.{prefix}.{x}" if d else None  # noqa: E731
                             for x, d in zip(v.tolist(), dicom.tolist())]
    thumb = rng.random(n) < 0.002
    cols = {
        "path": path, "status": status.tolist(), "reason": np.where(ok, None, "corrupt").tolist(),
        "message": np.where(ok, None, "PNG stream is corrupt").tolist(), "probability": prob,
        "label": np.where(ok, np.where(prob >= 0.5, "pos", "neg"), None).tolist(),
        "positive": pa.array(np.where(ok, prob >= 0.5, False), mask=~ok), "threshold": np.full(n, 0.5, np.float32),
        "model_sha256": [SHA] * n, "provider": ["CPUExecutionProvider"] * n,
        "read_ms": rng.random(n).astype(np.float32), "decode_ms": rng.random(n).astype(np.float32),
        "infer_ms": rng.random(n).astype(np.float32), "file_size": np.full(n, 120_000, np.int64),
        "mtime_ns": np.full(n, 1_700_000_000_000_000_000, np.int64), "run_id": [run_id] * n, "node": ["0" * 12] * n,
        "key": rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64), "study_uid": uid("1", study),
        "series_uid": uid("2", study * 3 + series), "sop_uid": uid("3", idx),
        "instance_number": pa.array(np.where(dicom, idx % SLICES_PER_STUDY, 0).astype(np.int32), mask=~dicom),
        "slice_position": pa.array((idx % SLICES_PER_STUDY).astype(np.float64), mask=~dicom),
        "frame": pa.array(np.zeros(n, np.int32), mask=~dicom),
        "thumbnail": [b"\xff\xd8" + bytes(2000) if t else None for t in thumb.tolist()],
        "framing": [None] * n,
        "dark_anchor": rng.normal(40, 10, n).astype(np.float32), "tissue_anchor": rng.normal(150, 20, n).astype(np.float32),
        "lung_fraction": rng.random(n).astype(np.float32), "input_mean": rng.normal(110, 15, n).astype(np.float32),
        "input_detail": rng.normal(12, 3, n).astype(np.float32), "path_bytes": [None] * n,
    }
    for k in STATS:
        cols[k] = pa.array(cols[k], mask=~ok)
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def make_out_dir(out: Path, rows: int, part_rows: int = 200_000, seed: int = 0) -> None:
    """An OUT_DIR with ``rows`` prediction rows (plus a 1% rerun) and a run.json, as covidct-batch leaves it."""
    rng = np.random.default_rng(seed)
    pred = out / PREDICTIONS
    pred.mkdir(parents=True)
    for seq, start in enumerate(range(0, rows, part_rows)):
        pq.write_table(_part(rng, np.arange(start, min(rows, start + part_rows)), "20261101T000000Z-aaaaaa"),
                       pred / f"part-20261101T000000Z-aaaaaa-{seq:05d}.parquet", compression="zstd")
    again = rng.choice(rows, max(1, rows // 100), replace=False)  # a later run re-predicts changed files
    for seq, start in enumerate(range(0, len(again), part_rows)):
        t = _part(rng, np.sort(again[start:start + part_rows]), "20261102T000000Z-bbbbbb")
        pq.write_table(t, pred / f"part-20261102T000000Z-bbbbbb-{seq:05d}.parquet", compression="zstd")
    ref = Histograms()
    for _ in range(200):
        ref.add({"dark_anchor": rng.normal(40, 10), "tissue_anchor": rng.normal(150, 20),
                 "lung_fraction": rng.random(), "input_mean": rng.normal(110, 15), "input_detail": rng.normal(12, 3)},
                rng.random())
    run = {"run_id": "20261102T000000Z-bbbbbb", "state": "complete", "started": "2026-11-02T00:00:00+00:00",
           "ended": "2026-11-02T01:00:00+00:00", "config": {"top_k": 3, "group_by": "parent"},
           "model": {"path": "model.onnx", "sha256": SHA,
                     "contract": {"threshold": 0.5, "positive_class": "pos", "reference": ref.to_reference("synthetic")}},
           "execution_providers": ["CPUExecutionProvider"], "latency_ms": {},
           "counts": {"ok": 0, "error": 0, "skipped": 0, "already_done": rows, "by_label": {}, "by_reason": []},
           "images_per_s": 0.0, "seconds": 0.0, "exit_code": 0}
    (out / "run.json").write_text(json.dumps(run))


def child(out: Path) -> None:
    from covidct.engine.report import build_report

    t = time.perf_counter()
    st = build_report(out)
    print(json.dumps({"seconds": time.perf_counter() - t, "studies": st["studies"], "flagged": st["flagged"]}))


def measure(rows: int, work: Path) -> dict:
    out = work / f"out-{rows}"
    t = time.perf_counter()
    make_out_dir(out, rows)
    made = time.perf_counter() - t
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.studies_scale", "--child", str(out)],
                            stdout=subprocess.PIPE, text=True)
    t = time.perf_counter()
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"build_report failed on {rows:,} rows (exit {proc.returncode})")
    res = json.loads(stdout.strip().splitlines()[-1])
    size = sum(p.stat().st_size for p in (out / PREDICTIONS).glob("*.parquet"))
    shutil.rmtree(out)
    return {"rows": rows, "rows_with_rerun": rows + max(1, rows // 100), "parts_mb": round(size / 2**20, 1),
            "build_seconds": round(res["seconds"], 2), "process_seconds": round(wall, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "studies": res["studies"], "flagged": res["flagged"],
            "made_in_s": round(made, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args()
    if a.child:
        return child(a.child)
    work = Path(tempfile.mkdtemp(prefix="studies-scale-", dir=a.work))
    try:
        runs = [measure(n, work) for n in a.rows]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = runs[0]
    for r in runs:
        r["rss_vs_first"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 3)
        r["time_per_million_rows_s"] = round(r["build_seconds"] / (r["rows"] / 1e6), 2)
    first, last = runs[0], runs[-1]
    report = {
        "what": "covidct-report's work (engine.report.build_report: current rows, studies.parquet, report.html) "
                "over synthetic prediction parts with the project's schema; each size in its own process",
        "machine": {"cpus": os.cpu_count(), "cpu_flags": cpu_flags(), "python": platform.python_version()},
        "runs": runs,
        "targets": {"peak_rss_ratio_largest_vs_first <= 1.2": last["rss_vs_first"] <= 1.2,
                    "time_per_row_ratio_largest_vs_first <= 1.5 (linear)":
                        last["time_per_million_rows_s"] / first["time_per_million_rows_s"] <= 1.5},
    }
    lines = [f"# Studies and report at archive scale ({os.cpu_count()} CPUs, flags {' '.join(cpu_flags())})", "",
             report["what"] + ".", "",
             "| rows | parts (MB) | build (s) | s per million rows | peak RSS (MB) | RSS vs first | studies |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['rows']:,} | {r['parts_mb']} | {r['build_seconds']} | {r['time_per_million_rows_s']} | "
              f"{r['peak_rss_mb']} | {r['rss_vs_first']}x | {r['studies']:,} |" for r in runs]
    lines += ["", "Targets: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in report["targets"].items()),
              "", "Command: `python -m benchmarks.studies_scale`"]
    print("\n".join(lines))
    if not a.no_save:
        name = f"studies-scale-{os.cpu_count()}core"
        (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
