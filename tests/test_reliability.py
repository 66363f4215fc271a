"""The README's promises against inputs made to break them (issue: no duplicate, no stale row...)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from covidct.engine.contract import Contract
from tests.conftest import read_rows, run_cli, tiny_model

SIZE = (32, 32)


def _model(tmp_path: Path) -> Path:
    return tiny_model(tmp_path / "m.onnx", SIZE, contract=Contract(image_size=SIZE, class_names=("neg", "pos"),
                                                                   positive_class="pos", threshold=0.5))


def _pngs(root: Path, n: int, seed: int = 0) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = root / f"s{i:03d}.png"
        cv2.imwrite(str(p), rng.integers(0, 256, (48, 40), dtype=np.uint8))
        paths.append(p)
    return paths


def _screening(tmp_path: Path, n: int, *extra) -> tuple[Path, Path, tuple]:
    """``n`` PNG slices under tmp_path/data, and the covidct-batch arguments that screen them into tmp_path/out."""
    data, out = tmp_path / "data", tmp_path / "out"
    _pngs(data, n)
    return data, out, ("covidct-batch", data, "--model", _model(tmp_path), "--out", out, "--no-progress",
                       "--num-cpus", "1", *extra)


def test_a_file_is_screened_once_however_it_is_named(tmp_path):
    data = tmp_path / "data"
    files = _pngs(data / "a", 5) + _pngs(data / "b", 3, seed=1)
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    lst = tmp_path / "list.txt"
    # inside a folder given as INPUT, named again through a symlinked folder, and twice in the list
    lst.write_text(f"{files[0]}\n{tmp_path / 'link' / 'a' / files[1].name}\n{files[0]}\n")
    out = tmp_path / "out"
    r = run_cli("covidct-batch", data, f"{data}/", data / "a", tmp_path / "link", files[2], "--from-list", lst,
                "--model", _model(tmp_path), "--out", out, "--no-progress", "--num-cpus", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_rows(out)
    assert len(rows) == len(files) and rows.path.is_unique, rows.path.tolist()
    assert set(rows.path) == {str(p) for p in files}


def _ct_small(path: Path, sop: str | None = None) -> None:
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    if sop:
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.save_as(path)


def test_the_newest_row_of_a_file_supersedes_all_its_older_rows(tmp_path):
    import json

    data = tmp_path / "data"
    data.mkdir()
    _ct_small(data / "a.dcm")
    target = tmp_path / "later.dcm"
    (data / "b.dcm").symlink_to(target)  # dangling: an unreadable row, retried by the next run
    out, model = tmp_path / "out", _model(tmp_path)
    args = ("covidct-batch", data, "--model", model, "--out", out, "--no-progress", "--num-cpus", "1")
    r = run_cli(*args)
    assert r.returncode == 1, r.stderr[-2000:]
    _ct_small(target)  # now readable
    r = run_cli(*args)
    assert r.returncode == 0, r.stdout[-2000:]  # the old error row of b.dcm is no longer current
    assert json.loads((out / "run.json").read_text())["current"] == {"ok": 2, "error": 0, "skipped": 0}
    # a file replaced by another instance (another SOP UID): only the new prediction is current
    _ct_small(data / "a.dcm", sop="1.2.826.0.1.3680043.8.498.77")
    r = run_cli(*args)
    assert r.returncode == 0
    assert json.loads((out / "run.json").read_text())["current"] == {"ok": 2, "error": 0, "skipped": 0}
    assert len(read_rows(out)) == 4  # every row is kept; only which are current changed


def test_error_rows_of_files_that_are_gone_stop_deciding_the_exit_code(tmp_path):
    import json

    data, out, args = _screening(tmp_path, 3)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # corrupt: a final error row
    assert run_cli(*args).returncode == 1
    r = run_cli(*args)  # still there: its error row is current and decides the exit code
    assert r.returncode == 1 and "still current" in r.stdout
    (data / "broken.png").unlink()
    r = run_cli(*args)
    assert r.returncode == 0, r.stdout[-2000:]
    assert "did not find" in r.stdout
    run = json.loads((out / "run.json").read_text())
    assert run["current"]["error"] == 1 and run["current_errors_not_found"] == 1


def test_a_write_failure_outside_the_parts_is_exit_3_with_the_message(tmp_path):
    data = tmp_path / "data"
    _pngs(data, 4)
    model = _model(tmp_path)
    out = tmp_path / "out"
    # a folder where a whole file must be renamed into place (engine.atomic): run.json cannot be written at the start
    (out / "run.json").mkdir(parents=True)
    r = run_cli("covidct-batch", data, "--model", model, "--out", out, "--no-progress", "--num-cpus", "1")
    assert r.returncode == 3, r.stderr[-2000:]
    assert "run.json could not be written" in r.stderr and "Traceback" not in r.stderr
    (out / "run.json").rmdir()
    (out / "report.html").mkdir()  # the report cannot be written at the end
    r = run_cli("covidct-batch", data, "--model", model, "--out", out, "--no-progress", "--num-cpus", "1")
    assert r.returncode == 3 and "report.html could not be written" in r.stderr and "Traceback" not in r.stderr
    assert len(read_rows(out)) == 4  # every prediction part is intact
    (out / "report.html").rmdir()
    r = run_cli("covidct-report", out)
    assert r.returncode == 0 and (out / "report.html").is_file()


def test_covidct_report_refuses_beside_a_live_run_and_a_garbage_record(tmp_path):
    from covidct.engine.lock import OutDirLock

    data = tmp_path / "data"
    _pngs(data, 3)
    out = tmp_path / "out"
    assert run_cli("covidct-batch", data, "--model", _model(tmp_path), "--out", out, "--no-progress",
                   "--num-cpus", "1").returncode == 0
    before = (out / "run.json").read_bytes()
    lock = OutDirLock(out).acquire()  # a live run of this process holds OUT_DIR
    try:
        r = run_cli("covidct-report", out)
    finally:
        lock.release()
    assert r.returncode == 2 and "in use by another covidct-batch run" in r.stderr
    assert (out / "run.json").read_bytes() == before and not list(out.glob("*.tmp"))
    (out / "run.json").write_bytes(b"\x00garbage{")
    r = run_cli("covidct-report", out)
    assert r.returncode == 2 and "not a covidct-batch run record" in r.stderr and "Traceback" not in r.stderr


def test_an_empty_input_says_nothing_was_found_and_a_link_loop_is_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("covidct-batch", empty, "--model", _model(tmp_path), "--out", tmp_path / "o1", "--no-progress",
                "--num-cpus", "1")
    assert r.returncode == 2 and "NOTHING FOUND" in r.stdout
    data = tmp_path / "data"
    _pngs(data, 1)
    (data / "loop-a").symlink_to(data / "loop-b")
    (data / "loop-b").symlink_to(data / "loop-a")
    r = run_cli("covidct-batch", data, "--model", _model(tmp_path), "--out", tmp_path / "o2", "--no-progress",
                "--num-cpus", "1")
    assert r.returncode == 1
    rows = read_rows(tmp_path / "o2").set_index("path")
    assert "symbolic link loop" in rows.loc[str(data / "loop-a"), "message"]


def test_pseudonyms_keep_only_image_extensions_and_no_message_shows_a_raw_path():
    from covidct.engine.privacy import pseudonym_path

    assert pseudonym_path("/data/Doe.John", "k").endswith("/" + pseudonym_path("/data/Doe.John", "k").rsplit("/", 1)[1])
    assert "." not in pseudonym_path("/data/Doe.John", "k").rsplit("/", 1)[1]
    assert "." not in pseudonym_path("/data/scan.Smith", "k").rsplit("/", 1)[1]
    assert pseudonym_path("/data/DOE/slice-1.DCM", "k").endswith(".dcm")
    assert pseudonym_path("/data/DOE/slice-1.png", "k").endswith(".png")


def test_an_input_inside_out_dir_is_refused_without_its_path_under_pseudonymize(tmp_path):
    import os
    out = tmp_path / "out"
    inside = out / "DOE_JOHN"
    _pngs(inside, 1)
    r = run_cli("covidct-batch", inside, "--model", _model(tmp_path), "--out", out, "--pseudonymize",
                env={**os.environ, "COVIDCT_PSEUDONYM_KEY": "k" * 32})
    assert r.returncode == 2 and "inside OUT_DIR" in r.stderr
    assert "DOE_JOHN" not in r.stderr + r.stdout


def test_a_report_without_study_grouping_lists_the_top_flagged_files(tmp_path):
    from covidct.engine.contract import Contract

    data = tmp_path / "data"
    data.mkdir()
    for i, v in enumerate((250, 240, 20)):  # the tiny model's probability is the mean grey
        cv2.imwrite(str(data / f"s{i}.png"), np.full((40, 40), v, np.uint8))
    model = tiny_model(tmp_path / "m.onnx", SIZE, contract=Contract(image_size=SIZE, class_names=("neg", "pos"),
                                                                    positive_class="pos", threshold=0.5,
                                                                    preprocessing={"method": "resize"}))
    out = tmp_path / "out"
    r = run_cli("covidct-batch", data, "--model", model, "--out", out, "--no-progress", "--num-cpus", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    html = (out / "report.html").read_text()
    table = html[html.index('id="flagged-files"'):]
    table = table[:table.index("</table>")]
    assert str(data / "s0.png") in table and str(data / "s1.png") in table and "s2.png" not in table
    assert table.index("s0.png") < table.index("s1.png") and table.count("<img") == 2


def test_losing_the_out_dir_secret_is_refused_not_a_second_row_for_every_file(tmp_path):
    _, out, args = _screening(tmp_path, 4)
    assert run_cli(*args).returncode == 0
    secret = (out / ".covidct-secret").read_bytes()
    (out / ".covidct-secret").unlink()  # a copy that skipped dotfiles
    r = run_cli(*args)
    assert r.returncode == 2 and ".covidct-secret is missing" in r.stderr and "--overwrite" in r.stderr
    (out / ".covidct-secret").write_bytes(b"x" * 32)  # the wrong one
    r = run_cli(*args)
    assert r.returncode == 2 and "not the secret" in r.stderr
    (out / ".covidct-secret").write_bytes(secret)  # restored: resumes, nothing twice
    r = run_cli(*args)
    assert r.returncode == 0 and len(read_rows(out)) == 4


def test_a_predictor_loads_the_bytes_the_run_hashed_or_refuses(tmp_path):
    import hashlib

    import pytest

    from covidct.engine import runtimes
    from covidct.engine.predictor import Predictor

    model = _model(tmp_path)
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    x = np.full((2, *SIZE, 1), 128, np.uint8)
    for rt in ["onnxruntime"] + (["openvino"] if runtimes.openvino_installed() else []):
        p = Predictor(str(model), 1, "cpu", runtime=rt, expected_sha256=sha)
        assert np.allclose(p.predict(x)[0], 128 / 255, atol=1e-5)
    tiny_model(model, SIZE, contract=Contract(image_size=SIZE, class_names=("neg", "pos"), positive_class="pos",
                                              threshold=0.3))  # re-exported to the same path mid-run
    with pytest.raises(runtimes.ModelChangedError, match="changed since the run started"):
        Predictor(str(model), 1, "cpu", expected_sha256=sha)


def _set_raw(data: bytes, group: int, elem: int, value: bytes) -> bytes:
    """Replace a top-level explicit-VR little-endian element's value with raw bytes (no validation)."""
    import struct
    tag = struct.pack("<HH", group, elem)
    i = data.find(tag, 132)
    assert i > 0 and data[i + 4:i + 6].isalpha(), "element not found"
    n = struct.unpack("<H", data[i + 6:i + 8])[0]
    value = value + (b" " if len(value) % 2 else b"")
    return data[:i + 6] + struct.pack("<H", len(value)) + value + data[i + 8 + n:]


def test_malformed_optional_dicom_values_are_left_empty_not_the_files_row(tmp_path):
    from pydicom.data import get_testdata_file

    data = tmp_path / "data"
    data.mkdir()
    src = Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes()
    (data / "huge-instance.dcm").write_bytes(_set_raw(src, 0x0020, 0x0013, b"99999999999"))
    (data / "bad-z.dcm").write_bytes(_set_raw(src, 0x0020, 0x0032, b"1\\2\\abc"))
    no_pos = _set_raw(src, 0x0020, 0x0032, b"1\\2")  # not three values: SliceLocation is read instead
    (data / "bad-location.dcm").write_bytes(_set_raw(no_pos, 0x0020, 0x1041, b"nowhere"))
    out = tmp_path / "out"
    r = run_cli("covidct-batch", data, "--model", _model(tmp_path), "--out", out, "--no-progress", "--num-cpus", "1")
    assert r.returncode == 0, r.stdout[-2000:]
    rows = read_rows(out).set_index("path")
    assert set(rows.status) == {"ok"}, rows[["status", "reason", "message"]]
    assert rows.loc[str(data / "huge-instance.dcm"), "instance_number"] is None or \
        np.isnan(rows.loc[str(data / "huge-instance.dcm"), "instance_number"])
    for name in ("bad-z", "bad-location"):
        assert np.isnan(rows.loc[str(data / f"{name}.dcm"), "slice_position"])


def _current(out: Path):
    rows = read_rows(out)
    newest = rows.groupby("file_id").run_id.transform("max")
    cur = rows[rows.run_id == newest]
    return sorted(zip(cur.path, cur.status, cur.probability.round(6).fillna(-1)))


@pytest.mark.slow
def test_killed_at_any_moment_the_rerun_equals_a_clean_run_and_no_process_is_left(tmp_path):
    import signal
    import time

    from benchmarks.compare import kill_session, session_pids
    from tests.test_engine import _start, _wait_for

    data = tmp_path / "data"
    _pngs(data, 160)
    model = _model(tmp_path)
    clean = tmp_path / "clean"
    assert run_cli("covidct-batch", data, "--model", model, "--out", clean, "--no-progress",
                   "--num-cpus", "2").returncode == 0
    expected = _current(clean)
    parts = lambda out: len(list((out / "predictions").glob("part-*.parquet"))) if (out / "predictions").is_dir() else 0
    moments = {  # when to stop the driver: during Ray's start-up, after the first part, mid-run, at the end
        "startup": lambda out: time.sleep(2.0) or True,
        "first part": lambda out: parts(out) >= 1,
        "mid-run": lambda out: parts(out) >= 4,
        "final write": lambda out: any(out.glob("studies.parquet*")) or any(out.glob("report.html*.tmp"))
        or (out / "run.json").exists() and '"complete"' in (out / "run.json").read_text(),
    }
    for sig in (signal.SIGKILL, signal.SIGTERM):
        for name, cond in moments.items():
            out = tmp_path / f"o-{sig.name}-{name.replace(' ', '-')}"
            proc = _start([data, "--model", model, "--out", out, "--batch-size", "4", "--max-in-flight", "1",
                           "--rows-per-part", "8"])
            try:
                _wait_for(lambda: cond(out) or proc.poll() is not None, timeout=120)
                proc.send_signal(sig)  # the driver alone, as a scheduler or the OOM killer stops it
                proc.communicate(timeout=120)
                if sig == signal.SIGTERM and proc.returncode not in (0, 1):
                    assert proc.returncode == 130, (name, proc.returncode)
                # no process of that run is left: its Ray runtime ended with it
                assert _wait_for(lambda: not session_pids(proc.pid), timeout=30), (sig.name, name,
                                                                                  session_pids(proc.pid))
            finally:
                kill_session(proc.pid)
            r = run_cli("covidct-batch", data, "--model", model, "--out", out, "--no-progress", "--num-cpus", "2")
            assert r.returncode == 0, (sig.name, name, r.stderr[-2000:])
            assert _current(out) == expected, (sig.name, name)


def test_a_lock_from_another_pid_namespace_is_judged_by_its_heartbeat_and_a_torn_one_is_taken_over(tmp_path):
    import json
    import os
    import socket
    import time

    import pytest

    from covidct.engine.lock import LOCK, TORN_AFTER_S, OutDirLock

    out = tmp_path / "o"
    out.mkdir()
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    # another container of this machine: same host name and boot id, a pid that means nothing here
    (out / LOCK).write_text(json.dumps({"host": socket.gethostname(), "boot_id": boot, "pid_ns": "pid:[1]",
                                        "pid": 999999, "token": "container"}))
    with pytest.raises(Exception, match="pid 999999"):
        OutDirLock(out).acquire()  # its heartbeat is fresh: live, whatever our pid table says
    old = time.time() - 120
    os.utime(out / LOCK, (old, old))
    lock = OutDirLock(out, stale_after=60).acquire()  # its heartbeat stopped: stale
    assert lock.took_over["pid"] == 999999
    lock.release()
    # a fresh empty lock (a run creating it this instant) waits a few seconds, not a minute; then taken over
    (out / LOCK).write_text("")
    with pytest.raises(Exception, match="empty or unreadable"):
        OutDirLock(out).acquire()
    old = time.time() - TORN_AFTER_S - 1
    os.utime(out / LOCK, (old, old))
    OutDirLock(out).acquire().release()
    (out / LOCK).write_bytes(b"\x00\xffgarbage")
    os.utime(out / LOCK, (old, old))
    OutDirLock(out).acquire().release()


def test_names_that_are_not_utf8_work_on_the_command_line_and_as_the_current_folder(tmp_path):
    import os
    import subprocess
    import sys

    base = os.fsencode(tmp_path)
    data = base + b"/caf\xe9"
    os.makedirs(data)
    for i, p in enumerate(_pngs(tmp_path / "src", 3)):
        os.rename(os.fsencode(p), data + b"/s\xff%d.png" % i)
    model = _model(tmp_path)
    out = base + b"/out-\xe9"
    exe = os.fsencode(Path(sys.executable).parent / "covidct-batch")
    r = subprocess.run([exe, b".", b"--model", os.fsencode(model), b"--out", out, b"--no-progress", b"--num-cpus",
                        b"1"], cwd=data, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from covidct.engine.studies import utf8_path
    with utf8_path(Path(os.fsdecode(out))) as readable:  # pyarrow, like DuckDB, takes UTF-8 paths only
        rows = read_rows(readable)
    assert len(rows) == 3 and set(rows.status) == {"ok"}
    assert all(b is not None and b.startswith(data) for b in rows.path_bytes)
    again = subprocess.run(r.args, cwd=data, capture_output=True, timeout=300)  # resume: nothing twice
    assert again.returncode == 0 and b"already done" in again.stdout, again.stderr[-2000:]
    report = subprocess.run([os.fsencode(Path(sys.executable).parent / "covidct-report"), out], capture_output=True,
                            timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    with utf8_path(Path(os.fsdecode(out))) as readable:
        assert len(read_rows(readable)) == 3


def test_out_is_never_input_for_evaluate(tmp_path):
    import json

    from covidct.train.synthetic import make_dataset

    data = make_dataset(tmp_path / "data", n_per_class=12, seed=4, size=(96, 96))
    model = _model(tmp_path)
    out = data / "COVID" / "evaluation"  # OUT inside a class folder
    for _ in range(2):  # the second run finds the first one's roc.png, reliability.png and rows there
        r = run_cli("covidct-evaluate", model, data, "--out", out, "--no-progress", "--num-cpus", "1")
        assert r.returncode == 0, r.stderr[-2000:]
        report = json.loads((out / "evaluation.json").read_text())
        assert report["n"] == 24 and report["files"] == {"ok": 24, "unreadable": 0, "skipped": 0}


@pytest.mark.slow  # two TensorFlow trainings: half a minute on 2 cores
def test_out_is_never_input_for_train(tmp_path):
    import json

    from covidct.train.synthetic import make_dataset

    data = make_dataset(tmp_path / "data", n_per_class=12, seed=4, size=(96, 96))
    run = data / "non-COVID" / "run"  # OUT inside a class folder
    r = run_cli("covidct-train", data, "--out", run, "--epochs", "1", "--image-size", "32", "--batch-size", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("covidct-train", data, "--out", run, "--epochs", "1", "--image-size", "32", "--batch-size", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sum(json.loads((run / "metrics.json").read_text())["split_sizes"].values()) == 24


def test_a_damaged_part_is_set_aside_and_its_files_screened_again(tmp_path):
    import json

    _, out, args = _screening(tmp_path, 12, "--batch-size", "4", "--rows-per-part", "4")
    assert run_cli(*args).returncode == 0
    parts = sorted((out / "predictions").glob("part-*.parquet"))
    assert len(parts) >= 2
    lost = parts[-1].read_bytes()
    parts[-1].write_bytes(lost[: len(lost) // 2])  # truncated (a copy cut short)
    (out / "predictions" / "part-foreign.parquet").write_bytes(b"")  # empty
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"x": [1, 2]}), out / "predictions" / "part-zzz.parquet")  # someone else's table
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("SET ASIDE") == 3 and "Traceback" not in r.stderr
    rows = read_rows(out)
    assert len(set(rows.path)) == 12  # the truncated part's files were screened again: nothing lost
    run = json.loads((out / "run.json").read_text())
    assert len(run["damaged_parts"]) == 3 and all(Path(d["moved_to"]).is_file() for d in run["damaged_parts"])
    assert run["current"]["ok"] == 12


def test_runs_are_ordered_by_a_sequence_not_by_the_clock(tmp_path):
    import shutil

    from covidct.engine.pipeline import next_run_id

    _, out, args = _screening(tmp_path, 3)
    assert run_cli(*args).returncode == 0
    first = read_rows(out).run_id.iloc[0]
    assert first.startswith("s00000001-")
    # a run from a node whose clock was years ahead wrote part of this OUT_DIR
    part = sorted((out / "predictions").glob("part-*.parquet"))[0]
    shutil.copy(part, out / "predictions" / "part-s00000007-20991231T235959Z-abcdef-00000.parquet")
    nxt = next_run_id(out / "predictions")
    assert nxt.startswith("s00000008-") and nxt > "s00000007-20991231T235959Z-abcdef"
    assert nxt > "20991231T235959Z-abcdef"  # and after every run written before the sequence existed
