"""Runtime and precision choice (engine.runtimes): parity, measured choice, fallbacks, cache, CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from covidct.engine import runtimes
from covidct.engine.contract import Contract
from covidct.engine.predictor import Predictor
from tests.conftest import read_rows, run_cli, tiny_model

SIZE = (32, 32)
NO_FAST_PATHS = ["avx2", "fma"]
SAPPHIRE_RAPIDS = ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
needs_openvino = pytest.mark.skipif(not runtimes.openvino_installed(), reason="OpenVINO is not installed "
                                    "(pip install 'covidct-batch[openvino]')")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def models(tmp_path):
    """A tiny FP32 model and its INT8 twin (same graph; its contract says int8)."""
    c = Contract(image_size=SIZE, class_names=("neg", "pos"), positive_class="pos", threshold=0.5)
    fp32 = tiny_model(tmp_path / "m.onnx", SIZE, contract=c)
    int8 = tiny_model(runtimes.int8_twin(fp32), SIZE, contract=dataclasses.replace(c, precision="int8"))
    return fp32, int8


def test_isa_names_the_fast_path_each_precision_has():
    assert runtimes.isa("fp32", NO_FAST_PATHS) == "AVX2+FMA"
    assert runtimes.isa("int8", NO_FAST_PATHS) == "AVX2 (no VNNI)"
    assert runtimes.isa("bf16", NO_FAST_PATHS).startswith("none")
    assert runtimes.isa("int8", SAPPHIRE_RAPIDS) == "AMX-INT8"
    assert runtimes.isa("int8", ["avx2", "fma", "avx_vnni"]) == "AVX-VNNI"
    assert runtimes.isa("bf16", ["avx512f", "avx512_bf16"]) == "AVX-512 BF16"
    assert runtimes.isa("fp32", SAPPHIRE_RAPIDS) == "AVX-512"


def test_cpu_flags_are_read_from_this_machine():
    with open("/proc/cpuinfo") as f:
        have = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    assert runtimes.cpu_flags() == [f for f in runtimes.CPU_FLAGS if f in have]


def test_forced_onnxruntime_is_not_measured(models):
    c = runtimes.choose(models[0], runtime="onnxruntime")
    assert (c.runtime, c.precision, c.source, c.measured) == ("onnxruntime", "fp32", "forced", {})


@needs_openvino
def test_openvino_reads_the_same_file_and_contract_and_agrees(models):
    x = np.random.default_rng(0).integers(0, 256, (5, *SIZE, 1), dtype=np.uint8)
    ort_p = Predictor(str(models[0]), 1, "cpu")
    ov_p = Predictor(str(models[0]), 1, "cpu", runtime="openvino")
    assert ov_p.contract == ort_p.contract and ov_p.provider == "OpenVINO:CPU"
    expected = x.reshape(5, -1).mean(axis=1) / 255  # the tiny model's output, computed independently
    assert np.allclose(ov_p.predict(x)[0], expected, atol=1e-5)
    assert np.allclose(ort_p.predict(x)[0], expected, atol=1e-5)


@needs_openvino
def test_auto_measures_both_runtimes_checks_parity_and_caches(models):
    first = runtimes.choose(models[0], runtime="auto")
    assert first.source == "measured"
    assert set(first.measured) == {"onnxruntime/fp32", "openvino/fp32"}
    assert all(v > 0 for v in first.measured.values())
    assert first.parity["openvino/fp32"] <= runtimes.PARITY_TOLERANCE
    # OpenVINO only when measured MARGIN faster; a tie keeps ONNX Runtime
    m = first.measured
    expect_ov = m["openvino/fp32"] >= runtimes.MARGIN * m["onnxruntime/fp32"]
    assert first.runtime == ("openvino" if expect_ov else "onnxruntime")
    again = runtimes.choose(models[0], runtime="auto")
    assert again.source == "cache" and again.runtime == first.runtime and again.measured == first.measured


def test_bf16_without_the_instructions_says_so_and_runs_fp32(models, monkeypatch):
    monkeypatch.setattr(runtimes, "cpu_flags", lambda: NO_FAST_PATHS)
    c = runtimes.choose(models[0], precision="bf16")
    assert c.precision == "fp32" and c.model == str(models[0])
    assert any("no BF16 instructions" in n for n in c.notes)


def test_int8_without_its_twin_fails_before_work(tmp_path):
    fp32 = tiny_model(tmp_path / "alone.onnx", SIZE)
    with pytest.raises(runtimes.RuntimeChoiceError, match="covidct-export --int8"):
        runtimes.choose(fp32, precision="int8")


def test_int8_measured_slower_falls_back_to_fp32_and_says_so(models, monkeypatch):
    monkeypatch.setattr(runtimes, "cpu_flags", lambda: NO_FAST_PATHS)
    slow_int8 = {"onnxruntime/int8": 50.0, "openvino/int8": 60.0, "onnxruntime/fp32": 100.0, "openvino/fp32": 90.0}
    monkeypatch.setattr(runtimes, "speeds", lambda backends, x, **kw: {k: slow_int8[k] for k in backends})
    c = runtimes.choose(models[0], precision="int8", use_cache=False)
    assert (c.runtime, c.precision, c.model) == ("onnxruntime", "fp32", str(models[0]))
    assert any("no VNNI" in n for n in c.notes) and any("running FP32 instead" in n for n in c.notes)


def test_int8_measured_faster_is_kept_with_its_twin(models, monkeypatch):
    monkeypatch.setattr(runtimes, "cpu_flags", lambda: SAPPHIRE_RAPIDS)
    fast_int8 = {"onnxruntime/int8": 150.0, "openvino/int8": 300.0, "onnxruntime/fp32": 100.0, "openvino/fp32": 98.0}
    monkeypatch.setattr(runtimes, "speeds", lambda backends, x, **kw: {k: fast_int8[k] for k in backends})
    c = runtimes.choose(models[0], precision="int8", use_cache=False)
    assert c.precision == "int8" and c.model == str(models[1]) and c.isa == "AMX-INT8"
    best = "openvino" if runtimes.openvino_installed() else "onnxruntime"
    assert c.runtime == best and not any("VNNI" in n for n in c.notes)


@needs_openvino
def test_bf16_asked_on_a_bf16_cpu_runs_bf16_even_when_measured_slower(models, monkeypatch):
    monkeypatch.setattr(runtimes, "cpu_flags", lambda: SAPPHIRE_RAPIDS)
    slow_bf16 = {"openvino/bf16": 90.0, "onnxruntime/fp32": 100.0, "openvino/fp32": 99.0}
    monkeypatch.setattr(runtimes, "speeds", lambda backends, x, **kw: {k: slow_bf16[k] for k in backends})
    c = runtimes.choose(models[0], precision="bf16", use_cache=False)
    assert (c.runtime, c.precision, c.model) == ("openvino", "bf16", str(models[0]))
    assert any("running BF16 as asked" in n and "90" in n for n in c.notes)


def test_a_runtime_out_of_parity_is_left_out(models, monkeypatch):
    if not runtimes.openvino_installed():
        pytest.skip("OpenVINO is not installed")
    real_run = runtimes.OpenVinoBackend.run
    monkeypatch.setattr(runtimes.OpenVinoBackend, "run", lambda self, x: real_run(self, x) + 0.01)
    c = runtimes.choose(models[0], use_cache=False)
    assert c.runtime == "onnxruntime" and "openvino/fp32" not in c.measured
    assert any("differ from ONNX Runtime" in n for n in c.notes)


@needs_openvino
def test_cli_runs_openvino_and_records_the_choice(models, tmp_path):
    import cv2

    data = tmp_path / "in"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        cv2.imwrite(str(data / f"s{i}.png"), rng.integers(0, 256, (40, 40), dtype=np.uint8))
    out = tmp_path / "out"
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    import os
    r = run_cli("covidct-batch", data, "--model", models[0], "--out", out, "--runtime", "openvino",
                "--precision", "bf16", "--no-progress", "--num-cpus", "1", env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    inf = run["inference"]
    assert inf["runtime"] == "openvino" and inf["cpu_flags"] == runtimes.cpu_flags()
    has_bf16 = any(f in runtimes.cpu_flags() for f in runtimes.BF16_FLAGS)
    assert inf["precision"] == ("bf16" if has_bf16 else "fp32")
    assert run["startup_s"]["ray_up"] > 0 and run["startup_s"]["first_row_after_ray"] > 0
    rows = read_rows(out)
    assert len(rows) == 6 and set(rows["provider"]) == {"OpenVINO:CPU"}
    assert "inference: openvino" in r.stdout and "CPU flags:" in r.stdout
    if not has_bf16:
        assert "no BF16 instructions" in r.stdout
