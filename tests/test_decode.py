"""The shared decode+resize function: formats by content, grey conversion, refusals with reasons."""

import struct
import zlib

import cv2
import numpy as np
import pytest

from covidct.engine.decode import (DecodeError, decode_and_resize, decode_file, header_size, sniff)

SIZE = (48, 40)  # (height, width): non-square on purpose


def encode(img, ext, params=()):
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


@pytest.fixture
def grey():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (120, 100), dtype=np.uint8)


@pytest.mark.parametrize("ext", [".png", ".bmp", ".tiff", ".jpg"])
def test_formats_decode_to_grey_of_contract_size(grey, ext):
    data = encode(grey, ext)
    out = decode_and_resize(data, SIZE, "area")  # the reference's resize: the decode alone is compared
    assert out.shape == SIZE and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
    ref = cv2.resize(grey, (SIZE[1], SIZE[0]), interpolation=cv2.INTER_AREA)
    tol = 12 if ext == ".jpg" else 0  # JPEG is lossy; the others must be exact
    assert np.abs(out.astype(int) - ref).max() <= tol
    assert header_size(data, sniff(data[:132])) == (100, 120)


def test_format_is_recognised_by_content_not_extension(grey, tmp_path):
    p = tmp_path / "really_a_png.jpg"
    p.write_bytes(encode(grey, ".png"))
    assert decode_file(p, SIZE).shape == SIZE


def test_rgb_rgba_and_16bit_become_the_same_grey(grey):
    bgr = cv2.merge([grey, grey, grey])
    bgra = cv2.merge([grey, grey, grey, np.full_like(grey, 255)])
    g16 = grey.astype(np.uint16) * 257
    ref = decode_and_resize(encode(grey, ".png"), SIZE)
    for img in (bgr, bgra, g16):
        assert np.array_equal(decode_and_resize(encode(img, ".png"), SIZE), ref)


def test_colour_channels_are_weighted_not_dropped():
    img = np.zeros((20, 20, 3), np.uint8)
    img[..., 2] = 255  # pure red in BGR
    out = decode_and_resize(encode(img, ".png"), (20, 20))
    assert 70 <= out.mean() <= 80  # 0.299 * 255


@pytest.mark.parametrize("data,code", [
    (b"", "empty"),
    (b"hello, this is a text file\n", "not_an_image"),
    (b"\x00\x00\x00\x01Bud1" + b"\x00" * 200, "not_an_image"),  # .DS_Store
])
def test_refusals(data, code):
    with pytest.raises(DecodeError) as e:
        decode_and_resize(data, SIZE)
    assert e.value.code == code
    assert e.value.skipped == (code == "not_an_image")


def test_truncated_jpeg_and_png_are_errors(grey):
    for ext in (".jpg", ".png"):
        data = encode(grey, ext)
        with pytest.raises(DecodeError) as e:
            decode_and_resize(data[: len(data) // 2], SIZE)
        assert e.value.code in ("truncated", "corrupt"), ext


def test_corrupt_body_is_an_error(grey):
    data = bytearray(encode(grey, ".png"))
    data[60:400] = b"\x00" * 340
    with pytest.raises(DecodeError) as e:
        decode_and_resize(bytes(data), SIZE)
    assert e.value.code == "corrupt"


def _png_header_only(width, height):
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + iend


def test_decompression_bomb_refused_from_header():
    with pytest.raises(DecodeError) as e:
        decode_and_resize(_png_header_only(100_000, 100_000), SIZE)
    assert e.value.code == "too_large"


def test_dicom_header_without_pixels_is_a_reasoned_row():
    data = b"\x00" * 128 + b"DICM" + b"\x00" * 64
    with pytest.raises(DecodeError) as e:
        decode_and_resize(data, SIZE)
    assert e.value.code in ("corrupt", "not_ct_image")


def test_unreadable_path(tmp_path):
    with pytest.raises(DecodeError) as e:
        decode_file(tmp_path / "missing.png", SIZE)
    assert e.value.code == "unreadable"
