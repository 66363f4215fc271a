"""Shared fixtures: real data (skipped when absent), tiny ONNX models, one trained+exported run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from covidct.export.tiny import tiny_model  # noqa: F401  (re-exported for the tests)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
BIN = Path(sys.executable).parent

# Keep TensorFlow quiet and single-process-friendly in tests.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def shared_dataset(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"real data {path} is absent (it lives beside the project, never in it)")
    return path


def run_cli(name: str, *args, timeout=600, **kw) -> subprocess.CompletedProcess:
    """Run one of the project's commands in a subprocess (its own session; killed on timeout)."""
    proc = subprocess.Popen([str(BIN / name), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        raise AssertionError(f"{name} timed out after {timeout}s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def read_rows(out_dir: Path):
    import pandas as pd

    parts = sorted((Path(out_dir) / "predictions").glob("part-*.parquet"))
    if not parts:
        return pd.DataFrame()
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A synthetic data set, a short training at 64x64 and an INT8+FP32 export (through the CLIs)."""
    from covidct.train.synthetic import make_dataset

    base = tmp_path_factory.mktemp("trained")
    data = make_dataset(base / "data with spaces", n_per_class=90, seed=1, classes=("Not_Infected", "Infected"),
                        size=(160, 160))
    run = base / "run"
    r = run_cli("covidct-train", data, "--out", run, "--epochs", "25", "--image-size", "64", "--batch-size", "16",
                "--groups", r"p\d+", "--seed", "3")
    assert r.returncode == 0, r.stderr[-4000:]
    model = run / "model.onnx"
    e = run_cli("covidct-export", run, "--out", model, "--int8")
    assert e.returncode == 0, e.stderr[-4000:]
    return {"data": data, "run": run, "model": model, "train_stdout": r.stdout, "export_stdout": e.stdout}


def random_images(n: int, size=(64, 64), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 1), dtype=np.uint8)
