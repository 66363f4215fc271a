"""What a decoder will allocate, read from headers without decoding: how decompression bombs are refused.

Used by ``engine.decode`` (PNG, BMP, JPEG, TIFF files) and ``engine.dicom`` (the JPEG, JPEG-LS and
JPEG 2000 codestreams inside encapsulated pixel data, bare or in JP2 boxes). Every header variant
of a supported format is read (an OS/2 bitmap's 16-bit sizes, a JPEG whose frame header follows
a large comment), and what costs memory or CPU beyond the image's own size is counted too: a
TIFF's tile or strip buffer, a progressive JPEG's scans.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

#: Most scans a progressive JPEG may hold. Encoders write 6 (grey) to 10 (colour) by default and a
#: full spectral/bit split of three components is under 70; each scan costs a pass over every
#: coefficient, so thousands of (tiny) scans cost minutes of CPU on one file.
MAX_JPEG_SCANS = 100
#: A TIFF tile or strip buffer may exceed the image (tiles come in multiples of 16) but not by more
#: than this many pixels: a 64x64 image declared in one 16,000x16,000 tile allocates 1 GB.
TILE_SLACK_PIXELS = 1 << 20

#: JPEG frame headers: SOF0..SOF15 but DHT (C4), JPG (C8) and DAC (CC); SOF55 (F7) is JPEG-LS.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
#: Any marker that ends entropy-coded data (0xFF then neither a stuffed 0x00, RSTn, nor a fill 0xFF).
_END_OF_SCAN = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")


@dataclass(frozen=True)
class Header:
    """What a header declares: the image's size and, where the format says, its samples and working buffer."""

    width: int
    height: int
    channels: int = 1
    bytes_per_sample: int = 1
    buffer_pixels: int = 0  # a TIFF's largest tile or strip
    scans: int = 1  # a JPEG's scans

    @property
    def pixels(self) -> int:
        return self.width * self.height


class HeaderError(ValueError):
    """A header that declares more work than a slice can need (the message says what)."""


def header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) read from the header without decoding, or None when it cannot be read."""
    h = read_header(data, fmt)
    return None if h is None else (h.width, h.height)


def read_header(data: bytes, fmt: str) -> Header | None:
    """The :class:`Header` of a PNG, BMP, JPEG or TIFF file, or None when it cannot be read."""
    try:
        if fmt == "png":
            if data[12:16] != b"IHDR":
                return None
            w, h, depth, colour = struct.unpack(">IIBB", data[16:26])
            # what OpenCV's IMREAD_UNCHANGED gives: palette -> BGR, grey+alpha -> BGRA
            channels = {0: 1, 2: 3, 3: 3, 4: 4, 6: 4}.get(colour, 4)
            return Header(w, h, channels, 2 if depth == 16 else 1)
        if fmt == "bmp":
            return _bmp_header(data)
        if fmt == "jpeg":
            return _jpeg_header(data, count_scans=True)
        if fmt == "tiff":
            return _tiff_header(data)
    except (struct.error, IndexError):
        return None
    return None


def _bmp_header(data: bytes) -> Header | None:
    (dib,) = struct.unpack("<I", data[14:18])
    if dib == 12:  # OS/2 1.x BITMAPCOREHEADER: unsigned 16-bit sizes
        w, h, _planes, bits = struct.unpack("<HHHH", data[18:26])
    elif dib in (16, 40, 52, 56, 64, 108, 124):  # OS/2 2.x, BITMAPINFOHEADER and its V2..V5 extensions
        w, h = struct.unpack("<ii", data[18:26])
        (bits,) = struct.unpack("<H", data[28:30])
    else:
        return None
    return Header(abs(w), abs(h), 4 if bits == 32 else 3 if bits > 8 else 1)


def _jpeg_header(data: bytes, count_scans: bool = False) -> Header | None:
    """The frame header of a JPEG or JPEG-LS codestream, found by walking its segments (never a fixed
    window of bytes: a large APP or COM segment may come first); with ``count_scans`` also its scans."""
    i, n = 2, len(data)
    frame: Header | None = None
    scans = 0
    while i + 4 <= n:
        if data[i] != 0xFF:  # damaged: resynchronise on the next marker, as libjpeg does
            i = data.find(b"\xff", i)
            if i < 0:
                break
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # stand-alone markers
            i += 2
            continue
        (seg_len,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in _SOF and frame is None:
            bits, h, w, comps = struct.unpack(">BHHB", data[i + 4:i + 10])
            frame = Header(w, h, max(1, comps), 2 if bits > 8 else 1)
            if not count_scans:
                return frame
        i += 2 + seg_len
        if marker == 0xDA:  # SOS: entropy-coded data follows, up to the next marker
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise HeaderError(f"JPEG holds more than {MAX_JPEG_SCANS} scans (a progressive-scan bomb)")
            m = _END_OF_SCAN.search(data, i)
            if m is None:
                break
            i = m.start()
    if frame is None:
        return None
    return Header(frame.width, frame.height, frame.channels, frame.bytes_per_sample, scans=scans)


def _tiff_header(data: bytes) -> Header | None:
    endian = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(endian + "I", data[4:8])
    (count,) = struct.unpack(endian + "H", data[ifd:ifd + 2])
    tags: dict[int, int] = {}
    for k in range(count):
        entry = data[ifd + 2 + 12 * k: ifd + 14 + 12 * k]
        tag, typ, cnt = struct.unpack(endian + "HHI", entry[:8])
        if typ not in (3, 4) or tag not in (256, 257, 258, 277, 278, 322, 323):
            continue
        size = 2 if typ == 3 else 4
        fmt = endian + ("H" if typ == 3 else "I")
        if cnt * size <= 4:
            (val,) = struct.unpack(fmt, entry[8:8 + size])
        else:  # BitsPerSample of several samples: the values are elsewhere; the first one counts
            (off,) = struct.unpack(endian + "I", entry[8:12])
            (val,) = struct.unpack(fmt, data[off:off + size])
        tags[tag] = val
    if 256 not in tags or 257 not in tags:
        return None
    w, h = tags[256], tags[257]
    if 322 in tags or 323 in tags:  # tiled: OpenCV allocates one whole tile
        buffer = tags.get(322, 0) * tags.get(323, 0)
    else:  # stripped: RowsPerStrip rows at a time (libtiff clamps it to the image)
        buffer = w * min(tags.get(278, h) or h, h)
    bits = tags.get(258, 1)
    return Header(w, h, max(1, tags.get(277, 1)), max(1, (bits + 7) // 8), buffer_pixels=buffer)


def check_budget(head: Header, max_pixels: int) -> None:
    """Raise :class:`HeaderError` when decoding ``head`` would allocate more than ``max_pixels`` allow:
    the image itself, its samples (up to 4 bytes a pixel), a TIFF's tile or strip buffer."""
    if head.pixels > max_pixels:
        raise HeaderError(f"{head.width}x{head.height} pixels exceeds the limit of {max_pixels:,} "
                          "(possible decompression bomb); refused before decoding")
    if head.pixels * head.channels * head.bytes_per_sample > 4 * max_pixels:
        raise HeaderError(f"{head.width}x{head.height} pixels of {head.channels} x {8 * head.bytes_per_sample} bits "
                          f"exceed the limit of {4 * max_pixels:,} decoded bytes; refused before decoding")
    slack = max(head.pixels, TILE_SLACK_PIXELS)
    if head.buffer_pixels > min(slack, max_pixels):
        raise HeaderError(f"a {head.width}x{head.height} image declared in tiles or strips of "
                          f"{head.buffer_pixels:,} pixels (a tile bomb); refused before decoding")


def codestream_header(fragment: bytes) -> Header | None:
    """The frame a JPEG, JPEG-LS or JPEG 2000 codestream declares (bare or in JP2 boxes), read from the
    whole fragment; None when the fragment starts none of them (a continuation fragment, RLE)."""
    try:
        if fragment[:4] == b"\xff\x4f\xff\x51" and len(fragment) >= 40:  # SOC, SIZ
            return _siz(fragment, 2)
        if fragment[:2] == b"\xff\xd8":
            return _jpeg_header(fragment)
        if fragment[4:8] == b"jP  ":  # JP2 file format: boxes around the codestream
            return _jp2_header(fragment)
    except (struct.error, IndexError):
        return None
    return None


def _siz(data: bytes, at: int) -> Header:
    """A JPEG 2000 SIZ segment at ``at`` (its marker): Xsiz, Ysiz, XOsiz, YOsiz, ..., Csiz, Ssiz."""
    x, y, xo, yo = struct.unpack(">IIII", data[at + 6:at + 22])
    (comps,) = struct.unpack(">H", data[at + 38:at + 40])
    depth = (data[at + 40] & 0x7F) + 1 if len(data) > at + 40 else 8
    return Header(max(0, x - xo), max(0, y - yo), max(1, comps), 2 if depth > 8 else 1)


def _jp2_header(data: bytes) -> Header | None:
    i, n = 0, len(data)
    while i + 8 <= n:
        length, kind = struct.unpack(">I4s", data[i:i + 8])
        head = 8
        if length == 1:  # 64-bit length
            (length,) = struct.unpack(">Q", data[i + 8:i + 16])
            head = 16
        elif length == 0:  # up to the end
            length = n - i
        if kind == b"jp2c":
            at = i + head
            if data[at:at + 4] != b"\xff\x4f\xff\x51":
                return None
            return _siz(data, at + 2)
        if length < head:
            return None
        i += length
    return None


def codestream_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) a JPEG, JPEG-LS or JPEG 2000 codestream declares; None if none."""
    h = codestream_header(head)
    return None if h is None else (h.width, h.height)
