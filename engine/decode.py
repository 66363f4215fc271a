"""The one decode+resize function: bytes in, one grey uint8 image of the contract's size out.

Training (``train/``) imports it, the engine's Ray workers run it, benchmarks time it, so
a model always sees pixels made the same way. Formats are recognised by content, never by
extension. Every failure is a :class:`DecodeError` with a stable reason code, so a bad file
becomes a row in the output, not a crash.
"""

from __future__ import annotations

import os
import stat

import cv2
import numpy as np

from .contract import DEFAULT_INTERPOLATION, INTERPOLATIONS, LUNG_WINDOW
from .headers import HeaderError, check_budget, header_size, read_header  # noqa: F401
from .preprocess import preprocess

#: Refuse images with more pixels than this, from their header, before decoding
#: (a decompression bomb is a few KB on disk and gigabytes in memory). A CT slice is
#: at most a few megapixels; 50 MP leaves room for scanned films.
MAX_PIXELS = 50_000_000
#: Refuse files larger than this without reading them (no CT slice comes near it).
MAX_FILE_BYTES = 512 * 1024 * 1024

from .reasons import (CORRUPT, EMPTY, MULTI_FRAME, NOT_A_REGULAR_FILE, NOT_AN_IMAGE, SKIP_CODES,  # noqa: F401
                      TOO_LARGE, TRUNCATED, UNREADABLE, UNSUPPORTED_PIXELS, DecodeError, file_kind)


def sniff(head: bytes) -> str | None:
    """Name the image format from the first bytes of a file, or None if it is not one we read."""
    # DICOM first: its 128-byte preamble may itself hold a TIFF header (dual-format files).
    if head[128:132] == b"DICM":
        return "dicom"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:2] == b"BM" and len(head) >= 26:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def _check_complete(data: bytes, fmt: str) -> None:
    # OpenCV decodes a truncated JPEG without an error and fills the rest with grey:
    # a silent corruption the model would score. Insist on the end markers.
    tail = data.rstrip(b"\x00")
    if fmt == "jpeg" and not tail.endswith(b"\xff\xd9"):
        raise DecodeError(TRUNCATED, "JPEG has no end-of-image marker (file truncated?)")
    if fmt == "png" and b"IEND" not in tail[-16:]:
        raise DecodeError(TRUNCATED, "PNG has no IEND chunk (file truncated?)")


def to_grey_uint8(img: np.ndarray) -> np.ndarray:
    """Any decoded OpenCV image (grey, BGR, BGRA; 8 or 16 bit) to one uint8 grey channel.

    16-bit images map their full range linearly onto 0..255 (value / 257): the same
    rule for every file, so a model never sees a per-image stretch.
    """
    if img.ndim == 3:
        code = {3: cv2.COLOR_BGR2GRAY, 4: cv2.COLOR_BGRA2GRAY}.get(img.shape[2])
        if code is None:
            if img.shape[2] == 1:
                img = img[:, :, 0]
            else:
                raise DecodeError(UNSUPPORTED_PIXELS, f"{img.shape[2]} channels are not supported")
        else:
            img = cv2.cvtColor(img, code)
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return cv2.convertScaleAbs(img, alpha=1.0 / 257.0)
    raise DecodeError(UNSUPPORTED_PIXELS, f"pixel type {img.dtype} is not supported (8- or 16-bit only)")


def decode_frames(
    data: bytes,
    image_size: tuple[int, int],
    interpolation: str = DEFAULT_INTERPOLATION,
    *,
    window: dict[str, float] | None = None,
    preprocessing: dict | None = None,
    max_pixels: int = MAX_PIXELS,
    reduced_jpeg: bool = False,
) -> list[tuple[np.ndarray, "Slice | None"]]:
    """Decode one file's bytes to the model's inputs: grey uint8 images of ``image_size`` (height, width).

    :func:`decode_grey_frames` then :func:`resize` on each frame. Raster images give one frame; a
    DICOM object gives one per frame, each with its non-identifying coordinates (a
    :class:`engine.dicom.Slice`, else None).

    Args:
        data: the whole file's content.
        image_size: (height, width) of the output, from the model's contract.
        interpolation: key of ``contract.INTERPOLATIONS`` (from the contract).
        window: CT window (level, width in HU) for DICOM input, from the contract.
        preprocessing: the contract's ``preprocessing`` (``engine.preprocess``); None resizes the
            whole image (schema 1). DICOM goes through the window first, then the same steps, so a
            DICOM slice and a PNG export of it give nearly the same input.
        max_pixels: images whose header announces more pixels are refused before decoding.
        reduced_jpeg: decode JPEGs at least twice the output size at half scale in libjpeg's DCT
            (``cv2.IMREAD_REDUCED_GRAYSCALE_2``). Measured on 512x512 slices: 0.68 vs 0.78 ms (0.84 vs
            0.89 ms on an Intel Xeon, whose whole input path then takes 1.47 vs 1.68 ms), pixels
            within 4 grey levels, probabilities within 2e-4 of a full decode + the contract's
            interpolation: outside the 1e-4 parity bound, so it is opt-in (``--fast-jpeg``).

    Raises:
        DecodeError: with ``code`` one of this module's reason codes.
    """
    return [(img, sl) for img, sl, _ in decode_inputs(data, image_size, interpolation, window=window,
                                                       preprocessing=preprocessing, max_pixels=max_pixels,
                                                       reduced_jpeg=reduced_jpeg)]


def decode_inputs(data: bytes, image_size: tuple[int, int], interpolation: str = DEFAULT_INTERPOLATION, *,
                  window: dict[str, float] | None = None, preprocessing: dict | None = None,
                  max_pixels: int = MAX_PIXELS, reduced_jpeg: bool = False
                  ) -> list[tuple[np.ndarray, "Slice | None", "Framing | None"]]:
    """:func:`decode_frames` with what the preprocessing found about each frame (its
    :class:`engine.preprocess.Framing`, None for plain resizing): the shift alarm's raw material."""
    frames = decode_grey_frames(data, window=window, max_pixels=max_pixels,
                                reduced_jpeg_for=image_size if reduced_jpeg else None)
    out = []
    for grey, sl in frames:
        img, framing = preprocess(grey, image_size, INTERPOLATIONS[interpolation], preprocessing)
        out.append((img, sl, framing))
    return out


def decode_grey_frames(data: bytes, *, window: dict[str, float] | None = None, max_pixels: int = MAX_PIXELS,
                       reduced_jpeg_for: tuple[int, int] | None = None) -> list[tuple[np.ndarray, "Slice | None"]]:
    """The first half of :func:`decode_frames`: one file's bytes to grey uint8 frames at their own size.

    Training uses it to augment an image before the contract's preprocessing (``resize``), so that
    what it trains on and what the engine screens are made by the same two functions.
    """
    if not data:
        raise DecodeError(EMPTY, "file is empty")
    fmt = sniff(data[:132])
    if fmt is None:
        from .dicom import looks_like_dicom_without_preamble
        if not looks_like_dicom_without_preamble(data[:16]):
            raise DecodeError(NOT_AN_IMAGE, "not a JPEG, PNG, BMP, TIFF or DICOM file (recognised by content)")
        fmt = "dicom"
    if fmt == "dicom":
        from .dicom import decode_dicom
        return [(s.image, s) for s in decode_dicom(data, window or LUNG_WINDOW, max_pixels)]
    try:
        head = read_header(data, fmt)
        if head is not None:
            check_budget(head, max_pixels)
    except HeaderError as e:
        raise DecodeError(TOO_LARGE, str(e)) from None
    if head is None:
        raise DecodeError(CORRUPT, f"{fmt.upper()} header is unreadable")
    if head.width == 0 or head.height == 0:
        raise DecodeError(CORRUPT, f"{fmt.upper()} header announces an empty image")
    _check_complete(data, fmt)
    buf = np.frombuffer(data, dtype=np.uint8)
    # JPEG: libjpeg converts to grey itself (luma only, no chroma upsampling), which is
    # faster and equals BGR2GRAY; other formats keep depth and alpha for to_grey_uint8.
    flags = cv2.IMREAD_GRAYSCALE if fmt == "jpeg" else cv2.IMREAD_UNCHANGED
    small = reduced_jpeg_for
    if small is not None and fmt == "jpeg" and head.width >= 2 * small[1] and head.height >= 2 * small[0]:
        flags = cv2.IMREAD_REDUCED_GRAYSCALE_2
    try:
        img = cv2.imdecode(buf, flags)
    except cv2.error as e:
        raise DecodeError(CORRUPT, f"OpenCV could not decode the {fmt.upper()} data: {e.err}") from None
    if img is None:
        raise DecodeError(CORRUPT, f"OpenCV could not decode the {fmt.upper()} data")
    return [(to_grey_uint8(img), None)]


def decode_and_resize(data: bytes, image_size: tuple[int, int], interpolation: str = DEFAULT_INTERPOLATION, *,
                      window: dict[str, float] | None = None, preprocessing: dict | None = None,
                      max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The single image of a file (see :func:`decode_frames`); a multi-frame DICOM is an error here.

    Returns:
        A C-contiguous uint8 array of shape ``image_size``.
    """
    frames = decode_frames(data, image_size, interpolation, window=window, preprocessing=preprocessing,
                           max_pixels=max_pixels)
    if len(frames) != 1:
        raise DecodeError(MULTI_FRAME, f"{len(frames)} frames in one file: use decode_frames for every slice")
    return frames[0][0]


def resize(grey: np.ndarray, image_size: tuple[int, int], interpolation: str = DEFAULT_INTERPOLATION,
           preprocessing: dict | None = None) -> np.ndarray:
    """A grey uint8 image to the model's input of (height, width): the contract's preprocessing
    (``engine.preprocess``; None: the whole image resized) with the contract's interpolation."""
    return preprocess(grey, image_size, INTERPOLATIONS[interpolation], preprocessing)[0]


def read_file(path) -> bytes:
    """A regular file's bytes, at most MAX_FILE_BYTES of them.

    Opened non-blocking and checked with ``fstat`` before any read, so a FIFO, socket or device
    (named directly, listed, or behind a link) is never read from: it raises
    ``not_a_regular_file``. Raises DecodeError('unreadable'/'too_large') otherwise.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DecodeError(UNREADABLE, f"cannot read file: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DecodeError(NOT_A_REGULAR_FILE, f"{file_kind(st.st_mode)}, not a regular file: never read")
        if st.st_size > MAX_FILE_BYTES:
            raise DecodeError(TOO_LARGE, f"file is {st.st_size:,} bytes, over the {MAX_FILE_BYTES:,}-byte limit")
        chunks, total = [], 0
        while True:  # a file that grows while read is still capped
            b = os.read(fd, min(1 << 22, MAX_FILE_BYTES + 1 - total))
            if not b:
                break
            chunks.append(b)
            total += len(b)
            if total > MAX_FILE_BYTES:
                raise DecodeError(TOO_LARGE, f"file grew past the {MAX_FILE_BYTES:,}-byte limit while read")
        return b"".join(chunks)
    except OSError as e:
        raise DecodeError(UNREADABLE, f"cannot read file: {e.strerror or e}") from None
    finally:
        os.close(fd)


def decode_file(path, image_size, interpolation=DEFAULT_INTERPOLATION, *, window=None, preprocessing=None,
                max_pixels=MAX_PIXELS) -> np.ndarray:
    """``read_file`` then ``decode_and_resize``; pass ``**contract.decode_kwargs()`` for a model's input."""
    return decode_and_resize(read_file(path), image_size, interpolation, window=window, preprocessing=preprocessing,
                             max_pixels=max_pixels)


__all__ = [
    "DecodeError", "decode_frames", "decode_grey_frames", "decode_inputs", "decode_and_resize", "decode_file", "read_file", "sniff", "header_size", "to_grey_uint8",
    "resize", "MAX_PIXELS", "SKIP_CODES", "LUNG_WINDOW",
]
