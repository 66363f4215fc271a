"""Image sizes read from headers, without decoding: how decompression bombs are refused.

Used by ``engine.decode`` (PNG, BMP, JPEG, TIFF files) and ``engine.dicom`` (the JPEG and
JPEG 2000 codestreams inside encapsulated pixel data).
"""

from __future__ import annotations

import struct


def header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) read from the header without decoding, or None when it cannot be read."""
    try:
        if fmt == "png":
            if data[12:16] != b"IHDR":
                return None
            return struct.unpack(">II", data[16:24])
        if fmt == "bmp":
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
        if fmt == "jpeg":
            return _jpeg_size(data)
        if fmt == "tiff":
            return _tiff_size(data)
    except struct.error:
        return None
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        seg_len = struct.unpack(">H", data[i + 2:i + 4])[0]
        # SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) are not frames.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return w, h
        i += 2 + seg_len
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    endian = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(endian + "I", data[4:8])
    (count,) = struct.unpack(endian + "H", data[ifd:ifd + 2])
    dims: dict[int, int] = {}
    for k in range(count):
        entry = data[ifd + 2 + 12 * k: ifd + 14 + 12 * k]
        tag, typ = struct.unpack(endian + "HH", entry[:4])
        if tag in (256, 257):  # ImageWidth, ImageLength (SHORT or LONG)
            fmt = "H" if typ == 3 else "I"
            dims[tag] = struct.unpack(endian + fmt, entry[8:8 + struct.calcsize(fmt)])[0]
    if 256 in dims and 257 in dims:
        return dims[256], dims[257]
    return None


def codestream_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) a JPEG or JPEG 2000 codestream declares, from its first bytes; None if neither."""
    if head[:4] == b"\xff\x4f\xff\x51" and len(head) >= 24:  # SOC, SIZ: Xsiz, Ysiz, XOsiz, YOsiz
        x, y, xo, yo = struct.unpack(">IIII", head[8:24])
        return max(0, x - xo), max(0, y - yo)
    if head[:2] == b"\xff\xd8":
        return _jpeg_size(head)
    return None
