"""Site-invariant preprocessing: frame the lungs and set intensities from the image's own anatomy.

The same lungs reach a hospital in many forms: a lung window or a wide one, cropped to the
thorax or showing the whole field of view with the table, a round field of view padded with
black, white paper margins, letters around the body. A model trained at one site learns that
site's form unless its input removes it. ``lung-crop`` does, in the one decode function, so
training and screening agree:

1. On a small working copy (``work_size`` on the longest side), constant padding connected to
   the border (black round fields of view, white margins) is set aside.
2. Otsu's threshold splits dark (air, lung) from tissue; the body is the convex hull of every
   substantial tissue component. A hull, not hole filling, so a crop that cuts the chest wall
   still encloses the lungs. Letters and thin table edges are too small to count.
3. The lung fields are the substantial dark components inside the body; the output frames
   their bounding box (plus ``margin``, so pleural consolidation stays in), and everything
   outside the body is set to ``outside``.
4. Intensities are mapped linearly so that the aerated lung (``dark_percentile`` of the lung
   pixels) lands on ``dark_to`` and soft tissue (median of the body's tissue pixels) on
   ``tissue_to``: any linear CT window becomes the same one.

Every step has a fallback (no body found: the whole frame; no lungs found: the body) so that a
strange image still becomes an input and never an error. Measured cost: see README
("Preprocessing"). The parameters travel in the model's contract (``Contract.preprocessing``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

#: Methods a contract may name. "resize" is schema 1's: the whole image, resized.
RESIZE = "resize"
LUNG_CROP = "lung-crop"
METHODS = (RESIZE, LUNG_CROP)

#: Parameters of lung-crop and their defaults (written into every new contract).
LUNG_CROP_DEFAULTS = {
    "work_size": 128,        # longest side of the working copy the masks are found on
    "margin": 0.06,          # added around the lungs' box, as a fraction of its size
    "dark_percentile": 25.0,  # of the lung pixels: the aerated lung anchor
    "dark_to": 30,           # grey level the aerated lung maps to
    "tissue_to": 200,        # grey level soft tissue maps to
    "outside": 0,            # grey level outside the body
}


@dataclass
class Framing:
    """What preprocessing found: cheap statistics of the image, for reports and shift checks."""

    height: int                 # size before resizing
    width: int
    body_fraction: float        # share of the frame the body fills (0 when none was found)
    lung_fraction: float        # share of the body the lung fields fill
    dark_anchor: float          # grey level of the aerated lung before mapping
    tissue_anchor: float        # grey level of soft tissue before mapping
    fallback: str | None        # "no_body" / "no_lungs" when a step fell back


def default_spec() -> dict:
    return {"method": LUNG_CROP, **LUNG_CROP_DEFAULTS}


def spec_problems(spec: dict) -> list[str]:
    """Every way a contract's ``preprocessing`` entry is invalid (empty when valid)."""
    if not isinstance(spec, dict) or spec.get("method") not in METHODS:
        return [f"preprocessing.method must be one of {list(METHODS)}, e.g. {default_spec()}; got {spec!r}"]
    if spec["method"] == RESIZE:
        extra = sorted(set(spec) - {"method"})
        return [f"preprocessing 'resize' takes no parameters; got {extra}"] if extra else []
    p = []
    unknown = sorted(set(spec) - {"method"} - set(LUNG_CROP_DEFAULTS))
    if unknown:
        p.append(f"preprocessing has unknown parameters {unknown} (written by a newer version?)")
    missing = sorted(set(LUNG_CROP_DEFAULTS) - set(spec))
    if missing:
        p.append(f"preprocessing lacks parameters {missing}")
    if p:
        return p
    if not (isinstance(spec["work_size"], int) and 32 <= spec["work_size"] <= 1024):
        p.append(f"preprocessing.work_size must be an integer in 32..1024; got {spec['work_size']!r}")
    if not 0 <= float(spec["margin"]) <= 0.5:
        p.append(f"preprocessing.margin must be in [0, 0.5]; got {spec['margin']!r}")
    if not 0 <= float(spec["dark_percentile"]) <= 100:
        p.append(f"preprocessing.dark_percentile must be in [0, 100]; got {spec['dark_percentile']!r}")
    if not 0 <= spec["dark_to"] < spec["tissue_to"] <= 255:
        p.append(f"preprocessing needs 0 <= dark_to < tissue_to <= 255; got {spec['dark_to']}, {spec['tissue_to']}")
    if not 0 <= spec["outside"] <= 255:
        p.append(f"preprocessing.outside must be a grey level; got {spec['outside']!r}")
    return p


#: Interpolation "area-linear": while the source is at least twice the output on both sides, an
#: integer-factor area reduction (OpenCV's fast path), then bit-exact bilinear for the rest (a factor
#: below 2). Area's anti-aliasing for large reductions at a fraction of its cost (OpenCV's INTER_AREA at
#: a non-integer factor took 0.13 ms for a 224x296 crop to 192x192, 0.58 ms from 700x800; this 0.04
#: and 0.23 ms); below a factor 2 it is bilinear, which aliases the finest detail more than area does.
AREA_LINEAR = "area-linear"
INTER_AREA_LINEAR = -1  # its flag for resample(); never a cv2 flag


def resample(img: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
    """``img`` resized to ``size`` (width, height) with an OpenCV flag or ``INTER_AREA_LINEAR``."""
    if interpolation != INTER_AREA_LINEAR:
        return cv2.resize(img, size, interpolation=interpolation)
    w, h = size
    f = int(min(img.shape[0] / h, img.shape[1] / w))
    if f >= 2:
        img = _area_by(img, f)
    if img.shape[:2] == (h, w):
        return img
    return cv2.resize(img, size, interpolation=cv2.INTER_LINEAR_EXACT)


#: Above this many pixels the float32 copy leaves the cache and the 8-bit path is faster (2048x2048: 1.4
#: against 1.8 ms).
_FLOAT_AREA_MAX = 1 << 20


def _area_by(img: np.ndarray, f: int) -> np.ndarray:
    """``img`` reduced by the integer factor ``f`` on both sides (OpenCV's fast area path; the last
    rows and columns that do not fill a block are dropped)."""
    hh, ww = img.shape[0] // f, img.shape[1] // f
    img = img[:hh * f, :ww * f]
    if f == 4 and img.size <= _FLOAT_AREA_MAX:
        # OpenCV's fast area path is vectorised for a factor 2 only. In float32 two factor-2 steps are
        # exact (sums of at most 16 grey levels, quarters), and the conversion rounds half to even as the
        # 8-bit path does: the same bytes (tested), 0.06 against 0.09 ms for 512x512 on one core.
        x = cv2.resize(img.astype(np.float32), (ww * 2, hh * 2), interpolation=cv2.INTER_AREA)
        return cv2.convertScaleAbs(cv2.resize(x, (ww, hh), interpolation=cv2.INTER_AREA))
    return cv2.resize(img, (ww, hh), interpolation=cv2.INTER_AREA)


def _shrink(grey: np.ndarray, work: int) -> tuple[np.ndarray, int]:
    """Integer-factor area reduction (OpenCV's fast path) to at most ``work`` on the longest side."""
    h, w = grey.shape
    f = max(1, math.ceil(max(h, w) / work))
    if f == 1 or h // f < 2 or w // f < 2:
        return grey, 1
    return _area_by(grey, f), f


def _otsu(values: np.ndarray) -> float:
    t, _ = cv2.threshold(values.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t)


def _padding(small: np.ndarray) -> np.ndarray:
    """Boolean mask of constant padding connected to the border.

    Black padding (round fields of view, letterboxes) is padding wherever it touches the border.
    White is padding only when it frames all four sides (a figure's margin): a tight crop's
    saturated chest wall also touches the border in white, and is anatomy.
    """
    h, w = small.shape
    sides = (small[0], small[-1], small[:, 0], small[:, -1])
    counts = np.bincount(np.concatenate(sides), minlength=256)
    mode = int(np.argmax(counts))
    dark = mode <= 10 and counts[mode] >= 0.25 * sum(len(s) for s in sides)
    framed = mode >= 245 and all(np.mean(np.abs(s.astype(np.int16) - mode) <= 3) >= 0.9 for s in sides)
    if not (dark or framed):
        return np.zeros(small.shape, bool)
    ff = np.zeros((h + 2, w + 2), np.uint8)
    seeds = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (0, w // 2), (h - 1, w // 2), (h // 2, 0), (h // 2, w - 1)]
    for y, x in seeds:
        if abs(int(small[y, x]) - mode) <= 3 and not ff[y + 1, x + 1]:
            cv2.floodFill(small, ff, (x, y), 0, loDiff=3, upDiff=3, flags=4 | cv2.FLOODFILL_MASK_ONLY | (1 << 8))
    return ff[1:-1, 1:-1].astype(bool)


#: Up to this many labels (the background's included), areas are counted label by label.
_FEW_LABELS = 6


def _components(mask: np.ndarray):
    """8-connected components of a 0/1 uint8 mask: (count, labels, areas). Spaghetti (OpenCV's fastest
    labelling, 2.5x the default's speed on a 128x128 working copy) with 16-bit labels where they fit; the
    areas from a histogram of the labels (OpenCV's statistics, which also make boxes and centroids, took
    45 us on a 128x128 working copy against 12 us for the labels alone)."""
    if mask.size < (1 << 17):  # at most size / 4 components (8-connected): 16-bit labels
        n, lab = cv2.connectedComponentsWithAlgorithm(mask, 8, cv2.CV_16U, cv2.CCL_SPAGHETTI)
        if n <= _FEW_LABELS:  # a count a label (3 us each on 128x128) beats a histogram of 16-bit labels (19 us)
            areas = np.array([mask.size - cv2.countNonZero(lab)]
                             + [cv2.countNonZero(cv2.compare(lab, k, cv2.CMP_EQ)) for k in range(1, n)], np.int64)
        else:
            areas = cv2.calcHist([lab], [0], None, [n], [0, n]).ravel().astype(np.int64)  # exact below 2**24
    else:
        n, lab = cv2.connectedComponentsWithAlgorithm(mask, 8, cv2.CV_32S, cv2.CCL_SPAGHETTI)
        areas = np.bincount(lab.ravel(), minlength=n)
    return n, lab, areas


def _select(lab: np.ndarray, n: int, keep: np.ndarray) -> np.ndarray:
    """uint8 mask (nonzero: selected) of the pixels whose label is in ``keep``."""
    if not len(keep):
        return np.zeros(lab.shape, np.uint8)
    if len(keep) <= 3:  # a comparison a component: cheaper than an indexed lookup of every pixel
        out = cv2.compare(lab, int(keep[0]), cv2.CMP_EQ)
        for k in keep[1:]:
            cv2.bitwise_or(out, cv2.compare(lab, int(k), cv2.CMP_EQ), dst=out)
        return out
    select = np.zeros(n, np.uint8)
    select[keep] = 1
    return select[lab]


def _substantial(mask: np.ndarray, rel: float, floor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(selected-pixel mask, areas, ids, labels) of components at least ``rel`` of the largest and ``floor``
    pixels; ``areas`` is indexed by label (0: the background)."""
    n, lab, areas = _components(mask)
    if n < 2:
        return np.zeros(mask.shape, np.uint8), areas, np.zeros(0, np.int64), lab
    keep = 1 + np.nonzero(areas[1:] >= max(rel * areas[1:].max(), floor))[0]
    return _select(lab, n, keep), areas, keep, lab


_OPEN = np.ones((3, 3), np.uint8)


def _body(small: np.ndarray, valid: np.ndarray, t: float) -> np.ndarray | None:
    """Convex hull of the substantial tissue components above ``t``; None when implausibly small.
    ``valid`` is a 0/1 uint8 mask of what is not padding."""
    above = cv2.threshold(small, t, 1, cv2.THRESH_BINARY)[1]
    tissue = cv2.morphologyEx(cv2.bitwise_and(above, valid), cv2.MORPH_OPEN, _OPEN)
    chosen, _, keep, _ = _substantial(tissue, 0.1, 1)
    if not len(keep):
        return None
    contours, _ = cv2.findContours(chosen, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    body = np.zeros(small.shape, np.uint8)
    cv2.fillConvexPoly(body, cv2.convexHull(np.concatenate(contours)), 1)
    cv2.bitwise_and(body, valid, dst=body)
    return body if cv2.countNonZero(body) >= 0.2 * cv2.countNonZero(valid) else None


def _hist(small: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Histogram (256 int64 counts) of the uint8 pixels of ``small`` where ``mask`` is nonzero."""
    return cv2.calcHist([small], [0], mask, [256], [0, 256]).ravel().astype(np.int64)


def _hist_percentile(hist: np.ndarray, q: float) -> float:
    """The q-th percentile (lower value) of the uint8 values a histogram counts: no sort."""
    cdf = np.cumsum(hist)
    return float(np.searchsorted(cdf, q / 100.0 * (cdf[-1] - 1), side="right"))


def find_body_and_lungs(small: np.ndarray):
    """(body mask uint8 0/1 or None, lung box (y0, y1, x0, x1) or None, tissue threshold, lung mask or None).

    The lung mask is uint8, nonzero on the pixels of the lung fields."""
    valid = (~_padding(small)).view(np.uint8)
    nvalid = cv2.countNonZero(valid)
    if nvalid < 0.05 * small.size:
        return None, None, None, None
    t = _otsu(small if nvalid == small.size else small[valid > 0])  # no padding: no copy of the pixels
    body = _body(small, valid, t)
    if body is None:
        # Three classes (black lungs, grey tissue, bright contrast or bone under a soft-tissue
        # window): the first split isolated the brightest. Split the darker part once more.
        darker = small[(valid > 0) & (small <= t)]
        if darker.size:
            t = _otsu(darker)
            body = _body(small, valid, t)
        if body is None:
            return None, None, t, None
    nbody = cv2.countNonZero(body)
    below = cv2.threshold(small, t, 1, cv2.THRESH_BINARY_INV)[1]
    dark = cv2.morphologyEx(cv2.bitwise_and(below, body), cv2.MORPH_OPEN, _OPEN)
    chosen, areas, keep, lab = _substantial(dark, 0.15, max(1, int(0.01 * nbody)))
    if len(keep) > 3:  # the three largest: two lungs, or lungs split by a fissure or a lesion
        # int32 and numpy's default sort, as on OpenCV's statistics before: ties keep the order they had
        keep = keep[np.argsort(-areas[keep].astype(np.int32))][:3]
        chosen = _select(lab, len(areas), keep)
    if not len(keep) or areas[keep].sum() < 0.05 * nbody:
        return body, None, t, None
    x0, y0, w, h = cv2.boundingRect(chosen)  # the union of the kept components' boxes
    return body, (int(y0), int(y0 + h), int(x0), int(x0 + w)), t, chosen


def lung_crop(grey: np.ndarray, image_size: tuple[int, int], interpolation: int, spec: dict
              ) -> tuple[np.ndarray, Framing]:
    """Frame the lungs and normalise intensities (see the module docstring); returns (image, framing)."""
    h, w = grey.shape
    out_h, out_w = image_size
    small, f = _shrink(grey, int(spec["work_size"]))
    body, box, t, lungs = find_body_and_lungs(small)
    sh, sw = small.shape
    if body is None:  # no body: the whole frame, a percentile stretch
        hist = _hist(small, None)
        lo, hi = _hist_percentile(hist, 2), _hist_percentile(hist, 98)
        y0, y1, x0, x1, fallback = 0, sh, 0, sw, "no_body"
        body_fraction = lung_fraction = 0.0
    else:
        body_hist = _hist(small, body)
        nbody = int(body_hist.sum())
        bright = body_hist.copy()
        bright[:int(math.floor(t)) + 1] = 0  # the body's pixels above the tissue threshold
        hi = _hist_percentile(bright, 50) if bright.any() else 255.0
        body_fraction = nbody / small.size
        if box is None:
            ys, xs = np.nonzero(body)
            y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
            lo, fallback, lung_fraction = _hist_percentile(body_hist, 2), "no_lungs", 0.0
        else:
            y0, y1, x0, x1 = box
            my, mx = round(spec["margin"] * (y1 - y0)), round(spec["margin"] * (x1 - x0))
            y0, y1, x0, x1 = max(0, y0 - my), min(sh, y1 + my), max(0, x0 - mx), min(sw, x1 + mx)
            lung_hist = _hist(small, lungs)
            lo, fallback = _hist_percentile(lung_hist, spec["dark_percentile"]), None
            lung_fraction = int(lung_hist.sum()) / nbody
    hi = max(hi, lo + 16.0)  # a flat image must not blow noise up
    # Anchors map aerated lung and tissue; with no body there are no anchors: stretch p2..p98.
    d_to, t_to = (0.0, 255.0) if body is None else (float(spec["dark_to"]), float(spec["tissue_to"]))
    lut = np.clip((np.arange(256, dtype=np.float32) - lo) * ((t_to - d_to) / (hi - lo)) + d_to, 0, 255)
    lut = np.rint(lut).astype(np.uint8)
    # Crop the full-resolution image on the working copy's box, resize, then map intensities:
    # the LUT runs on the small output rather than the large crop.
    Y0, Y1, X0, X1 = y0 * f, min(h, y1 * f), x0 * f, min(w, x1 * f)
    if (Y0, Y1, X0, X1) == (0, h, 0, w) and grey.shape == (out_h, out_w):
        out = grey.copy()
    else:
        out = resample(grey[Y0:Y1, X0:X1], (out_w, out_h), interpolation)
    out = cv2.LUT(out, lut)
    if body is not None:
        m = cv2.resize(body[y0:y1, x0:x1], (out_w, out_h), interpolation=cv2.INTER_NEAREST)
        if int(spec["outside"]) == 0:
            out = cv2.bitwise_and(out, out, mask=m)
        else:
            out[m == 0] = int(spec["outside"])
    return out, Framing(h, w, round(body_fraction, 4), round(lung_fraction, 4), round(lo, 2), round(hi, 2), fallback)


def preprocess(grey: np.ndarray, image_size: tuple[int, int], interpolation: int, spec: dict | None
               ) -> tuple[np.ndarray, Framing | None]:
    """One grey uint8 image to the model's input of ``image_size`` by the contract's method."""
    if spec is None or spec.get("method") == RESIZE:
        h, w = image_size
        if grey.shape == (h, w):
            return np.ascontiguousarray(grey), None
        return resample(grey, (w, h), interpolation), None
    return lung_crop(grey, image_size, interpolation, spec)


__all__ = ["preprocess", "lung_crop", "resample", "AREA_LINEAR", "INTER_AREA_LINEAR", "Framing", "default_spec",
           "spec_problems", "METHODS", "RESIZE", "LUNG_CROP", "LUNG_CROP_DEFAULTS"]
