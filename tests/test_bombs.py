"""Bombs that pass a plain header check (issue 20, item 16): what a decoder will allocate or spend is read
from every header variant, each codestream kind is counted, frames are capped, and valid variants decode."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless

from covidct.engine.dicom import MAX_FRAMES
from covidct.engine.headers import MAX_JPEG_SCANS
from tests.conftest import ROOT, read_rows, run_cli, tiny_model

HUGE = 20_000  # a 20,000 x 20,000 frame: 400 MP, eight times the pixel limit


def tiff_in_one_huge_tile(w: int = 64, h: int = 64, tile: int = 15_872) -> bytes:
    """A 151-byte TIFF of a 64x64 image declared in one tile of ``tile`` x ``tile`` (deflate, 1 KB of zeros):
    OpenCV allocates the whole tile (about 1 GB of RGBA) before it reads a byte of it."""
    payload = zlib.compress(b"\x00" * 1024)
    entries = [(256, 3, w), (257, 3, h), (258, 3, 8), (259, 3, 8), (262, 3, 1), (277, 3, 1),
               (322, 4, tile), (323, 4, tile), (324, 4, None), (325, 4, len(payload))]
    data_at = 8 + 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<IH", 8, len(entries)))
    for tag, typ, val in entries:
        out += struct.pack("<HHIH2x" if typ == 3 else "<HHII", tag, typ, 1, data_at if val is None else val)
    return bytes(out + struct.pack("<I", 0) + payload)


def progressive_jpeg(extra_scans: int, side: int = 2048) -> bytes:
    """A valid progressive JPEG of ``side`` x ``side`` (within the pixel limit), its last scan repeated
    ``extra_scans`` times: libjpeg decodes every one of them, a pass over all coefficients each."""
    b = bytes(cv2.imencode(".jpg", np.zeros((side, side), np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1])
    last, eoi = b.rfind(b"\xff\xda"), b.rfind(b"\xff\xd9")
    return b[:eoi] + b[last:eoi] * extra_scans + b"\xff\xd9"


def os2_bitmap(w: int = 64, h: int = 48) -> bytes:
    """A valid 24-bit OS/2 1.x bitmap (BITMAPCOREHEADER: 16-bit width and height), a gradient."""
    row = (w * 3 + 3) & ~3
    img = np.zeros((h, row), np.uint8)
    img[:, :w * 3] = np.repeat(np.linspace(0, 255, w, dtype=np.uint8), 3)[None]
    return (b"BM" + struct.pack("<IHHI", 26 + img.size, 0, 0, 26) + struct.pack("<IHHHH", 12, w, h, 1, 24)
            + img.tobytes())


def jpeg_with_frame_after_a_comment(w: int = HUGE, h: int = HUGE, comment: int = 8000) -> bytes:
    """A JPEG whose SOF (declaring w x h) follows an 8 KB COM segment: past a fixed 4 KB look-ahead."""
    b = bytes(cv2.imencode(".jpg", np.zeros((64, 64), np.uint8))[1])
    i = b.find(b"\xff\xc0")
    sof = bytearray(b[i:i + 2 + struct.unpack(">H", b[i + 2:i + 4])[0]])
    struct.pack_into(">HH", sof, 5, h, w)
    return b[:2] + b"\xff\xfe" + struct.pack(">H", comment + 2) + b"x" * comment + b[2:i] + bytes(sof) + b[i + len(sof):]


def j2k(w: int = HUGE, h: int = HUGE) -> bytes:
    """A JPEG 2000 codestream (SOC, SIZ, COD, QCD, one empty tile) declaring w x h, one 8-bit component."""
    siz = b"\xff\x51" + struct.pack(">HHIIIIIIIIH", 41, 0, w, h, 0, 0, w, h, 0, 0, 1) + bytes([7, 1, 1])
    cod = b"\xff\x52" + struct.pack(">HBBHBBBBBB", 12, 0, 0, 1, 0, 5, 4, 4, 0, 1)
    qcd = b"\xff\x5c" + struct.pack(">HB", 4, 0x40) + b"\x48"
    sot = b"\xff\x90" + struct.pack(">HHIBB", 10, 0, 16, 0, 1)
    return b"\xff\x4f" + siz + cod + qcd + sot + b"\xff\x93\x00\x00\xff\xd9"


def jp2(w: int = HUGE, h: int = HUGE) -> bytes:
    """The codestream in JP2 boxes (signature, ftyp, jp2h, a 6 KB xml box, jp2c): no SOC at the start."""
    cs = j2k(w, h)
    ihdr = struct.pack(">I4sIIHBBBB", 22, b"ihdr", h, w, 1, 7, 7, 0, 0)
    colr = struct.pack(">I4sBBBI", 15, b"colr", 1, 0, 0, 17)
    return (struct.pack(">I4s", 12, b"jP  ") + b"\r\n\x87\n" + struct.pack(">I4s4sI4s", 20, b"ftyp", b"jp2 ", 0, b"jp2 ")
            + struct.pack(">I4s", 8 + len(ihdr) + len(colr), b"jp2h") + ihdr + colr
            + struct.pack(">I4s", 8 + 6000, b"xml ") + b" " * 6000 + struct.pack(">I4s", 8 + len(cs), b"jp2c") + cs)


def jpeg_ls(w: int = HUGE, h: int = HUGE) -> bytes:
    """A JPEG-LS codestream: its frame header is SOF55 (0xFFF7), which is not one of SOF0..SOF15."""
    sof = b"\xff\xf7" + struct.pack(">HBHHB", 11, 8, h, w, 1) + bytes([1, 0x11, 0])
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + bytes([1, 0, 0, 0, 0])
    return b"\xff\xd8" + sof + sos + b"\x00" * 64 + b"\xff\xd9"


def ct_dicom(path: Path, ts, pixel_data: bytes, **attrs) -> Path:
    """pydicom's CT_small relabelled: its pixel data replaced (encapsulated for a compressed ``ts``)."""
    from pydicom.data import get_testdata_file

    src = get_testdata_file("CT_small.dcm", download=False)
    if src is None:
        pytest.skip("CT_small.dcm is not installed (pydicom-data)")
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = ts
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    if ts.is_compressed:
        ds.PixelData = encapsulate([pixel_data])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = pixel_data
    ds.save_as(path, enforce_file_format=True)
    return path


def test_bombs_past_the_header_check_are_too_large_rows_and_valid_variants_decode(tmp_path):
    d = tmp_path / "archive"
    d.mkdir()
    bombs = {
        "tile.tif": ("tile bomb", tiff_in_one_huge_tile()),
        "scans.jpg": ("scans", progressive_jpeg(MAX_JPEG_SCANS + 50)),
    }
    for name, (_, data) in bombs.items():
        (d / name).write_bytes(data)
    dicoms = {
        "frame-after-comment.dcm": ("20000x20000", ct_dicom(d / "frame-after-comment.dcm", JPEGBaseline8Bit,
                                                            jpeg_with_frame_after_a_comment())),
        "jp2-boxes.dcm": ("20000x20000", ct_dicom(d / "jp2-boxes.dcm", JPEG2000Lossless, jp2())),
        "jpeg-ls.dcm": ("20000x20000", ct_dicom(d / "jpeg-ls.dcm", JPEGLSLossless, jpeg_ls())),
        # 20,000 4x4 1-bit frames: 320,000 pixels in a 40 KB file, yet 20,000 inputs and rows
        "many-frames.dcm": (f"limit of {MAX_FRAMES:,}", ct_dicom(
            d / "many-frames.dcm", ExplicitVRLittleEndian, bytes(20_000 * 16 // 8), Rows=4, Columns=4,
            NumberOfFrames=20_000, BitsAllocated=1, BitsStored=1, HighBit=0)),
    }
    assert (d / "many-frames.dcm").stat().st_size < 50_000 and (d / "tile.tif").stat().st_size < 200
    (d / "os2.bmp").write_bytes(os2_bitmap())
    (d / "progressive.jpg").write_bytes(progressive_jpeg(0, side=256))  # a few scans: a normal file
    out = tmp_path / "out"
    r = run_cli("covidct-batch", d, "--model", tiny_model(tmp_path / "m.onnx", (64, 64)), "--out", out,
                "--no-progress", "--num-cpus", "2")
    rows = read_rows(out).set_index("path")
    rows.index = [Path(p).name for p in rows.index]
    assert r.returncode == 1 and len(rows) == 8, r.stderr[-3000:]
    for name, (words, _) in {**bombs, **dicoms}.items():
        assert (rows.status[name], rows.reason[name]) == ("error", "too_large"), (name, rows.message[name])
        assert words in rows.message[name], (name, rows.message[name])
    # the OS/2 header is read as 64x48 (not 4 billion pixels), the progressive JPEG as an image
    assert (rows.status[["os2.bmp", "progressive.jpg"]] == "ok").all(), rows.message.to_dict()


def test_a_refused_bomb_costs_neither_the_memory_nor_the_time_the_decoder_would_spend(tmp_path):
    """In a fresh process: the tile TIFF through OpenCV alone grows the process by hundreds of MB, through
    decode_inputs by almost nothing; the scan bomb costs OpenCV over ten times what its refusal costs."""
    tif, jpg = tmp_path / "tile.tif", tmp_path / "scans.jpg"
    tif.write_bytes(tiff_in_one_huge_tile())
    jpg.write_bytes(progressive_jpeg(400))
    probe = subprocess.run([sys.executable, "-c", f"""
import resource, time
import cv2, numpy as np
from covidct.engine.decode import DecodeError, decode_inputs
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
def refused(path):
    t = time.process_time()
    try:
        decode_inputs(open(path, 'rb').read(), (64, 64))
        return 'decoded', time.process_time() - t
    except DecodeError as e:
        return e.code, time.process_time() - t
before = rss(); code, _ = refused({str(tif)!r}); ours = rss() - before
cv2.imdecode(np.fromfile({str(tif)!r}, np.uint8), cv2.IMREAD_UNCHANGED); theirs = rss() - before
jcode, jt = refused({str(jpg)!r})
t = time.process_time(); cv2.imdecode(np.fromfile({str(jpg)!r}, np.uint8), cv2.IMREAD_GRAYSCALE); ct = time.process_time() - t
print(code, ours, theirs, jcode, jt, ct)
"""], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    code, ours, theirs, jcode, jt, ct = probe.stdout.split()
    assert code == "too_large" and int(ours) < 32 and int(theirs) > 200, probe.stdout + probe.stderr[-2000:]
    assert jcode == "too_large" and float(ct) > 10 * float(jt), probe.stdout
