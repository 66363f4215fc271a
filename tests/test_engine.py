"""covidct-batch end to end through its CLI: bad inputs as rows, resumability, parity, Ray runtime."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from covidct.engine.contract import read_contract
from covidct.engine.decode import decode_file
from benchmarks.compare import kill_session as _kill_session
from benchmarks.compare import session_pids as _session_pids
from tests.conftest import ROOT, read_rows, run_cli, tiny_model

SIZE = (64, 64)


def _write(path: Path, data: bytes | np.ndarray, ext: str = ".png") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, np.ndarray):
        ok, buf = cv2.imencode(ext, data)
        data = buf.tobytes()
    path.write_bytes(data)
    return path


@pytest.fixture
def archive(tmp_path):
    """Nested folders of good images in every format and every kind of bad input."""
    import pydicom.data

    rng = np.random.default_rng(0)
    root = tmp_path / "archive"
    grey = lambda: rng.integers(0, 256, (90, 70), dtype=np.uint8)  # noqa: E731
    good = {
        "a/one.png": (grey(), ".png"),
        "a/b/two.jpg": (grey(), ".jpg"),
        "a/b/c/three.bmp": (grey(), ".bmp"),
        "a/four.tiff": (grey(), ".tiff"),
        "päth with spaces/ünïcode slice (1).png": (grey(), ".png"),
        "rgba.png": (cv2.merge([grey()] * 3 + [np.full((90, 70), 255, np.uint8)]), ".png"),
        "sixteen.png": (grey().astype(np.uint16) * 257, ".png"),
        "no_extension": (grey(), ".png"),
    }
    for name, (img, ext) in good.items():
        _write(root / name, img, ext)
    _write(root / "dicom" / "scan.dcm", Path(pydicom.data.get_testdata_file("CT_small.dcm", download=False)).read_bytes())
    ok, jpg = cv2.imencode(".jpg", grey())
    bad = {
        "bad/empty.png": (b"", "error", "empty"),
        "bad/truncated.jpg": (jpg.tobytes()[:400], "error", "truncated"),
        "bad/corrupt.png": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 300, "error", "corrupt"),
        "bad/notes.txt": (b"radiology notes\n", "skipped", "not_an_image"),
        "bad/.DS_Store": (b"\x00\x00\x00\x01Bud1" + b"\x00" * 100, "skipped", "not_an_image"),
        "bad/bomb.png": (_bomb(), "error", "too_large"),
    }
    for name, (data, _, _) in bad.items():
        _write(root / name, data)
    with open(root / "bad" / "enormous.tif", "wb") as f:  # sparse: refused from its size, never read
        f.truncate(600 * 1024 * 1024)
    os.symlink(root / "gone.png", root / "bad" / "dangling.png")
    expected = {str(root / k): ("ok", None) for k in [*good, "dicom/scan.dcm"]}
    expected.update({str(root / k): (s, r) for k, (_, s, r) in bad.items()})
    expected[str(root / "bad" / "enormous.tif")] = ("error", "too_large")
    expected[str(root / "bad" / "dangling.png")] = ("error", "unreadable")
    return root, expected


def _bomb() -> bytes:
    import struct
    import zlib
    ihdr = struct.pack(">IIBBBBB", 90_000, 90_000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
            + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


def screen(*args, **kw):
    return run_cli("covidct-batch", *args, "--no-progress", "--num-cpus", "2", **kw)


def test_every_file_becomes_exactly_one_row_and_reruns_add_none(archive, tmp_path):
    root, expected = archive
    model = tiny_model(tmp_path / "tiny model.onnx", SIZE, threshold=0.5)
    out = tmp_path / "out"
    r = screen(root, "--model", model, "--out", out, "--batch-size", "4")
    assert r.returncode == 1, r.stderr[-3000:]  # error rows exist: exit 1
    rows = read_rows(out)
    assert sorted(rows.path) == sorted(expected)
    for path, (status, reason) in expected.items():
        row = rows[rows.path == path].iloc[0]
        assert (row.status, row.reason if status != "ok" else None) == (status, reason), path
        if status != "ok":
            assert row.message and np.isnan(row.probability)
    ok = rows[rows.status == "ok"]
    # probability = mean grey / 255 of the contract's decode (its preprocessing included)
    kwargs = read_contract(model).decode_kwargs()
    assert kwargs["preprocessing"]["method"] == "lung-crop"
    for _, row in ok.iterrows():
        x = decode_file(row.path, **kwargs)
        assert abs(row.probability - x.mean() / 255.0) < 1e-6
        assert row.positive == (row.probability >= 0.5) and row.label == ("pos" if row.positive else "neg")
    assert set(ok.provider) == {"CPUExecutionProvider"} and (ok.infer_ms >= 0).all()
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["ok"] == len(ok) and run["exit_code"] == 1 and "Research use only" in run["disclaimer"]
    assert run["latency_ms"]["decode_ms"]["p50"] is not None and run["model"]["contract"]["threshold"] == 0.5
    assert "covidct-batch summary" in r.stdout and "Research use only" in r.stdout

    # the rerun adds nothing but the one transient error (the dangling link: its target may come),
    # and its exit code still says that OUT_DIR holds error rows
    again = screen(root, "--model", model, "--out", out)
    assert again.returncode == 1, again.stderr[-2000:]
    retried = read_rows(out)
    assert len(retried) == len(expected) + 1 and (retried.path.value_counts() > 1).sum() == 1
    assert retried.path.value_counts().idxmax() == str(root / "bad" / "dangling.png")
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["already_done"] == len(expected) - 1 and run["current"]["error"] == 6

    # a changed and a new file: only those two are predicted
    changed = root / "a" / "one.png"
    _write(changed, np.zeros((50, 50), np.uint8))
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    _write(root / "a" / "new.png", np.full((40, 40), 200, np.uint8))
    third = screen(root, "--model", model, "--out", out)
    rows = read_rows(out)
    assert len(rows) == len(expected) + 1 + 1 + 2, third.stderr[-2000:]
    versions = rows[rows.path == str(changed)].sort_values("run_id")
    latest = versions.iloc[-1]
    assert latest.mtime_ns != versions.iloc[0].mtime_ns
    assert latest.probability == 0.0  # a black slice: no body, stretched, still black
    assert abs(latest.probability - decode_file(changed, **kwargs).mean() / 255.0) < 1e-6

    fresh = screen(root, "--model", model, "--out", out, "--overwrite")
    assert fresh.returncode == 1 and len(read_rows(out)) == len(expected) + 1


def test_from_list_and_single_files(archive, tmp_path):
    root, expected = archive
    model = tiny_model(tmp_path / "m.onnx", SIZE)
    good = [p for p, (s, _) in expected.items() if s == "ok"][:3]
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(good + good[:1]) + "\n")  # a duplicate line is predicted once
    out = tmp_path / "o"
    r = screen(good[0], "--from-list", lst, "--model", model, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(read_rows(out).path) == sorted(good)


@pytest.mark.parametrize("kind", ["missing", "junk", "no_contract"])
def test_bad_model_fails_before_any_work(archive, tmp_path, kind):
    root, _ = archive
    model = {"missing": lambda: tmp_path / "absent.onnx",
             "junk": lambda: _write(tmp_path / "junk.onnx", b"not a model"),
             "no_contract": lambda: tiny_model(tmp_path / "bare.onnx", with_contract=False)}[kind]()
    out = tmp_path / "o"
    r = screen(root, "--model", model, "--out", out)
    assert r.returncode == 2 and "error" in r.stderr
    assert not (out / "predictions").exists() or not list((out / "predictions").iterdir())


def test_unauthenticated_local_runtime_is_refused(tmp_path, archive):
    root, _ = archive
    r = run_cli("covidct-batch", root, "--model", tiny_model(tmp_path / "m.onnx"), "--out", tmp_path / "o",
                env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert r.returncode == 2 and "unauthenticated" in r.stderr


def test_probabilities_equal_keras(trained_run, tmp_path):
    """The engine's probabilities equal the Keras model's on the same files (|diff| <= 1e-4)."""
    from covidct.engine.contract import read_contract
    from covidct.train.model import load_trained

    out = tmp_path / "o"
    r = screen(trained_run["data"], "--model", trained_run["model"], "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_rows(out).sort_values("path")
    assert len(rows) == 180 and (rows.status == "ok").all()
    c = read_contract(trained_run["model"])
    x = np.stack([decode_file(p, **c.decode_kwargs()) for p in rows.path])[..., None]
    keras_p = load_trained(trained_run["run"] / "model.keras", c.image_size, c.architecture).predict(
        x.astype(np.float32), verbose=0)[:, 0]
    assert np.abs(rows.probability.to_numpy() - keras_p).max() <= 1e-4
    # labels agree, except where Keras' probability lies within float noise of the threshold
    # (the export's parity rule): a saturated 1.0 may itself be the threshold
    same = rows.label.to_numpy() == np.where(keras_p >= c.threshold, "Infected", "Not_Infected")
    assert (same | (np.abs(keras_p - c.threshold) <= 1e-4)).all()


# ----------------------------------------------------------------- killing things


def _many_jpegs(root: Path, n: int) -> None:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (256, 256), dtype=np.uint8)
    for i in range(n):
        img = np.roll(base, i, axis=1)
        cv2.imwrite(str(root / f"d{i % 7}" / f"s{i:05d}.jpg") if (root / f"d{i % 7}").is_dir()
                    else _mk(root / f"d{i % 7}") / f"s{i:05d}.jpg", img)


def _mk(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d


def _start(args) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).parent / "covidct-batch"), *map(str, args), "--no-progress",
                             "--num-cpus", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(cond, timeout=120.0):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow  # a crash-consistency kill: about half a minute on 2 cores
def test_sigkill_midway_then_resume_loses_nothing_and_duplicates_nothing(tmp_path):
    root = _mk(tmp_path / "arch")
    n = 1500
    _many_jpegs(root, n)
    model = tiny_model(tmp_path / "m.onnx", SIZE)
    out, ref = tmp_path / "o", tmp_path / "ref"
    args = [root, "--model", model, "--batch-size", "4", "--max-in-flight", "1", "--rows-per-part", "8"]
    proc = _start([*args, "--out", out])
    try:
        parts = lambda: list((out / "predictions").glob("part-*.parquet")) if (out / "predictions").is_dir() else []  # noqa
        assert _wait_for(lambda: len(parts()) >= 3), proc.stderr.read()[-2000:] if proc.poll() is not None else ""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        _kill_session(proc.pid)
    partial = len(read_rows(out))
    assert 0 < partial < n, "the kill came too late to test anything"
    assert (out / ".covidct-batch.lock").exists()  # the killed run's lock, and its record
    assert json.loads((out / "run.json").read_text())["state"] == "running"
    r = screen(*args, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "took over a stale lock" in r.stderr
    rows = read_rows(out)
    assert len(rows) == n and rows.path.is_unique
    assert json.loads((out / "run.json").read_text())["counts"]["already_done"] == partial
    assert not list((out / "predictions").glob("*.tmp"))
    r = screen(root, "--model", model, "--out", ref)
    whole = read_rows(ref).set_index("path").probability
    assert (rows.set_index("path").probability.reindex(whole.index) == whole).all()


@pytest.mark.slow  # a crash-consistency kill
def test_predictor_actor_killed_midrun_loses_nothing(tmp_path):
    root = _mk(tmp_path / "arch")
    n = 1200
    _many_jpegs(root, n)
    model = tiny_model(tmp_path / "m.onnx", SIZE)
    out = tmp_path / "o"
    proc = _start([root, "--model", model, "--out", out, "--batch-size", "4", "--max-in-flight", "1",
                   "--rows-per-part", "8"])
    killed = []
    try:
        def actor_pid():
            for pid in _session_pids(proc.pid):
                try:
                    if (Path("/proc") / str(pid) / "cmdline").read_bytes().startswith(b"ray::PredictorActor"):
                        return pid
                except OSError:
                    pass
            return None

        parts = lambda: list((out / "predictions").glob("part-*.parquet")) if (out / "predictions").is_dir() else []  # noqa
        assert _wait_for(lambda: len(parts()) >= 2 and actor_pid() is not None)
        pid = actor_pid()
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        _kill_session(proc.pid)
    assert proc.returncode == 0, stderr[-3000:]
    rows = read_rows(out)
    assert len(rows) == n and rows.path.is_unique and (rows.status == "ok").all()
    assert json.loads((out / "run.json").read_text())["counts"]["already_done"] == 0


def _helper(mode: str, env: dict) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-m", "tests.raynode", mode], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    line = p.stdout.readline()
    assert line.startswith("ADDRESS"), f"{mode} runtime did not start"
    return p, line.split()[1]


def _stop(p: subprocess.Popen) -> None:
    try:
        p.stdin.close()
        p.wait(60)
    except subprocess.TimeoutExpired:
        pass
    finally:
        _kill_session(p.pid)


def test_local_runtime_requires_its_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    local, address = _helper("local", env)
    try:
        def client(extra):  # started at once, all three: each waits on Ray's own connection timeouts
            return subprocess.Popen([sys.executable, "-m", "tests.raynode", "client", address], cwd=ROOT,
                                    env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def ended(proc):
            try:
                out, err = proc.communicate(timeout=120)
            finally:
                proc.kill()
            return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        procs = [client({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}),
                 client({"RAY_AUTH_MODE": "disabled"}),
                 client({"RAY_AUTH_MODE": "token"})]  # reads the token Ray generated in ~/.ray/auth_token
        wrong, none, right = (ended(p) for p in procs)
        assert wrong.returncode == 3 and "REFUSED" in wrong.stdout
        assert none.returncode == 3 and "REFUSED" in none.stdout
        assert right.returncode == 0 and "NODES 1" in right.stdout, right.stdout + right.stderr[-1000:]
    finally:
        _stop(local)


@pytest.mark.slow  # four local runtimes started and ended: about half a minute on 2 cores
def test_the_engines_local_runtime_is_leaner_and_ends_faster_than_rays_defaults_and_leaves_no_process():
    """The engine's local runtime starts without Ray's autoscaler monitor, log monitor and API server
    (``engine.cluster._lean_local_runtime``), which Ray's defaults start; Ray's own shutdown also waits a second for the
    monitor, which does not answer SIGTERM in that time. Both are run here, one after the other, on the same
    machine, twice each (the faster of two: on a loaded 2-core machine the GCS itself sometimes takes a second to
    stop, in either path), and neither leaves a process behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    seconds, codes, services = {}, {}, {}
    for mode in ("ray-default", "local-engine-shutdown") * 2:
        p, _ = _helper(mode, env)
        try:
            out, _ = p.communicate(input="", timeout=120)
            assert _wait_for(lambda: not _session_pids(p.pid), timeout=30), _session_pids(p.pid)
        finally:
            _kill_session(p.pid)
        lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
        words = lines["SHUTDOWN_S"]
        seconds[mode] = min(seconds.get(mode, float("inf")), float(words[0]))
        rc = words[words.index("MONITOR_RC") + 1:]
        assert codes.setdefault(mode, rc) == rc, (mode, rc, codes)
        assert services.setdefault(mode, lines["SERVICES"]) == lines["SERVICES"], (mode, lines, services)
    assert services == {"ray-default": ["api-server", "autoscaler-monitor", "log-monitor"],
                        "local-engine-shutdown": []}, services
    # Ray's own path ends its monitor with SIGKILL, after a second's grace; the engine's has none to end
    assert codes == {"ray-default": [str(-signal.SIGKILL)], "local-engine-shutdown": []}, codes
    assert seconds["local-engine-shutdown"] < 0.7 * seconds["ray-default"], seconds


@pytest.mark.slow  # starts a head and a second node: about half a minute on 2 cores
def test_two_node_cluster_with_token_through_address(tmp_path, archive):
    root, expected = archive
    token = os.urandom(16).hex()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    cluster, address = _helper("cluster", env)
    try:
        model = tiny_model(tmp_path / "m.onnx", SIZE)
        out = tmp_path / "o"
        r = run_cli("covidct-batch", root, "--model", model, "--out", out, "--address", address, "--no-progress",
                    "--batch-size", "2", env=env)
        assert r.returncode == 1, r.stderr[-3000:]
        rows = read_rows(out)
        assert sorted(rows.path) == sorted(expected)
        run = json.loads((out / "run.json").read_text())
        assert run["workers"]["nodes"] == 2 and run["workers"]["predictors"] == 2
        assert rows[rows.status == "ok"].node.nunique() == 2  # both nodes predicted
        bad = run_cli("covidct-batch", root, "--model", model, "--out", tmp_path / "o2", "--address", address,
                      env={**env, "RAY_AUTH_TOKEN": "wrong"})
        assert bad.returncode == 2 and "token" in bad.stderr
        assert not (tmp_path / "o2" / "predictions").exists() or not list((tmp_path / "o2" / "predictions").iterdir())
    finally:
        _stop(cluster)


def test_unreachable_address_exits_2_in_seconds(tmp_path, archive):
    import socket
    root, _ = archive
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.monotonic()
    r = run_cli("covidct-batch", root, "--model", tiny_model(tmp_path / "m.onnx", SIZE), "--out", tmp_path / "o",
                "--address", f"127.0.0.1:{port}", "--no-progress", timeout=120)
    assert r.returncode == 2 and "cannot reach the Ray cluster" in r.stderr, r.stderr[-2000:]
    assert time.monotonic() - t < 30


def test_a_stale_current_cluster_file_does_not_break_local_runs_and_the_token_file_is_private(tmp_path, archive):
    root, _ = archive
    marker = Path("/tmp/ray/ray_current_cluster")
    saved = marker.read_bytes() if marker.exists() else None
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("127.0.0.1:1\n")  # what a killed `ray start` leaves behind
    try:
        r = screen(root, "--model", tiny_model(tmp_path / "m.onnx", SIZE), "--out", tmp_path / "o")
    finally:
        if saved is None:
            marker.unlink(missing_ok=True)
        else:
            marker.write_bytes(saved)
    assert r.returncode == 1, r.stderr[-2000:]  # the archive's error rows: the run itself went through
    token = Path.home() / ".ray" / "auth_token"
    if token.exists():
        assert token.stat().st_mode & 0o077 == 0, oct(token.stat().st_mode)


def test_a_cluster_without_authentication_is_refused_unless_allowed(tmp_path, archive):
    root, expected = archive
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_AUTH_TOKEN", None)
    cluster, address = _helper("cluster", env)
    try:
        model = tiny_model(tmp_path / "m.onnx", SIZE)
        driver_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        r = run_cli("covidct-batch", root, "--model", model, "--out", tmp_path / "o", "--address", address,
                    "--no-progress", env=driver_env)
        assert r.returncode == 2 and "without authentication" in r.stderr, r.stderr[-2000:]
        assert not list((tmp_path / "o" / "predictions").glob("*.parquet")) if (tmp_path / "o").exists() else True
        # named as "auto" (through RAY_ADDRESS, as Ray resolves it), the same cluster gets the same check
        auto = run_cli("covidct-batch", root, "--model", model, "--out", tmp_path / "o", "--address", "auto",
                       "--no-progress", env={**driver_env, "RAY_ADDRESS": address})
        assert auto.returncode == 2 and "without authentication" in auto.stderr, auto.stderr[-2000:]
        ok = run_cli("covidct-batch", root, "--model", model, "--out", tmp_path / "o", "--address", address,
                     "--no-progress", "--allow-unauthenticated-cluster", env=driver_env)
        assert ok.returncode == 1, ok.stderr[-2000:]  # the archive's error rows
        assert sorted(read_rows(tmp_path / "o").path) == sorted(expected)
    finally:
        _stop(cluster)


def test_the_lean_runtime_switches_are_put_back_after_ray_starts_or_fails():
    """``_lean_local_runtime`` changes Ray's RayParams and Node only while ray.init runs: a cluster a test or a
    later run starts itself gets Ray's defaults."""
    from ray._private import node as ray_node
    from ray._private import parameter

    from covidct.engine.cluster import _lean_local_runtime

    before = parameter.RayParams.__init__, ray_node.Node.start_api_server
    with pytest.raises(RuntimeError):
        with _lean_local_runtime(log_monitor=False):
            params = parameter.RayParams(num_cpus=1)
            assert (params.no_monitor, params.include_log_monitor) == (True, False)
            assert ray_node.Node.start_api_server(None, include_dashboard=False, raise_on_failure=False) is None
            raise RuntimeError("ray.init failed")
    assert (parameter.RayParams.__init__, ray_node.Node.start_api_server) == before
    with _lean_local_runtime(log_monitor=True):
        assert parameter.RayParams(num_cpus=1).include_log_monitor is True
    params = parameter.RayParams(num_cpus=1)
    assert not params.no_monitor and params.include_log_monitor is None
