"""DICOM CT slices to the contract's grey images: Hounsfield units, then the CT window.

Each file's own RescaleSlope/RescaleIntercept (per frame from the functional groups in
enhanced multi-frame CT) maps stored values to HU; out-of-field padding is set to the
bottom of the window before it can leak into it; MONOCHROME1 is inverted. Objects that are
not CT images (reports, presentation states) and localizers are skipped with a reason.
Identifying header values never leave this module except as the list used to redact them.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from .headers import HeaderError, check_budget, codestream_header
from .privacy import identifying_values
from .reasons import (CORRUPT, LOCALIZER, NOT_CT_IMAGE, TOO_LARGE, TRUNCATED, UNSUPPORTED_PIXELS,
                      UNSUPPORTED_TRANSFER_SYNTAX, DecodeError)
from .sandbox import sandbox

#: Transfer syntaxes and what decodes them. The project installs python-gdcm (BSD) and
#: pylibjpeg-openjpeg (MIT); pylibjpeg-libjpeg is GPLv3 and deliberately not a dependency.
DECODERS_HINT = {
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg (GPLv3) for 12-bit JPEG Extended",
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg (GPLv3) or python-gdcm for JPEG-LS",
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg (GPLv3) or python-gdcm for JPEG-LS",
}

#: SOP classes that are never CT images: structured/dose reports, presentation states, key objects.
NON_IMAGE_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.",
                          "1.2.840.10008.5.1.4.1.1.104.", "1.2.840.10008.5.1.4.1.1.481.")

@dataclass
class Slice:
    """One frame of a DICOM object, ready for the model, with non-identifying coordinates."""

    image: np.ndarray
    frame: int
    study_uid: str
    series_uid: str
    sop_uid: str
    instance_number: int | None
    slice_position: float | None
    identifying: list[str] = field(default_factory=list)
    burned_in_text_absent: bool = False  # BurnedInAnnotation is NO: a thumbnail shows no burned-in text


def looks_like_dicom_without_preamble(head: bytes) -> bool:
    """A file that starts straight with a group 0002 or 0008 element and an explicit VR
    (no preamble, no 'DICM'; some old writers leave one stray byte in front)."""
    for off in (0, 1):
        tag, vr = head[off:off + 2], head[off + 4:off + 6]
        if tag in (b"\x02\x00", b"\x08\x00") and len(vr) == 2 and vr.isalpha() and vr.isupper():
            return True
    return False


def _frame_rescale(ds, i: int) -> tuple[float, float]:
    for seq_name in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        seq = ds.get(seq_name)
        if not seq:
            continue
        group = seq[i] if seq_name.startswith("PerFrame") and len(seq) > i else seq[0]
        pvt = group.get("PixelValueTransformationSequence")
        if pvt:
            return float(pvt[0].get("RescaleSlope", 1.0)), float(pvt[0].get("RescaleIntercept", 0.0))
    return float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))


#: Most frames one DICOM object may hold. Every frame becomes a model input and a row, so memory and
#: time grow with the frame count, not the pixel count: 20,000 tiny 1-bit frames are 320,000 pixels
#: yet 20,000 inputs. An enhanced CT series of 512x512 frames reaches the pixel limit near 190 frames.
MAX_FRAMES = 1000
#: Transfer syntaxes whose fragments are codestreams with a frame header of their own: JPEG (4.50..4.70),
#: JPEG-LS (4.80, 4.81), JPEG 2000 and HTJ2K (4.90..4.93, 4.201..4.203).
_CODESTREAM_PREFIX = "1.2.840.10008.1.2.4."


def check_pixel_budget(ds, frames: int, ts, max_pixels: int) -> None:
    """Refuse, before any pixel is decoded, pixel data that would exceed ``max_pixels`` or MAX_FRAMES.

    The header's frames x rows x columns x samples; for native pixel data also what the payload
    holds (a file without NumberOfFrames whose payload holds thousands of frames is a frame
    bomb); for encapsulated data each codestream's own frame (JPEG and JPEG-LS SOF, JPEG 2000 SIZ,
    bare or in JP2 boxes, wherever in the fragment it is), which is what the decoder allocates
    whatever Rows and Columns say. A JPEG-family syntax whose fragments start no known codestream
    is refused too: what it would allocate cannot be told.
    """
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    per_frame = rows * cols * samples
    if per_frame <= 0 or frames <= 0:
        raise DecodeError(CORRUPT, f"DICOM header announces {frames} frame(s) of {rows}x{cols}x{samples}")
    if frames > MAX_FRAMES:
        raise DecodeError(TOO_LARGE, f"{frames:,} frames in one object, over the limit of {MAX_FRAMES:,} a file")
    if per_frame * frames > max_pixels:
        raise DecodeError(TOO_LARGE, f"{per_frame * frames:,} pixels announced exceeds the limit of {max_pixels:,}")
    data = ds.get("PixelData")
    if data is None:
        return
    if ts is None or not ts.is_compressed:
        bits = int(ds.get("BitsAllocated", 16) or 16)
        frame_bytes = max(1, (per_frame * bits + 7) // 8)
        held = len(data) // frame_bytes
        if held > frames:  # a frame bomb: pydicom would split the payload into frames of the header's size
            raise DecodeError(TOO_LARGE, f"pixel data holds {held:,} frames of {rows}x{cols} ({held * per_frame:,} "
                                         f"pixels) where the header announces {frames}")
        return
    from pydicom.encaps import generate_fragments

    total = streams = 0
    for fragment in generate_fragments(data):
        head = codestream_header(fragment)
        if head is None:
            continue  # a frame's continuation fragment
        streams += 1
        if streams > MAX_FRAMES:
            raise DecodeError(TOO_LARGE, f"over {MAX_FRAMES:,} codestreams in one object")
        try:
            check_budget(head, max_pixels)
        except HeaderError as e:
            raise DecodeError(TOO_LARGE, f"a codestream: {e}") from None
        total += head.pixels * head.channels
        if total > max_pixels:
            raise DecodeError(TOO_LARGE, f"its codestreams declare {total:,}+ samples, over the limit of {max_pixels:,}")
    if streams == 0 and str(ts).startswith(_CODESTREAM_PREFIX):
        raise DecodeError(CORRUPT, f"{ts.name} pixel data holds no JPEG, JPEG-LS or JPEG 2000 codestream "
                                   "whose size can be read (damaged?)")


def _int_or_none(value) -> int | None:
    """An optional integer header value (InstanceNumber); a malformed or out-of-range one (the column is
    int32) is simply absent."""
    try:
        v = int(value) if value not in (None, "") else None
    except (TypeError, ValueError, OverflowError):
        return None
    return v if v is None or -2**31 <= v < 2**31 else None


def _float_or_none(value) -> float | None:
    """An optional real header value (a position in mm); malformed or not finite: absent."""
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return v if math.isfinite(v) else None


def _frame_position(ds, i: int) -> float | None:
    """z of the slice (mm), from the per-frame groups, ImagePositionPatient or SliceLocation; every one of
    them optional: an unusable value is left empty, never the file's row."""
    try:
        seq = ds.get("PerFrameFunctionalGroupsSequence")
        if seq and len(seq) > i and seq[i].get("PlanePositionSequence"):
            pos = seq[i].PlanePositionSequence[0].get("ImagePositionPatient")
            if pos is not None and len(pos) == 3:
                return _float_or_none(pos[2])
        pos = ds.get("ImagePositionPatient")
        if pos is not None and len(pos) == 3:
            return _float_or_none(pos[2]) if i == 0 else None
        loc = ds.get("SliceLocation")
        return _float_or_none(loc) if loc is not None else None
    except Exception:  # noqa: BLE001  a malformed optional element (wrong VR, bad sequence) is absent
        return None


def hounsfield(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def window_to_grey(hu: np.ndarray, level: float, width: float, invert: bool = False,
                   padding: np.ndarray | None = None) -> np.ndarray:
    """HU to uint8 through the window [level - width/2, level + width/2]; padding goes to 0."""
    lo = level - width / 2.0
    g = np.clip((hu - np.float32(lo)) * np.float32(255.0 / width), 0, 255)
    if invert:
        g = 255 - g
    if padding is not None:
        g[padding] = 0  # out of field: never part of the anatomy, whatever the window
    return np.rint(g).astype(np.uint8)


def stored_to_grey(stored: np.ndarray, slope: float, intercept: float, level: float, width: float,
                   invert: bool = False, pad: tuple[int, int] | None = None) -> np.ndarray:
    """Stored pixel values to the window's uint8 grey, padding (stored values in ``pad``, inclusive) to 0.

    The definition is :func:`hounsfield` then :func:`window_to_grey`. For 16-bit (and 8-bit) stored
    values it runs as a lookup table made by that same definition over every value the type holds, so
    the result is the same to the bit, at about a quarter of the float arithmetic's cost per slice
    (one CT series shares its table: it is cached). For 16-bit values a faster form of that table is
    used where it was found equal to it on every value (``_window_ramp``)."""
    if stored.dtype in _LUT_TYPES:
        key = (stored.dtype.str, float(slope), float(intercept), float(level), float(width), bool(invert),
               None if pad is None else (int(pad[0]), int(pad[1])))
        stored = np.ascontiguousarray(stored)
        ramp = _window_ramp(*key) if stored.dtype.itemsize == 2 else None
        if ramp is not None:
            return _ramp(stored, *ramp)
        return np.take(_window_lut(*key), stored.view(_LUT_TYPES[stored.dtype]))
    padding = None if pad is None else (stored >= pad[0]) & (stored <= pad[1])
    return window_to_grey(hounsfield(stored, slope, intercept), level, width, invert, padding)


#: Stored types windowed through a table, and the unsigned type of the same width whose values index it.
_LUT_TYPES = {np.dtype(t): np.dtype(u) for t, u in (("<i2", "<u2"), ("<u2", "<u2"), ("i1", "u1"), ("u1", "u1"))}


@functools.lru_cache(maxsize=32)
def _window_lut(dtype: str, slope: float, intercept: float, level: float, width: float, invert: bool,
                pad: tuple[int, int] | None) -> np.ndarray:
    """uint8 grey of every value of ``dtype``, indexed by the value's bits read as unsigned."""
    dt = np.dtype(dtype)
    bits = _LUT_TYPES[dt]
    values = np.arange(1 << (8 * dt.itemsize), dtype=bits).view(dt)
    padding = None if pad is None else (values >= pad[0]) & (values <= pad[1])
    lut = window_to_grey(hounsfield(values, slope, intercept), level, width, invert, padding)
    lut.flags.writeable = False
    return lut


#: At most this many stored values may need their grey set after ``_ramp``'s scaling; more, and the table is used.
_MAX_FIXUPS = 4


@functools.lru_cache(maxsize=32)
def _window_ramp(dtype: str, slope: float, intercept: float, level: float, width: float, invert: bool,
                 pad: tuple[int, int] | None) -> tuple | None:
    """The arguments of ``_ramp`` that give ``_window_lut``'s grey for every value of a 16-bit ``dtype``, or
    None where there are none (a negative slope; a padding range inside the window; more than
    ``_MAX_FIXUPS`` values where OpenCV's float32 scaling rounds otherwise than the definition, whose
    steps round apart: it differs at a few exact halves). Found by trying all 65,536 values, so the
    result is the table's to the bit; on a 512x512 CT slice 0.10 against the table's 0.26 ms (one core)."""
    if not (slope > 0 and width > 0 and all(map(math.isfinite, (slope, intercept, level, width)))):
        return None
    dt = np.dtype(dtype)
    info = np.iinfo(dt)
    low_hu, high_hu = level - width / 2.0, level + width / 2.0
    first, last = (low_hu - intercept) / slope, (high_hu - intercept) / slope  # the window's stored values
    alpha, beta = slope * 255.0 / width, (intercept - low_hu) * 255.0 / width
    if not all(map(math.isfinite, (first, last, alpha, beta))):  # a header's extreme values: the table
        return None
    clamp = lambda v: int(max(info.min, min(info.max, v)))  # noqa: E731
    low, high = clamp(math.ceil(first)), clamp(math.floor(last))
    if not low < high:
        return None
    if invert:  # 255 - g: in the ramp x * alpha + beta lies in [0, 255], so the absolute value changes nothing
        alpha, beta = -alpha, 255.0 - beta
    values = np.arange(1 << 16, dtype=_LUT_TYPES[dt]).view(dt)  # value k has the bits k: the table's order
    lut = _window_lut(dtype, slope, intercept, level, width, invert, pad)
    bad = np.flatnonzero(_ramp(values.reshape(256, 256), low, high, alpha, beta, ()).ravel() != lut)
    if len(bad) > _MAX_FIXUPS:
        return None
    return low, high, alpha, beta, tuple((int(values[i]), int(lut[i])) for i in bad)


def _ramp(stored: np.ndarray, low: int, high: int, alpha: float, beta: float, fixups: tuple) -> np.ndarray:
    """uint8 of ``|clip(stored, low, high) * alpha + beta|`` (OpenCV's saturating, rounding scale), then the
    values of ``fixups`` ((stored value, grey) pairs) set to their grey."""
    import cv2

    out = cv2.convertScaleAbs(cv2.min(cv2.max(stored, low), high), alpha=alpha, beta=beta)
    for value, grey in fixups:
        out[stored == value] = grey
    return out


DEFLATED = "1.2.840.10008.1.2.1.99"
_DEFLATED_UID = DEFLATED.encode("ascii")


#: Explicit VRs with a 32-bit length (after two reserved bytes), and those with a 16-bit one.
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())


def _meta_end(data: bytes) -> int | None:
    """Where the file meta group (0002,xxxx) ends, stepping over its elements as pydicom reads them (explicit
    VR little endian, after the preamble when there is one); None where the elements are not all plainly
    readable that way (an unknown VR, an undefined length, past the end): then the whole file is searched.
    Searching a 512 KB slice for the deflated syntax's UID took 86 us; its meta group, under 1 us."""
    o = 132 if data[128:132] == b"DICM" else 0
    for _ in range(4096):
        if len(data) < o + 8 or data[o:o + 2] != b"\x02\x00":
            return o
        vr = data[o + 4:o + 6]
        if vr in _SHORT_VRS:
            o += 8 + int.from_bytes(data[o + 6:o + 8], "little")
        elif vr in _LONG_VRS and len(data) >= o + 12:
            n = int.from_bytes(data[o + 8:o + 12], "little")
            if n == 0xFFFFFFFF:
                return None
            o += 12 + n
        else:
            return None
        if o > len(data):
            return None
    return None


def check_deflated(data: bytes, max_pixels: int) -> None:
    """A deflated dataset is inflated whole by pydicom: count its inflated size first, in 1 MB steps
    and without keeping them, and refuse it when it is larger than pixels within the limit can be."""
    import zlib

    from pydicom.filereader import _read_file_meta_info, read_preamble

    end = _meta_end(data)  # the syntax is named in the meta group, or the dataset is not deflated
    if data.find(_DEFLATED_UID, 0, len(data) if end is None else end) < 0:
        return
    f = io.BytesIO(data)
    try:
        read_preamble(f, force=True)
        meta = _read_file_meta_info(f)
    except Exception:  # noqa: BLE001  not a file with a meta group: not deflated, pydicom decides
        return
    if str(meta.get("TransferSyntaxUID", "")) != DEFLATED:
        return
    cap = 4 * max_pixels + (16 << 20)  # up to 32-bit pixels plus a generous header
    z = zlib.decompressobj(-zlib.MAX_WBITS)
    tail, total = data[f.tell():], 0
    try:
        while True:
            chunk = z.decompress(tail, 1 << 20)
            total += len(chunk)
            if total > cap:
                raise DecodeError(TOO_LARGE, f"deflated dataset inflates past {cap:,} bytes (the pixel limit is "
                                             f"{max_pixels:,}): refused before inflating it")
            tail = z.unconsumed_tail
            if not tail and len(chunk) < (1 << 20):
                return
    except zlib.error:
        raise DecodeError(CORRUPT, "deflated DICOM dataset is corrupt") from None


def decode_dicom(data: bytes, window: dict, max_pixels: int) -> list[Slice]:
    """All frames of a DICOM CT object as grey uint8 images (before resizing).

    Raises:
        DecodeError: not a CT image or a localizer (skipped), undecodable pixel data (error).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    # pydicom warns about malformed values by quoting them: never on a console or in a worker's log
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_deflated(data, max_pixels)
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
        except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError) as e:
            raise DecodeError(CORRUPT, f"unreadable DICOM header: {type(e).__name__}") from None
        ident = []
        try:
            ident = identifying_values(ds)
            return _decode_pixels(ds, data, window, max_pixels, ident)
        except DecodeError as e:
            e.redact = ident  # the row's path must not show them either
            raise
        except Exception as e:  # every header value is untrusted: a bad one is this file's row alone
            raise DecodeError(CORRUPT, f"a DICOM header value could not be used ({type(e).__name__})",
                              ident) from None


#: pydicom's words for "no installed plugin decodes this syntax" (as opposed to "every plugin failed on it").
_NO_DECODER = ("missing dependencies", "no plugin", "no pixel data decoders", "not installed", "not supported",
               "no available image handler")


def _pixel_error(e: Exception, ts) -> DecodeError:
    """The row a pixel-data failure becomes: truncated, an unsupported syntax (no decoder here), or corrupt
    (a supported syntax whose data every decoder refused)."""
    text = str(e)
    msg = text.splitlines()[0][:200]
    if "less than expected" in msg or "truncated" in msg.lower():
        return DecodeError(TRUNCATED, f"DICOM pixel data is truncated: {msg}")
    kind = getattr(e, "type_name", type(e).__name__)
    if ts is not None and ts.is_compressed and (str(ts) in DECODERS_HINT or kind == "NotImplementedError"
                                                or any(w in text.lower() for w in _NO_DECODER)):
        hint = DECODERS_HINT.get(str(ts), "a pydicom pixel-data plugin for it")
        return DecodeError(UNSUPPORTED_TRANSFER_SYNTAX,
                           f"transfer syntax {ts.name} ({ts}) is not decodable here; {hint} would decode it")
    what = f"{ts.name} pixel data" if ts is not None and ts.is_compressed else "DICOM pixel data"
    return DecodeError(CORRUPT, f"{what} could not be decoded (damaged?): {msg}")


#: Native syntaxes whose little-endian pixel bytes ``_native_pixels`` reads itself.
_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def _native_pixels(ds, ts, frames: int) -> np.ndarray:
    """``ds.pixel_array`` of native pixel data. The common CT case (little-endian, one sample, 8 or 16
    bits allocated, whole frames present) is read from the PixelData bytes here, as pydicom makes it
    (bits above BitsStored masked off, or the sign extended into them, as its ``correct_unused_bits``
    does) without its decoder's set-up; any other case, and every error, is pydicom's."""
    try:
        bits = int(ds.get("BitsAllocated", 0) or 0)
        rows, cols = int(ds.Rows), int(ds.Columns)
        ok = (str(ts or "1.2.840.10008.1.2") in _LITTLE_ENDIAN and bits in (8, 16)
              and int(ds.get("SamplesPerPixel", 1) or 1) == 1 and int(ds.get("PixelRepresentation", 0)) in (0, 1)
              and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds)
        raw = ds.PixelData if ok else None
    except Exception:  # noqa: BLE001  whatever is odd about the header, pydicom says it
        raw = None
    count = frames * rows * cols if raw is not None else 0
    if raw is None or not isinstance(raw, (bytes, bytearray)) or len(raw) < count * (bits // 8):
        return ds.pixel_array
    dtype = np.dtype(("<i" if int(ds.PixelRepresentation) else "<u") + str(bits // 8))
    arr = np.frombuffer(raw, dtype=dtype, count=count)
    shift = bits - int(ds.get("BitsStored", bits) or bits)
    if not 0 <= shift < bits:
        return ds.pixel_array
    if shift:  # pydicom's correct_unused_bits: high bits masked off (unsigned) or sign-extended
        arr = arr.copy()
        np.left_shift(arr, shift, out=arr)
        np.right_shift(arr, shift, out=arr)
    return arr.reshape(rows, cols) if frames == 1 else arr.reshape(frames, rows, cols)


def _decode_pixels(ds, data: bytes, window: dict, max_pixels: int, ident: list[str]) -> list[Slice]:
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", ""))
    if sop_class.startswith(NON_IMAGE_SOP_PREFIXES) or "PixelData" not in ds:
        raise DecodeError(NOT_CT_IMAGE, f"DICOM object without CT pixels (modality {modality or '?'}, "
                                          f"SOP class {sop_class or '?'}): skipped")
    image_type = [str(t).upper() for t in ds.get("ImageType", [])]
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        raise DecodeError(LOCALIZER, "localizer/scout image, not an axial slice: skipped")
    if modality and modality != "CT":
        raise DecodeError(NOT_CT_IMAGE, f"modality {modality}, not CT: skipped")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    check_pixel_budget(ds, frames, ts, max_pixels)
    compressed = ts is not None and ts.is_compressed
    try:
        # native decoders can abort their process on damaged data: compressed pixels decode in a child
        pixels = sandbox().pixel_array(data) if compressed else _native_pixels(ds, ts, frames)
    except DecodeError:
        raise
    except Exception as e:  # pydicom raises RuntimeError/ValueError/NotImplementedError per plugin
        raise _pixel_error(e, ts) from None
    if pixels.ndim == 2 or (pixels.ndim == 3 and frames == 1 and pixels.shape[-1] in (3, 4)):
        pixels = pixels[None]
    pixels = pixels[:frames]  # never more slices than the header announces
    if pixels.ndim != 3:
        raise DecodeError(UNSUPPORTED_PIXELS, f"DICOM pixel array of shape {pixels.shape} is not grey CT")
    invert = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1"
    pad_value = ds.get("PixelPaddingValue")
    pad_limit = ds.get("PixelPaddingRangeLimit")
    study, series, sop = (str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    try:
        inst = ds.get("InstanceNumber")
    except Exception:  # noqa: BLE001  an optional value pydicom cannot even parse: absent
        inst = None
    no_burned_in = str(ds.get("BurnedInAnnotation", "")).strip().upper() == "NO"
    pad = None  # the stored values that are padding, inclusive: the same for every frame
    if pad_value is not None:
        pad = tuple(sorted((int(pad_value), int(pad_limit)))) if pad_limit is not None else (int(pad_value),) * 2
    out = []
    for i in range(pixels.shape[0]):
        stored = pixels[i]
        slope, intercept = _frame_rescale(ds, i)
        grey = stored_to_grey(stored, slope, intercept, float(window["level"]), float(window["width"]), invert, pad)
        out.append(Slice(grey, i, study, series, sop, _int_or_none(inst),
                         _frame_position(ds, i), ident, no_burned_in))
    return out
