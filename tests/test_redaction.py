"""Redaction without --pseudonymize (issue 20, item 18): a DICOM file's own identifying values leave its row's
path and message in every spelling a file system may hold, from any depth of the header, whatever one
malformed attribute does, at a bounded cost."""

from __future__ import annotations

import io
import os
import resource
import time
import unicodedata
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from covidct.engine.privacy import identifying_values, redact
from tests.conftest import read_rows, run_cli, tiny_model


def _ct(**attrs) -> pydicom.Dataset:
    from pydicom.data import get_testdata_file

    src = get_testdata_file("CT_small.dcm", download=False)
    if src is None:
        pytest.skip("CT_small.dcm is not installed (pydicom-data)")
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def _save(ds: pydicom.Dataset, path: bytes | Path) -> str:
    """Write ``ds`` to ``path`` (made with its folders); its SOP Instance UID, which names its row."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return str(ds.SOPInstanceUID)


def _archive(root: Path) -> dict[str, list[str]]:
    """Four patients' files, each named with its own identifiers the way archives do; returns, per SOP
    Instance UID, the strings (in the file system's own spelling) that must not survive in its row's path."""
    r = os.fsencode(root)
    must_go: dict[str, list[str]] = {}
    # a folder written by an older system in Latin-1 (not UTF-8): a date with a time, an ID with a suffix
    latin = "MÜLLER^JÖRG_20200315T1430".encode("latin-1")
    uid = _save(_ct(PatientName="Müller^Jörg", PatientID="PIDA12345", StudyDate="20200315",
                    SpecificCharacterSet="ISO_IR 100"), r + b"/" + latin + b"/PIDA12345b.dcm")
    must_go[uid] = [os.fsdecode(latin[:6]), os.fsdecode(latin[7:11]), "20200315T1430", "PIDA12345"]
    # a folder in NFD (as macOS writes it), a date with a time in ISO form
    nfd = unicodedata.normalize("NFD", "Åsa_Lindqvist_2020-03-15T143022")
    uid = _save(_ct(PatientName="Åsa^Lindqvist", StudyDate="20200315", SpecificCharacterSet="ISO_IR 192"),
                os.fsencode(root / nfd / "b.dcm"))
    must_go[uid] = [nfd[:4], "Lindqvist", "2020-03-15T143022", "143022"]
    # identifiers only inside sequences, and another name
    other = Dataset()
    other.PatientID = "SEQID55123"
    request = Dataset()
    request.AccessionNumber = "REQACC8841"
    uid = _save(_ct(OtherPatientIDsSequence=Sequence([other]), RequestAttributesSequence=Sequence([request]),
                    OtherPatientNames="Smythe^Alexandra"), r + b"/SEQID55123_Smythe_Alexandra/REQACC8841/c.dcm")
    must_go[uid] = ["SEQID55123", "Smythe", "Alexandra", "REQACC8841"]
    # one malformed identifying attribute: OtherPatientIDs written with VR UL (its 10 bytes are no UL)
    ds = _ct(PatientName="Doe^Johnathan", OtherPatientIDs="MALF7777X")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = bytearray(buf.getvalue())
    i = data.find(b"\x10\x00\x00\x10LO")
    data[i + 4:i + 6] = b"UL"
    p = root / "Doe_Johnathan" / "MALF7777X" / "d.dcm"
    p.parent.mkdir(parents=True)
    p.write_bytes(bytes(data))
    must_go[str(ds.SOPInstanceUID)] = ["Doe", "Johnathan", "MALF7777X"]
    return must_go


def test_every_identifying_value_leaves_the_path_in_every_spelling(tmp_path):
    root = tmp_path / "archive"
    must_go = _archive(root)
    out = tmp_path / "out"
    r = run_cli("covidct-batch", root, "--model", tiny_model(tmp_path / "m.onnx", (64, 64)), "--out", out,
                "--no-progress", "--num-cpus", "2")
    rows = read_rows(out)
    assert r.returncode == 0 and len(rows) == 4 and (rows.status == "ok").all(), (r.stderr[-3000:], rows.message)
    by_uid = dict(zip(rows.sop_uid, rows.path))
    assert set(by_uid) == set(must_go), by_uid
    for name, words in must_go.items():
        path = by_uid[name]
        folded = unicodedata.normalize("NFC", path).lower()
        for w in words:
            assert w.lower() not in folded and unicodedata.normalize("NFC", w).lower() not in folded, (name, w, path)
        assert "[redacted]" in path, path
    for text in (r.stdout, r.stderr):
        for words in must_go.values():
            assert not any(w.lower() in text.lower() for w in words), text[-2000:]


def test_an_800_kb_name_of_short_parts_costs_a_bounded_time_and_memory():
    """One regex alternative a part made this 9 s and 230 MB in one worker; now words are looked up in a set."""
    name = "^".join(f"AB{i:05d}" for i in range(100_000))
    assert len(name) > 790_000
    buf = io.BytesIO()
    _ct(PatientName=name).save_as(buf, enforce_file_format=True)
    ds = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.process_time()
    values = identifying_values(ds)
    shown = redact("/archive/AB00017/AB04711_x/AB99999.dcm", values)
    cpu = time.process_time() - t
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert shown == "/archive/[redacted]/[redacted]_x/[redacted].dcm", shown
    assert cpu < 3.0 and grew_mb < 100, (cpu, grew_mb)


def test_the_element_budget_counts_every_element_in_reading_order(monkeypatch):
    """The walk looks only at identifying elements and sequences, yet the budget still counts each element it
    passes, depth first: with a budget of k elements, exactly the values among the first k are read."""
    from covidct.engine import privacy

    inner = Dataset()
    inner.PatientID = "QX-INNER-77"
    buf = io.BytesIO()
    _ct(PatientName="Roe^Rita", OtherPatientIDsSequence=Sequence([inner])).save_as(buf, enforce_file_format=True)
    ds = pydicom.dcmread(io.BytesIO(buf.getvalue()))
    order = []  # (tag, depth) of each element in the walk's order

    def visit(d, depth):
        for elem in d:
            order.append((elem.tag, depth))
            if elem.VR == "SQ":
                for item in elem.value:
                    visit(item, depth + 1)
    visit(ds, 0)
    at = {"Roe^Rita": order.index((0x00100010, 0)) + 1, "QX-INNER-77": order.index((0x00100020, 1)) + 1}
    assert at["Roe^Rita"] < order.index((0x00101002, 0)) + 1 < at["QX-INNER-77"]  # the name, the sequence, its ID
    for budget in sorted({1, at["Roe^Rita"] - 1, at["Roe^Rita"], at["QX-INNER-77"] - 1, at["QX-INNER-77"],
                          len(order)}):
        monkeypatch.setattr(privacy, "MAX_ELEMENTS", budget)
        got = identifying_values(pydicom.dcmread(io.BytesIO(buf.getvalue())))
        for value, n in at.items():
            assert any(value in g for g in got) == (n <= budget), (budget, value, n, got)
