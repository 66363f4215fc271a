"""DICOM: HU from each file's rescale, the contract's window, skips, compressed syntaxes, studies,
no identifying value in any output, and the report in headless Chromium."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from covidct.engine.contract import LUNG_WINDOW, Contract
from covidct.engine.decode import DecodeError, decode_frames
from tests.conftest import ROOT, read_rows, run_cli, shared_dataset, tiny_model

SIZE = (64, 64)


def dicom_file(name: str) -> Path:
    p = get_testdata_file(name, download=False)
    if p is None:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    return Path(p)


def independent_grey(path: Path, window=LUNG_WINDOW, size=SIZE) -> list[np.ndarray]:
    """HU -> window -> resize, computed here from pydicom's raw values without engine code."""
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array
    frames = raw[None] if raw.ndim == 2 else raw
    out = []
    for i, f in enumerate(frames):
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        groups = [ds.PerFrameFunctionalGroupsSequence[i]] if "PerFrameFunctionalGroupsSequence" in ds else []
        groups += list(ds.get("SharedFunctionalGroupsSequence", []))
        for g in groups:  # per-frame values first, then the shared ones
            if "PixelValueTransformationSequence" in g:
                pvt = g.PixelValueTransformationSequence[0]
                slope, intercept = float(pvt.RescaleSlope), float(pvt.RescaleIntercept)
                break
        hu = f.astype(np.float64) * slope + intercept
        lo, width = window["level"] - window["width"] / 2, window["width"]
        g = np.clip((hu - lo) / width * 255.0, 0, 255)
        if ds.get("PixelPaddingValue") is not None:
            g[f == ds.PixelPaddingValue] = 0
        out.append(cv2.resize(np.rint(g).astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_AREA))
    return out


def frames_of(path: Path, **kw):
    return decode_frames(Path(path).read_bytes(), SIZE, "area", window=kw.get("window", LUNG_WINDOW))


def test_real_ct_windowed_pixels_equal_independent_hu_computation():
    root = shared_dataset("tcia-covid19-ny-sbu-dicom")
    files = sorted(root.rglob("*.dcm"))
    intercepts = set()
    for f in files:
        intercepts.add(float(pydicom.dcmread(f, stop_before_pixels=True).RescaleIntercept))
        (got, sl), = frames_of(f)
        ref, = independent_grey(f)
        assert np.abs(got.astype(int) - ref).max() <= 1, f.name  # float32 vs float64 rounding only
        assert sl.sop_uid and sl.instance_number is not None
    assert {-1024.0, 0.0} <= intercepts  # GE and Toshiba both exercised


def test_enhanced_multiframe_ct_rescales_per_frame():
    path = dicom_file("eCT_Supplemental.dcm")
    got = frames_of(path)
    refs = independent_grey(path)
    assert len(got) == len(refs) == 2
    for (img, sl), ref in zip(got, refs):
        assert np.abs(img.astype(int) - ref).max() <= 1
    assert [sl.frame for _, sl in got] == [0, 1]


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.uint8])
def test_windowing_by_table_equals_the_float_definition_to_the_bit(dtype):
    from covidct.engine.dicom import hounsfield, stored_to_grey, window_to_grey

    info = np.iinfo(dtype)
    rng = np.random.default_rng(int(info.max))
    stored = rng.integers(info.min, info.max, size=(64, 80), endpoint=True).astype(dtype)
    stored[0, :8] = [info.min, info.max, 0, 1, info.max - 1, info.min + 1, 2, 3]
    cases = [(1.0, -1024.0, -600.0, 1500.0, False, None), (0.5, 12.5, 40.0, 400.0, True, None),
             (2.0, -3000.0, -600.0, 1500.0, False, (int(info.min), int(info.min) + 5)),
             (1.0, 0.0, -1000.0, 6000.0, True, (-2000, -2000)), (1.0, 0.0, 0.0, 1.0, False, (3, 3))]
    for slope, intercept, level, width, invert, pad in cases:
        padding = None if pad is None else (stored >= pad[0]) & (stored <= pad[1])
        ref = window_to_grey(hounsfield(stored, slope, intercept), level, width, invert, padding)
        got = stored_to_grey(stored, slope, intercept, level, width, invert, pad)
        assert got.dtype == np.uint8 and got.shape == stored.shape
        assert np.array_equal(got, ref), (slope, intercept, level, width, invert, pad)
        # a view of a multi-frame array (not contiguous) and a float array (no table) agree too
        assert np.array_equal(stored_to_grey(stored[:, ::2], slope, intercept, level, width, invert, pad),
                              ref[:, ::2])
    as_float = stored.astype(np.float32)
    assert np.array_equal(stored_to_grey(as_float, 1.0, -1024.0, -600.0, 1500.0),
                          stored_to_grey(stored, 1.0, -1024.0, -600.0, 1500.0))


@pytest.mark.parametrize("dtype", [np.int16, np.uint16])
def test_windowing_by_opencv_equals_the_float_definition_on_every_16_bit_value(dtype):
    """16-bit slices are windowed by OpenCV's scale where ``_window_ramp`` found it equal to the table on all
    65,536 values (its float32 rounding differs at a few exact halves, set afterwards): 300 random headers
    and windows, inverted or not, with padding inside and outside the window, against the definition on
    every value. The common CT header (slope 1, intercept -1024, padding -2000) takes that path."""
    from covidct.engine.dicom import _window_ramp, hounsfield, stored_to_grey, window_to_grey

    info = np.iinfo(dtype)
    every = np.arange(1 << 16, dtype=np.uint16).view(dtype).reshape(256, 256)
    rng = np.random.default_rng(7)
    ramps = fixed = 0
    for _ in range(150):
        slope = float(rng.choice([1.0, 0.5, 2.0, rng.uniform(0.1, 3.0)]))
        intercept = float(rng.choice([-1024.0, 0.0, -3000.0, rng.uniform(-3000.0, 100.0)]))
        level = float(rng.choice([-600.0, 40.0, rng.uniform(-1200.0, 400.0)]))
        width = float(rng.choice([1500.0, 400.0, 1.0, rng.uniform(1.0, 4000.0)]))
        invert = bool(rng.integers(2))
        pad = None if rng.integers(2) else tuple(sorted(int(v) for v in rng.integers(info.min, info.max, 2)))
        padding = None if pad is None else (every >= pad[0]) & (every <= pad[1])
        ref = window_to_grey(hounsfield(every, slope, intercept), level, width, invert, padding)
        case = (slope, intercept, level, width, invert, pad)
        assert np.array_equal(stored_to_grey(every, *case), ref), case
        ramp = _window_ramp(np.dtype(dtype).str, *case)
        ramps += ramp is not None
        fixed += bool(ramp and ramp[-1])
    assert ramps >= 50 and fixed >= 5, (ramps, fixed)  # both forms were exercised
    for case in [(1e-320, -1024.0, -600.0, 1500.0, False, None), (1e300, 0.0, -600.0, 1e-300, True, None),
                 (1.0, -1e308, 1e308, 1e308, False, None)]:  # extreme header values: the table, never an error
        with np.errstate(all="ignore"):  # the float definition overflows on these, as the table's making does
            ref = window_to_grey(hounsfield(every, *case[:2]), *case[2:5])
            got = stored_to_grey(every, *case)
        assert np.array_equal(got, ref), case
    if dtype == np.int16:
        assert _window_ramp("<i2", 1.0, -1024.0, -600.0, 1500.0, False, (-2000, -2000)) is not None


def test_native_pixels_read_directly_equal_pydicoms_pixel_array_to_the_bit():
    """The engine reads native little-endian pixel data itself (no decoder set-up): on every native test
    file pydicom ships, and on variants with unused high bits set (to be masked, or sign-extended), the
    array is pydicom's, dtype and shape included."""
    import warnings

    from pydicom.data import get_testdata_files

    from covidct.engine.dicom import _native_pixels

    checked, direct = 0, 0
    rng = np.random.default_rng(7)
    cases = []
    for f in get_testdata_files("*.dcm"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(f, force=True)
                ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
                if "PixelData" not in ds or (ts is not None and ts.is_compressed):
                    continue
                ds.pixel_array  # noqa: B018  only files pydicom itself decodes
            except Exception:  # noqa: BLE001
                continue
        cases.append(ds)
        if ds.get("BitsAllocated") == 16 and ds.get("SamplesPerPixel", 1) == 1 and "NumberOfFrames" not in ds:
            for rep in (0, 1):  # garbage in the 4 unused bits of a 12-bit slice
                v = copy.deepcopy(ds)
                v.BitsStored, v.HighBit, v.PixelRepresentation = 12, 11, rep
                v.PixelData = rng.integers(0, 1 << 16, int(v.Rows) * int(v.Columns), dtype=np.uint16).tobytes()
                cases.append(v)
    for ds in cases:
        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = ds.pixel_array
            got = _native_pixels(ds, ts, frames)
        assert got.dtype == ref.dtype and got.shape == ref.shape and np.array_equal(got, ref), ds.filename
        checked += 1
        direct += got is not ref  # pydicom keeps its array: a fallback returns that very object
    assert checked >= 40 and direct >= 30, (checked, direct)


def write_ct(path: Path, hu: np.ndarray) -> Path:
    """A CT slice holding ``hu`` (stored as scanners do: uint16 with intercept -1024), on CT_small's header."""
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    stored = np.clip(np.rint(hu + 1024), 0, 4095).astype(np.uint16)
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    for k in ("PixelPaddingValue", "SmallestImagePixelValue", "LargestImagePixelValue"):
        if k in ds:
            delattr(ds, k)
    ds.PixelData = stored.tobytes()
    ds.save_as(path)
    return Path(path)


def _variant(tmp_path, name="CT_small.dcm", **changes) -> Path:
    ds = pydicom.dcmread(dicom_file(name))
    for k, v in changes.items():
        setattr(ds, k, v)
    out = tmp_path / f"{name}-{len(list(tmp_path.iterdir()))}.dcm"
    ds.save_as(out)
    return out


def test_monochrome1_is_inverted(tmp_path):
    (plain, _), = frames_of(dicom_file("CT_small.dcm"))
    (inv, _), = frames_of(_variant(tmp_path, PhotometricInterpretation="MONOCHROME1"))
    assert np.abs((255 - plain.astype(int)) - inv).max() <= 1


def test_padding_never_leaks_into_a_wide_window(tmp_path):
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    arr = ds.pixel_array.copy()
    pad = int(arr.min()) - 1
    arr[:20, :] = pad  # out-of-field band
    ds.PixelData = arr.tobytes()
    ds.PixelPaddingValue = pad
    p = tmp_path / "padded.dcm"
    ds.save_as(p)
    wide = {"level": -1000.0, "width": 6000.0}  # would show the padding as grey if it leaked
    (img, _), = decode_frames(p.read_bytes(), (128, 128), window=wide)
    assert img[:20].max() == 0 and img[30:].max() > 0


def test_localizer_and_non_ct_objects_are_skipped(tmp_path):
    for path, code in ((_variant(tmp_path, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]), "localizer"),
                       (dicom_file("MR_small.dcm"), "not_ct_image")):
        with pytest.raises(DecodeError) as e:
            frames_of(path)
        assert e.value.code == code and e.value.skipped
    sr = pydicom.Dataset()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    sr.SOPInstanceUID = generate_uid()
    sr.Modality = "SR"
    sr.PatientName = "Doe^Jane"
    sr.file_meta = pydicom.dataset.FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
    p = tmp_path / "report.dcm"
    sr.save_as(p, enforce_file_format=True)
    with pytest.raises(DecodeError) as e:
        frames_of(p)
    assert e.value.code == "not_ct_image" and "Doe^Jane" in e.value.redact


def test_compressed_transfer_syntaxes(tmp_path):
    ok = _variant(tmp_path, "JPEG-LL.dcm", Modality="CT")  # JPEG lossless: python-gdcm decodes it
    assert frames_of(ok)[0][0].shape == SIZE
    bad = _variant(tmp_path, "JPEG-lossy.dcm", Modality="CT")  # 12-bit JPEG Extended: only GPL libjpeg
    with pytest.raises(DecodeError) as e:
        frames_of(bad)
    assert e.value.code == "unsupported_transfer_syntax" and "pylibjpeg-libjpeg" in e.value.message
    assert "JPEG Extended" in e.value.message


def _series(root: Path, studies=2, series=2, slices=3) -> dict:
    """Copies of CT_small with new UIDs and positions: studies x series x slices."""
    base = pydicom.dcmread(dicom_file("CT_small.dcm"))
    layout = {}
    for s in range(studies):
        study = generate_uid()
        for r in range(series):
            ser = generate_uid()
            for k in range(slices):
                ds = copy.deepcopy(base)
                ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, ser, generate_uid()
                ds.InstanceNumber = k + 1
                ds.ImagePositionPatient = [0.0, 0.0, float(k * 5)]
                ds.PatientID = f"PID{s:04d}X"
                d = root / f"study{s}" / f"series{r}"
                d.mkdir(parents=True, exist_ok=True)
                ds.save_as(d / f"{k}.dcm")
                layout.setdefault(study, set()).add(ser)
    return layout


def test_studies_and_series_from_dicom_uids_and_pseudonyms(tmp_path):
    layout = _series(tmp_path / "arch")
    model = tiny_model(tmp_path / "m.onnx", SIZE, threshold=0.3)
    out = tmp_path / "o"
    r = run_cli("covidct-batch", tmp_path / "arch", "--model", model, "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    st = read_rows(out)
    import pandas as pd
    studies = pd.read_parquet(out / "studies.parquet")
    assert set(studies[studies.level == "study"].study) == set(layout)
    assert len(studies[studies.level == "series"]) == sum(len(v) for v in layout.values())
    assert (studies[studies.level == "series"].slices == 3).all() and (studies[studies.level == "study"].slices == 6).all()
    assert sorted(st.slice_position.unique()) == [0.0, 5.0, 10.0]
    one = studies[studies.level == "study"].iloc[0]
    probs = np.sort(st[st.study_uid == one.study].probability.to_numpy())[::-1]
    assert one.top_k_mean == pytest.approx(probs[:3].mean()) and one.decision == (probs[:3].mean() >= 0.3)

    env = {**os.environ, "COVIDCT_PSEUDONYM_KEY": "k" * 32}
    p1 = run_cli("covidct-batch", tmp_path / "arch", "--model", model, "--out", tmp_path / "p", "--pseudonymize",
                 "--no-progress", env=env)
    assert p1.returncode == 0, p1.stderr[-2000:]
    ps = read_rows(tmp_path / "p")
    assert not set(ps.study_uid) & set(layout) and ps.study_uid.nunique() == len(layout)
    assert all(u.startswith("2.25.") for u in ps.sop_uid)
    refused = run_cli("covidct-batch", tmp_path / "arch", "--model", model, "--out", tmp_path / "q",
                      "--pseudonymize", env={k: v for k, v in os.environ.items() if k != "COVIDCT_PSEUDONYM_KEY"})
    assert refused.returncode == 2 and "COVIDCT_PSEUDONYM_KEY" in refused.stderr


def test_group_by_parent_for_png_archives(tmp_path):
    rng = np.random.default_rng(0)
    for folder in ("patient_a", "patient_b"):
        for k in range(4):
            d = tmp_path / "arch" / folder
            d.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(d / f"{k}.png"), rng.integers(0, 256, (80, 80), dtype=np.uint8))
    out = tmp_path / "o"
    r = run_cli("covidct-batch", tmp_path / "arch", "--model", tiny_model(tmp_path / "m.onnx", SIZE), "--out", out,
                "--group-by", "parent", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    import pandas as pd
    studies = pd.read_parquet(out / "studies.parquet")
    assert sorted(Path(s).name for s in studies[studies.level == "study"].study) == ["patient_a", "patient_b"]


def _identifiers(files, keywords=("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                                   "InstitutionName")) -> set[str]:
    vals = set()
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for kw in keywords:
            v = str(ds.get(kw, "") or "").strip()
            if len(v) >= 3:
                vals.add(v)
    return vals


def _assert_absent(secrets: set[str], out: Path, proc) -> None:
    blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file()] + [proc.stdout.encode(), proc.stderr.encode()]
    for s in secrets:
        for variant in {s, s.replace("^", " ")}:
            assert not any(variant.encode() in b for b in blobs), f"identifier {variant!r} leaked"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (apt-get install chromium; .ci/run installs it)")


def test_tcia_archive_rows_studies_no_identifiers_and_report(tmp_path):
    root = shared_dataset("tcia-covid19-ny-sbu-dicom")
    files = sorted(root.rglob("*.dcm"))
    work = tmp_path / "arch"
    shutil.copytree(root, work)
    shutil.copy(dicom_file("CT_small.dcm"), work / "COVID" / "ct_small.dcm")  # has a name and an institution
    files = sorted(work.rglob("*.dcm"))
    model = tiny_model(tmp_path / "m.onnx", (256, 256), threshold=0.35)
    out = tmp_path / "o"
    r = run_cli("covidct-batch", work, "--model", model, "--out", out, "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_rows(out)
    assert len(rows) == len(files) and (rows.status == "ok").all()  # the abdominal slice too
    assert rows.sop_uid.is_unique
    import pandas as pd
    studies = pd.read_parquet(out / "studies.parquet")
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
    assert sorted(studies[studies.level == "study"].study) == sorted(uids)

    # TCIA's UIDs are random; CT_small's embed its study date, which only --pseudonymize removes
    tcia = [f for f in files if f.name != "ct_small.dcm"]
    secrets = _identifiers(files) | _identifiers(tcia, ("StudyDate",))
    assert {"A027284", "JFK IMAGING CENTER", "19000925"} <= secrets
    _assert_absent(secrets, out, r)
    env = {**os.environ, "COVIDCT_PSEUDONYM_KEY": "secret-key-for-tests"}
    pr = run_cli("covidct-batch", work, "--model", model, "--out", tmp_path / "pseudo", "--pseudonymize",
                 "--no-progress", env=env)
    assert pr.returncode == 0, pr.stderr[-2000:]
    _assert_absent(secrets | _identifiers(files, ("StudyDate",)), tmp_path / "pseudo", pr)

    html = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom",
                           (out / "report.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "Research use only" in html and 'id="histogram"' in html
    assert f"<td class=\"n-ok\">{len(files)}</td>" in html
    flagged = studies[(studies.level == "study") & studies.decision]
    # thumbnails only where the header says no text is burned in (absent or YES: none)
    no_text = [f for f in files if str(pydicom.dcmread(f, stop_before_pixels=True).get("BurnedInAnnotation", ""))
               .strip().upper() == "NO"]
    assert len(flagged) > 0 and (html.count("data:image/jpeg;base64,") > 0) == bool(no_text)
    assert all(s in html for s in flagged.study)
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html


def _raw(ds, tag: int, vr: str, value: bytes) -> None:
    """Put a malformed value in the header as a scanner (or an attacker) would write it."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag
    ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def test_a_malformed_header_value_is_that_files_row_alone(tmp_path):
    root = tmp_path / "Doe^Jane"
    root.mkdir()
    for i in range(6):  # good PNGs in the same batch
        ok, buf = cv2.imencode(".png", np.random.default_rng(i).integers(0, 256, (80, 80), dtype=np.uint8))
        (root / f"good{i}.png").write_bytes(buf.tobytes())
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    ds.PatientName = "Doe^Jane"
    _raw(ds, 0x00200013, "IS", b"abc ")  # InstanceNumber: absent, the slice is still screened
    ds.save_as(root / "bad-instance.dcm")
    _raw(ds, 0x00281053, "DS", b"QX7Z")  # RescaleSlope: no HU without it, this file is an error row
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(root / "bad-slope.dcm")
    out = tmp_path / "o"
    r = run_cli("covidct-batch", root, "--model", tiny_model(tmp_path / "m.onnx", (64, 64)), "--out", out,
                "--batch-size", "32", "--no-progress", "--num-cpus", "2")
    assert r.returncode == 1, r.stderr[-2000:]
    rows = read_rows(out)
    assert len(rows) == 8 and (rows.reason != "internal").all()
    by_name = {Path(p).name: row for p, (_, row) in zip(rows.path, rows.iterrows())}
    assert all(by_name[f"good{i}.png"].status == "ok" for i in range(6))
    inst = by_name["bad-instance.dcm"]
    assert inst.status == "ok" and pd_isna(inst.instance_number)
    slope = by_name["bad-slope.dcm"]
    assert (slope.status, slope.reason) == ("error", "corrupt") and "QX7Z" not in slope.message
    assert "QX7Z" not in r.stderr + r.stdout and "abc" not in r.stderr
    assert all("Doe^Jane" not in p for p in rows[rows.path.str.endswith(".dcm")].path)  # redacted


def pd_isna(v) -> bool:
    import pandas as pd
    return bool(pd.isna(v))


def _deflated_bomb(path: Path, rows: int, cols: int, payload_bytes: int) -> Path:
    """A deflated CT object without NumberOfFrames whose pixel payload is ``payload_bytes`` of zeros,
    written in a streaming way (a few KB on disk per MB of payload; never whole in memory)."""
    import io
    import struct
    import zlib

    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    del ds.PixelData
    ds.Rows, ds.Columns = rows, cols
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = io.BytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(pydicom.filebase.DicomFileLike(head), ds.file_meta, enforce_standard=True)
    body = pydicom.filebase.DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as f:
        f.write(head.getvalue())
        f.write(z.compress(body.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, payload_bytes)))
        zeros = bytes(1 << 20)
        for i in range(0, payload_bytes, len(zeros)):
            f.write(z.compress(zeros[:min(len(zeros), payload_bytes - i)]))
        f.write(z.flush())
    return path


def test_frame_bombs_become_one_too_large_row_within_a_fixed_memory_budget(tmp_path):
    small = _deflated_bomb(tmp_path / "small-bomb.dcm", 16, 16, 16 * 16 * 2 * 4096)  # 4,096 frames' worth
    big = _deflated_bomb(tmp_path / "big-bomb.dcm", 512, 512, 400 << 20)  # inflates to 400 MB
    assert small.stat().st_size < 20_000 and big.stat().st_size < 600_000
    out = tmp_path / "o"
    r = run_cli("covidct-batch", small, big, "--model", tiny_model(tmp_path / "m.onnx", (64, 64)), "--out", out,
                "--no-progress", "--num-cpus", "2")
    rows = read_rows(out)
    assert r.returncode == 1 and len(rows) == 2, r.stderr[-2000:]
    assert (rows.status == "error").all() and (rows.reason == "too_large").all(), rows.message.tolist()
    # the decode itself, in a fresh process: its peak memory barely moves
    probe = subprocess.run([sys.executable, "-c", f"""
import resource
from covidct.engine.contract import LUNG_WINDOW
from covidct.engine.decode import DecodeError, decode_inputs
data = open({str(big)!r}, 'rb').read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode_inputs(data, (64, 64), 'area', window=LUNG_WINDOW)
    print('decoded')
except DecodeError as e:
    print(e.code, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""], capture_output=True, text=True, cwd=ROOT, timeout=300)
    code, grew_mb = probe.stdout.split()
    assert code == "too_large" and int(grew_mb) < 64, probe.stdout + probe.stderr[-2000:]


PLANTED = {"PatientName": "Doe^Johnathan", "PatientID": "ZQ", "PatientBirthDate": "19610407",
           "StudyDate": "20200315", "InstitutionName": "Saint Elsewhere Hospital", "AccessionNumber": "ACX99317"}
#: Every form in which the planted values may be written into a path, a name or a log.
VARIANTS = ["Doe^Johnathan", "DOE^JOHNATHAN", "Doe_Johnathan", "doe johnathan", "Johnathan", "19610407", "1961-04-07",
            "07.04.1961", "20200315", "2020-03-15", "15.03.2020", "Elsewhere", "ACX99317"]
SHORT = ["ZQ"]  # too short to search in binary blobs; searched in every text value and on the console


def _plant(root: Path) -> None:
    """A patient's folder as archives name them, with DICOM, a truncated DICOM, burned-in text and siblings."""
    patient = root / "DOE^JOHNATHAN_ZQ" / "Doe_Johnathan_2020-03-15_ACX99317"
    patient.mkdir(parents=True)
    ds = pydicom.dcmread(dicom_file("CT_small.dcm"))
    for k, v in PLANTED.items():
        setattr(ds, k, v)
    ds.BurnedInAnnotation = "YES"
    for i in range(3):
        ds.SOPInstanceUID = generate_uid()
        ds.save_as(patient / f"19610407_{i}.dcm")
    data = (patient / "19610407_0.dcm").read_bytes()
    (patient / "15.03.2020_trunc.dcm").write_bytes(data[:len(data) // 2])  # truncated: an error row
    (patient / "notes_doe_johnathan.txt").write_text("clinical notes\n")  # a sibling: skipped
    img = np.zeros((200, 200), np.uint8)
    cv2.putText(img, "DOE JOHNATHAN", (5, 100), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 2)
    cv2.imwrite(str(patient / "scout_Johnathan.png"), img)  # a sibling image
    (root / "DOE^JOHNATHAN_ZQ" / "README").write_text("nothing")


def _texts(value) -> list[str]:
    if isinstance(value, (bytes, bytearray)):
        return [bytes(value).decode("latin-1")]
    return [str(value)] if value is not None else []


def test_no_planted_identifier_leaks_by_any_route(tmp_path):
    import pandas as pd
    import pyarrow.parquet as pq

    from covidct.engine.sink import row_key

    root = tmp_path / "archive"
    _plant(root)
    out = tmp_path / "out"
    model = tiny_model(tmp_path / "m.onnx", (64, 64), threshold=0.0)  # every slice flagged: thumbnails wanted
    env = {**os.environ, "COVIDCT_PSEUDONYM_KEY": "k" * 32}
    ray_logs = Path("/tmp/ray")
    before = {p for p in ray_logs.glob("session_*")} if ray_logs.exists() else set()
    r = run_cli("covidct-batch", root / "DOE^JOHNATHAN_ZQ", "--model", model, "--out", out, "--pseudonymize",
                "--group-by", "parent", "--num-cpus", "2", "--no-progress", "--verbose", env=env)
    assert r.returncode == 1, r.stderr[-3000:]  # the truncated DICOM
    rows = read_rows(out)
    assert len(rows) == 7 and (rows.status == "ok").sum() == 4
    # burned-in text: no thumbnail for DICOM whose BurnedInAnnotation is YES
    assert rows[rows.path.str.endswith(".dcm") & (rows.status == "ok")].thumbnail.isna().all()
    # and under --pseudonymize none at all: the PNG's burned-in name survives the lung crop
    assert rows.thumbnail.isna().all() and "data:image/jpeg" not in (out / "report.html").read_text()

    texts = [r.stdout, r.stderr]
    for f in out.rglob("*"):
        if not f.is_file():
            continue
        texts.append(f.name)
        texts.extend(_texts(f.read_bytes()))  # raw bytes (run.json, report.html, the lock)
        if f.suffix == ".parquet":  # compressed: read every value
            for col in pq.read_table(f).to_pandas().astype(object).to_numpy().ravel():
                texts.extend(_texts(col))
    for session in ({p for p in ray_logs.glob("session_*")} - before):
        for f in session.rglob("*"):
            if f.is_file() and f.suffix in (".log", ".out", ".err", ".txt", ".json"):
                texts.extend(_texts(f.read_bytes()))
    blob = "\n".join(texts)
    for v in VARIANTS:
        assert v.lower() not in blob.lower(), v
    words = "\n".join([r.stdout, r.stderr, *[str(x) for x in rows.astype(object).drop(columns="thumbnail")
                                              .to_numpy().ravel()], (out / "run.json").read_text()])
    for v in SHORT:
        assert not pd.Series(words.split()).str.fullmatch(rf".*(?<![A-Za-z0-9]){v}(?![A-Za-z0-9]).*").any(), v
    # the row key is a MAC: the unkeyed hash of (model, size, mtime, path) of each real file matches none
    real = [p for p in (root / "DOE^JOHNATHAN_ZQ").rglob("*") if p.is_file()]
    unkeyed = {row_key(str(p), p.stat().st_size, p.stat().st_mtime_ns, rows.model_sha256.iloc[0]) for p in real}
    assert not unkeyed & set(rows.key)
    assert oct((out / ".covidct-secret").stat().st_mode & 0o777) == "0o600"


def test_the_deflated_syntax_is_looked_for_in_the_meta_group_pydicom_reads():
    """check_deflated searches the meta group only (86 us -> 5 us a 512 KB slice): where it ends must be where
    pydicom's own meta reader stops, on every DICOM file pydicom and pydicom-data ship; where its elements are
    not plain explicit VR (an implicit-VR meta group, which pydicom retries), the whole file is searched."""
    import io

    from pydicom.data import get_testdata_files
    from pydicom.filereader import _read_file_meta_info, read_preamble

    from covidct.engine.dicom import _DEFLATED_UID, _meta_end

    seen = deflated = 0
    for f in sorted(set(get_testdata_files("*"))):
        if not os.path.isfile(f):
            continue
        data = Path(f).read_bytes()
        fp = io.BytesIO(data)
        try:
            read_preamble(fp, force=True)
            _read_file_meta_info(fp)
        except Exception:  # noqa: BLE001  not readable as DICOM: pydicom fails on it before any inflating
            continue
        end = _meta_end(data)
        assert end is None or end == fp.tell(), f
        seen += end is not None
        if _DEFLATED_UID in data[:fp.tell()]:
            deflated += 1
            assert end is not None and _DEFLATED_UID in data[:end], f
    assert seen >= 100 and deflated >= 1, (seen, deflated)
    # an implicit-VR meta group: (0002,0010) with a 4-byte length where the VR would be
    uid = _DEFLATED_UID + b"\0"
    implicit = b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00" + len(uid).to_bytes(4, "little") + uid + b"\x08\x00"
    assert _meta_end(implicit) is None
