"""A damaged compressed DICOM whose decoder kills its process costs that file alone (engine.sandbox)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from covidct.engine.reasons import CORRUPT, TIMEOUT, DecodeError
from covidct.engine.sandbox import DecoderCrashed, Sandbox
from tests.conftest import read_rows, run_cli

#: pydicom's JPEG baseline test file, relabelled as a CT slice so the engine decodes its pixels.
BASE = "SC_rgb_jpeg.dcm"


def ct_dicom(name: str = BASE) -> bytes:
    """The file's bytes with Modality OT -> CT and Secondary Capture -> CT Image Storage, patched in place
    (same lengths: the compressed pixel data stay byte for byte)."""
    from pydicom.data import get_testdata_file

    data = Path(get_testdata_file(name, download=False)).read_bytes()
    data = data.replace(b"1.2.840.10008.5.1.4.1.1.7", b"1.2.840.10008.5.1.4.1.1.2")
    i = data.find(b"\x08\x00\x60\x00")  # (0008,0060) Modality
    j = data.find(b"OT", i)
    assert 0 <= i < j < i + 12, "the test file's Modality is not where it was"
    return data[:j] + b"CT" + data[j + 2:]


def search_crasher(out: str, tries: int = 600) -> None:
    """Run in a child (``python -c``): damage a few bytes of the compressed pixel data at a time until
    pydicom's own ``pixel_array`` kills the process that calls it (each try in a forked child); write it."""
    import warnings

    import pydicom
    warnings.simplefilter("ignore")
    data = ct_dicom()
    start = data.rfind(b"\xe0\x7f\x10\x00") + 12
    rng = np.random.default_rng(0)
    for _ in range(tries):
        buf = bytearray(data)
        for _ in range(int(rng.integers(1, 6))):
            buf[int(rng.integers(start, len(buf)))] = int(rng.integers(0, 256))
        pid = os.fork()
        if pid == 0:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
            try:
                pydicom.dcmread(io.BytesIO(bytes(buf)), force=True).pixel_array
            except Exception:  # noqa: BLE001  an ordinary error is not what we look for
                pass
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            Path(out).write_bytes(bytes(buf))
            return


@pytest.fixture(scope="module")
def crasher(tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("crasher") / "damaged.dcm"
    subprocess.run([sys.executable, "-c", f"from tests.test_sandbox import search_crasher; search_crasher({str(out)!r})"],
                   check=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    if not out.is_file():
        pytest.skip("no damaged variant of pydicom's JPEG test file crashes this machine's decoders "
                    "(their versions differ from the ones this test was written against)")
    return out.read_bytes()


def test_a_decoder_that_kills_its_process_costs_that_file_alone(crasher):
    sb = Sandbox()
    try:
        with pytest.raises(DecoderCrashed) as e:
            sb.pixel_array(crasher)
        assert e.value.code == CORRUPT and "crashed" in e.value.message
        # the next file gets a fresh child and decodes as pydicom does in-process
        import pydicom
        good = ct_dicom()
        assert np.array_equal(sb.pixel_array(good), pydicom.dcmread(io.BytesIO(good)).pixel_array)
    finally:
        sb.close()


def test_a_decode_past_the_budget_is_a_timeout_and_the_child_is_replaced():
    sb = Sandbox(budget_s=1e-4)  # the child cannot even start in that time
    with pytest.raises(DecodeError) as e:
        sb.pixel_array(ct_dicom())
    assert e.value.code == TIMEOUT and sb._proc is None
    sb.budget_s = 30.0
    try:
        assert sb.pixel_array(ct_dicom()).shape[:2] == (256, 256)
    finally:
        sb.close()


def test_the_predictor_survives_a_crashing_dicom_and_screens_every_other_file(crasher, tmp_path):
    from pydicom.data import get_testdata_file

    data = tmp_path / "archive"
    data.mkdir()
    good = Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes()
    for i in range(12):
        (data / f"ok-{i:02d}.dcm").write_bytes(good)
    (data / "ok-05-damaged.dcm").write_bytes(crasher)
    out = tmp_path / "out"
    r = run_cli("covidct-batch", data, "--model", _model(tmp_path), "--out", out, "--num-cpus", "1",
                "--batch-size", "4", "--no-progress", "--runtime", "onnxruntime")
    assert r.returncode == 1, r.stderr[-3000:]  # finished, with one error row
    rows = read_rows(out).set_index("path")
    bad = rows.loc[str(data / "ok-05-damaged.dcm")]
    assert (bad.status, bad.reason) == ("error", "corrupt") and "crashed" in bad.message
    others = rows.drop(index=str(data / "ok-05-damaged.dcm"))
    assert len(others) == 12 and set(others.status) == {"ok"}
    # the rerun does not try the damaged file again (a final error row) and finds everything done
    again = run_cli("covidct-batch", data, "--model", _model(tmp_path), "--out", out, "--num-cpus", "1",
                    "--no-progress", "--runtime", "onnxruntime")
    assert again.returncode == 1 and len(read_rows(out)) == 13


def _model(tmp_path: Path) -> Path:
    from covidct.engine.contract import Contract
    from tests.conftest import tiny_model

    path = tmp_path / "m.onnx"
    if not path.is_file():
        tiny_model(path, (32, 32), contract=Contract(image_size=(32, 32), class_names=("neg", "pos"),
                                                     positive_class="pos", threshold=0.5))
    return path
