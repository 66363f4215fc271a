"""Nothing lost at archive scale, through the CLI: names that are not UTF-8, one writer per OUT_DIR,
special files, OUT_DIR inside the input, a full disk, and studies/report rebuilt from OUT_DIR alone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from benchmarks.compare import kill_session
from covidct.engine.lock import LOCK, OutDirLock
from covidct.engine.sink import exact_path
from tests.conftest import read_rows, run_cli, tiny_model
from tests.test_engine import _start, _wait_for

SIZE = (64, 64)


def screen(*args, **kw):
    return run_cli("covidct-batch", *args, "--no-progress", "--num-cpus", "2", **kw)


def _png(path: bytes | Path, seed: int) -> None:
    img = np.random.default_rng(seed).integers(0, 256, (80, 60), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", img)
    with open(path, "wb") as f:
        f.write(buf.tobytes())


def _jpegs(root: Path, n: int) -> None:
    base = np.random.default_rng(1).integers(0, 256, (128, 128), dtype=np.uint8)
    for i in range(n):
        d = root / f"d{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(d / f"s{i:05d}.jpg"), np.roll(base, i, axis=1))


# names as old Windows/Samba shares and other locales write them: none is valid UTF-8
HOSTILE = [b"latin1_\xe9.png", b"cp1252_\x80\x99.png", b"shift_jis_\x83e\x83X\x83g.png", b"lone_\xff\xfe.png"]


def test_names_that_are_not_utf8_get_rows_with_their_exact_bytes_and_resume(tmp_path):
    root = tmp_path / "archive"
    root.mkdir()
    broot = os.fsencode(root)
    (sub := broot + b"/dossier_\xe0_\xe7") and os.mkdir(sub)  # a folder whose name is not UTF-8 either
    names = [broot + b"/" + n for n in HOSTILE] + [sub + b"/inner_\xf1.png", broot + b"/plain.png"]
    for i, n in enumerate(names):
        _png(n, i)
    model = tiny_model(tmp_path / "m.onnx", SIZE)
    out = tmp_path / "out"
    r = screen(root, "--model", model, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_rows(out)
    assert len(rows) == len(names) and (rows.status == "ok").all()
    assert sorted(exact_path(p, b) for p, b in zip(rows.path, rows.path_bytes)) == sorted(names)
    for p, b in zip(rows.path, rows.path_bytes):
        p.encode("utf-8")  # every path is valid text, readable: undecodable bytes as \xNN
        assert (b is None) == (p == os.fsdecode(broot + b"/plain.png"))
        if b is not None:
            assert "\\x" in p and os.path.exists(b)
    assert json.loads((out / "run.json").read_text())["state"] == "complete"
    assert (out / "report.html").exists()

    again = screen(root, "--model", model, "--out", out)
    assert again.returncode == 0 and len(read_rows(out)) == len(names)
    assert json.loads((out / "run.json").read_text())["counts"]["already_done"] == len(names)

    # the same names through --from-list (a list is bytes too) are already done as well
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"\n".join(names) + b"\n" + names[0] + b"\n")  # one named twice
    third = screen("--from-list", lst, "--model", model, "--out", tmp_path / "out-list")
    assert third.returncode == 0, third.stderr[-2000:]
    assert len(read_rows(tmp_path / "out-list")) == len(names)


def test_special_files_get_rows_without_being_opened(tmp_path):
    root = tmp_path / "archive"
    root.mkdir()
    _png(root / "good.png", 0)
    os.mkfifo(root / "pipe.png")
    os.symlink("/dev/zero", root / "zero.png")
    os.mkfifo(tmp_path / "elsewhere-fifo")
    os.symlink(tmp_path / "elsewhere-fifo", root / "link-to-fifo.png")
    (tmp_path / "folder").mkdir()
    os.symlink(tmp_path / "folder", root / "link-to-folder")
    os.symlink(root / "missing.png", root / "dangling.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    try:
        model = tiny_model(tmp_path / "m.onnx", SIZE)
        out = tmp_path / "out"
        fifo_direct = tmp_path / "direct-fifo"
        os.mkfifo(fifo_direct)
        lst = tmp_path / "list.txt"
        lst.write_text(f"{tmp_path / 'elsewhere-fifo'}\n")
        r = screen(root, fifo_direct, "--from-list", lst, "--model", model, "--out", out, timeout=300)
    finally:
        sock.close()
    assert r.returncode == 1, r.stderr[-3000:]  # the dangling link is an error row
    rows = read_rows(out).set_index("path")
    expect = {
        root / "good.png": ("ok", None, None),
        root / "pipe.png": ("skipped", "not_a_regular_file", "FIFO"),
        root / "zero.png": ("skipped", "not_a_regular_file", "symbolic link to a character device"),
        root / "link-to-fifo.png": ("skipped", "not_a_regular_file", "symbolic link to a FIFO"),
        root / "link-to-folder": ("skipped", "not_a_regular_file", "symbolic link to a folder"),
        root / "sock": ("skipped", "not_a_regular_file", "socket"),
        root / "dangling.png": ("error", "unreadable", "dangling symbolic link"),
        fifo_direct: ("skipped", "not_a_regular_file", "FIFO"),
        tmp_path / "elsewhere-fifo": ("skipped", "not_a_regular_file", "FIFO"),
    }
    assert sorted(rows.index) == sorted(map(str, expect))
    for path, (status, reason, words) in expect.items():
        row = rows.loc[str(path)]
        assert (row.status, row.reason if status != "ok" else None) == (status, reason), path
        if words:
            assert words in row.message, (path, row.message)


def test_out_dir_inside_the_input_is_never_screened(tmp_path):
    root = tmp_path / "archive"
    root.mkdir()
    for i in range(5):
        _png(root / f"s{i}.png", i)
    model = tiny_model(tmp_path / "m.onnx", SIZE)
    out = root / "results"
    for _ in range(2):
        r = screen(root, "--model", model, "--out", out)
        assert r.returncode == 0, r.stderr[-2000:]
        rows = read_rows(out)
        assert len(rows) == 5 and not rows.path.str.contains("results").any()
    inside = screen(out / "predictions", "--model", model, "--out", out)
    assert inside.returncode == 2 and "inside OUT_DIR" in inside.stderr


def test_corrupt_files_keep_decoder_messages_off_the_console(tmp_path):
    root = tmp_path / "archive"
    root.mkdir()
    ok, png = cv2.imencode(".png", np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8))
    data = bytearray(png.tobytes())
    data[200:260] = b"\x00" * 60  # the IDAT stream breaks: libpng complains on stderr
    (root / "broken.png").write_bytes(bytes(data))
    model = tiny_model(tmp_path / "m.onnx", SIZE)
    r = screen(root, "--model", model, "--out", tmp_path / "o")
    rows = read_rows(tmp_path / "o")
    assert r.returncode == 1 and rows.iloc[0].status == "error"
    assert "libpng" not in r.stderr and "libpng" not in r.stdout, r.stderr[-2000:]


def _slow_run(tmp_path: Path, n: int) -> tuple[Path, list]:
    """OUT_DIR and the arguments of a run over ``n`` JPEGs, slowed down (small batches, one in flight)."""
    root = tmp_path / "archive"
    _jpegs(root, n)
    out = tmp_path / "o"
    return out, [root, "--model", tiny_model(tmp_path / "m.onnx", SIZE), "--out", out, "--batch-size", "4",
                 "--max-in-flight", "1", "--rows-per-part", "8"]


def test_two_runs_on_one_out_dir_one_exits_2_and_no_row_is_written_twice(tmp_path):
    n = 600
    out, args = _slow_run(tmp_path, n)
    first = _start(args)
    try:
        assert _wait_for(lambda: (out / LOCK).exists()), first.stderr.read()[-2000:] if first.poll() is not None else ""
        second = screen(*args)
        assert second.returncode == 2, second.stderr[-2000:]
        assert "in use by another covidct-batch run" in second.stderr and f"pid {first.pid}" in second.stderr
        assert socket.gethostname() in second.stderr
        _, err = first.communicate(timeout=400)
        assert first.returncode == 0, err[-2000:]
    finally:
        kill_session(first.pid)
    rows = read_rows(out)
    assert len(rows) == n and rows.path.is_unique
    assert not (out / LOCK).exists()  # released at the end


def test_a_stale_lock_is_taken_over_and_a_live_one_on_another_host_is_not(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = OutDirLock(out)
    (out / LOCK).write_text(json.dumps({"host": socket.gethostname(), "boot_id": Path(
        "/proc/sys/kernel/random/boot_id").read_text().strip(), "pid": dead.pid, "token": "old"}))
    here.acquire()
    assert here.took_over and here.took_over["pid"] == dead.pid
    with pytest.raises(Exception, match=f"pid {os.getpid()}"):
        OutDirLock(out).acquire()
    here.release()
    assert not (out / LOCK).exists()

    # another machine on shared storage: live while its heartbeat is fresh, stale once it stops
    (out / LOCK).write_text(json.dumps({"host": "node-17", "pid": 4242, "started": "2026-11-22T10:00:00+00:00",
                                        "token": "remote"}))
    with pytest.raises(Exception, match="host node-17, pid 4242"):
        OutDirLock(out, stale_after=60).acquire()
    old = time.time() - 120
    os.utime(out / LOCK, (old, old))
    taker = OutDirLock(out, stale_after=60, heartbeat=0.05).acquire()
    assert taker.took_over["host"] == "node-17"
    # the run whose lock was taken notices it (and the driver then stops writing)
    (out / LOCK).write_text(json.dumps({"host": "node-18", "pid": 1, "token": "thief"}))
    assert taker.lost.wait(5)
    taker.release()
    assert json.loads((out / LOCK).read_text())["token"] == "thief"  # not ours: left alone


def test_covidct_report_rebuilds_studies_and_report_from_out_dir_alone(tmp_path):
    root = tmp_path / "archive"
    for s in range(3):
        (root / f"study{s}").mkdir(parents=True)
        for i in range(4):
            _png(root / f"study{s}" / f"{i}.png", s * 10 + i)
    model = tiny_model(tmp_path / "m.onnx", SIZE, threshold=0.5)
    out = tmp_path / "o"
    r = screen(root, "--model", model, "--out", out, "--group-by", "parent")
    assert r.returncode == 0, r.stderr[-2000:]
    before = pd.read_parquet(out / "studies.parquet")
    html = (out / "report.html").read_text()
    (out / "studies.parquet").unlink()
    (out / "report.html").unlink()
    rep = run_cli("covidct-report", out)
    assert rep.returncode == 0, rep.stderr[-2000:]
    pd.testing.assert_frame_equal(pd.read_parquet(out / "studies.parquet"), before)
    assert (out / "report.html").read_text().split("<h2>Counts")[1] == html.split("<h2>Counts")[1]
    # the rule, by hand: mean of each folder's top-k probabilities
    rows = read_rows(out)
    rows["study"] = rows.path.map(os.path.dirname)
    for k in (3, 1):
        rep = run_cli("covidct-report", out, "--top-k", k)
        assert rep.returncode == 0
        st = pd.read_parquet(out / "studies.parquet").set_index("study")
        want = rows.groupby("study").probability.apply(lambda p: np.sort(p.to_numpy())[::-1][:k].mean())
        assert np.allclose(st[st.level == "study"].top_k_mean.reindex(want.index), want)
        assert (st.top_k == k).all()
    assert json.loads((out / "run.json").read_text())["studies"]["rule"].startswith("mean of the top 1")
    assert run_cli("covidct-report", tmp_path).returncode == 2  # no run.json: not an OUT_DIR


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a full disk is tested on a small tmpfs, which needs root to mount")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")


def test_a_full_disk_stops_cleanly_and_the_rerun_completes_every_file_once(tmp_path):
    root = tmp_path / "archive"
    n = 400
    _jpegs(root, n)
    model = tiny_model(tmp_path / "m.onnx", SIZE, threshold=0.0)  # every row carries a thumbnail: parts grow fast
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "3m")  # the report lists the top flagged files with slices: room for it once freed
    try:
        filler = disk / "filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * (3 * 1024 * 1024 - 120 * 1024))
        out = disk / "o"
        args = [root, "--model", model, "--out", out, "--batch-size", "8", "--rows-per-part", "16"]
        r = screen(*args)
        assert r.returncode == 3, (r.returncode, r.stderr[-3000:])
        assert "No space left on device" in r.stderr and "rerun" in r.stderr
        partial = read_rows(out)
        assert 0 < len(partial) < n and partial.path.is_unique
        assert not list((out / "predictions").glob("*.tmp"))
        filler.unlink()
        r = screen(*args)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = read_rows(out)
        assert len(rows) == n and rows.path.is_unique
        assert json.loads((out / "run.json").read_text())["counts"]["already_done"] == len(partial)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_transient_error_is_retried_and_the_exit_code_tells_what_is_current(tmp_path):
    root = tmp_path / "archive"
    root.mkdir()
    _png(root / "good.png", 0)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 300)
    os.symlink(tmp_path / "later.png", root / "link.png")  # unreadable now (root reads through chmod 000)
    model = tiny_model(tmp_path / "m.onnx", SIZE)
    out = tmp_path / "o"
    first = screen(root, "--model", model, "--out", out)
    assert first.returncode == 1
    _png(tmp_path / "later.png", 1)  # the cause goes away
    second = screen(root, "--model", model, "--out", out)
    rows = read_rows(out)
    link = rows[rows.path == str(root / "link.png")].sort_values("run_id")
    assert list(link.status) == ["error", "ok"]  # retried, not "already done"
    assert (rows.path == str(root / "corrupt.png")).sum() == 1  # deterministic: not retried
    # nothing failed in this run, but OUT_DIR still holds a current error row: the exit code says so
    assert second.returncode == 1 and "still current in OUT_DIR" in second.stdout
    assert json.loads((out / "run.json").read_text())["current"] == {"ok": 2, "error": 1, "skipped": 0}


@pytest.mark.slow  # a crash-consistency kill (SIGTERM midway)
def test_sigterm_ends_a_run_like_ctrl_c_with_whole_parts(tmp_path):
    n = 600
    out, args = _slow_run(tmp_path, n)
    proc = _start(args)
    try:
        assert _wait_for(lambda: len(list((out / "predictions").glob("part-*.parquet"))) >= 2
                         if (out / "predictions").is_dir() else False), proc.stderr.read()[-2000:] if proc.poll() else ""
        proc.send_signal(signal.SIGTERM)  # the driver alone, as a scheduler stops a job
        _, err = proc.communicate(timeout=120)
    finally:
        kill_session(proc.pid)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "rerun to resume" in err
    assert json.loads((out / "run.json").read_text())["state"] == "interrupted"
    partial = read_rows(out)
    assert 0 < len(partial) < n and not list((out / "predictions").glob("*.tmp"))
    r = screen(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = read_rows(out)
    assert len(rows) == n and rows.path.is_unique
