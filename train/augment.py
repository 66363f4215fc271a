"""Augmentation that imitates other hospitals, applied to the decoded grey image *before* the
contract's preprocessing, plus light geometric jitter on the model's input after it.

Site augmentation (``site``) changes what differs between hospitals: the window and gamma of the
export, the framing (tighter crops, the whole field of view with padding, a table, a round field
of view), burned-in letters and arrows, resolution, blur, noise, JPEG quality, tone curves and
sharpening. The contract's
preprocessing then removes what it can (framing, linear windows), and the model learns to ignore
the rest. Nothing here tunes to one external set: every range is a property of how CT slices are
exported, not of a particular site.
"""

from __future__ import annotations

import cv2
import numpy as np


def window(g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another export window: wider (towards mid grey), narrower (tissue saturates), or soft-tissue
    like (lungs clip towards black), then a gamma."""
    x = g.astype(np.float32) / 255.0
    r = rng.random()
    if r < 0.15:
        c = rng.uniform(0.15, 0.45)
        x = (x - c) / (1 - c)
    elif r < 0.5:
        k = rng.uniform(0.5, 0.9)
        x = x * k + rng.uniform(0, 1 - k)
    elif r < 0.7:
        k = rng.uniform(1.1, 1.5)
        x = x * k - rng.uniform(0, 0.2)
    x = np.clip(x, 0, 1) ** rng.uniform(0.7, 1.4)
    return np.clip(x * 255, 0, 255).astype(np.uint8)


def frame(g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Another framing: a tighter crop, or the slice zoomed out onto a canvas with padding, a table
    and a round field of view."""
    h, w = g.shape
    r = rng.random()
    if r < 0.25:
        f = rng.uniform(0.75, 0.95)
        ch, cw = int(h * f), int(w * f)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        return g[y:y + ch, x:x + cw]
    if r < 0.65:
        f = rng.uniform(1.1, 1.6)
        H, W = int(h * f), max(w, int(w * f * rng.uniform(0.9, 1.1)))
        bg = int(rng.choice([0, 0, 0, int(rng.integers(10, 60)), 255]))
        canvas = np.full((H, W), bg, np.uint8)
        y, x = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
        body = np.zeros((h, w), np.uint8)  # a thorax crop is not square: keep an ellipse of it
        cv2.ellipse(body, (w // 2, h // 2), (w // 2, h // 2), 0, 0, 360, 1, -1)
        region = canvas[y:y + h, x:x + w]
        region[body > 0] = g[body > 0]
        if rng.random() < 0.5:  # the table: a bright curved band under the body
            ty = min(H - 3, y + h + int(rng.integers(2, max(3, (H - y - h) // 2 + 3))))
            cv2.ellipse(canvas, (W // 2, ty + int(W * 0.8)), (int(W * 0.55), int(W * 0.8)), 0, 200, 340,
                        int(rng.integers(120, 256)), int(rng.integers(2, 6)))
        if rng.random() < 0.4:  # round field of view padded with black
            m = np.zeros_like(canvas)
            cv2.circle(m, (W // 2, H // 2), int(max(H, W) * rng.uniform(0.5, 0.6)), 1, -1)
            canvas[m == 0] = 0
        return canvas
    return g


def overlay(g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Burned-in letters, figure labels and arrows."""
    g = g.copy()
    h, w = g.shape
    for _ in range(int(rng.integers(1, 4))):
        colour = int(rng.choice([0, 255, int(rng.integers(150, 256))]))
        if rng.random() < 0.5:
            text = "".join(rng.choice(list("ABCDEFGHLR0123456789 ")) for _ in range(int(rng.integers(1, 4))))
            cv2.putText(g, text, (int(rng.integers(0, max(1, int(w * 0.8)))), int(rng.integers(int(h * 0.1), h))),
                        cv2.FONT_HERSHEY_SIMPLEX, rng.uniform(0.3, 1.0) * w / 300, colour, max(1, w // 200))
        else:
            p = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            q = (p[0] + int(rng.integers(-(w // 8), w // 8 + 1)), p[1] + int(rng.integers(-(h // 8), h // 8 + 1)))
            cv2.arrowedLine(g, p, q, colour, max(1, w // 150), tipLength=0.3)
    return g


def quality(g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Resolution loss, blur, noise and JPEG compression, each with probability 0.3."""
    h, w = g.shape
    if rng.random() < 0.3:
        s = rng.uniform(0.35, 0.8)
        small = cv2.resize(g, (max(8, int(w * s)), max(8, int(h * s))), interpolation=cv2.INTER_AREA)
        g = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.3:
        g = cv2.GaussianBlur(g, (0, 0), rng.uniform(0.5, 1.5))
    if rng.random() < 0.3:
        g = np.clip(g + rng.normal(0, rng.uniform(2, 8), g.shape), 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        ok, buf = cv2.imencode(".jpg", g, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 96))])
        g = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    return g


def tone(g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random monotone tone curve (paper figures and viewers apply their own): intensity style
    must not carry the label."""
    ys = np.r_[0.0, np.sort(rng.uniform(0, 1, 3)), 1.0]
    lo, hi = rng.uniform(0, 0.15), rng.uniform(0.85, 1.0)
    lut = np.interp(np.arange(256) / 255.0, np.linspace(0, 1, 5), lo + ys * (hi - lo))
    return cv2.LUT(g, np.clip(lut * 255, 0, 255).astype(np.uint8))


def sharpen(g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unsharp masking, as a sharper reconstruction kernel or a viewer's enhancement gives."""
    a = rng.uniform(0.3, 1.5)
    return cv2.addWeighted(g, 1 + a, cv2.GaussianBlur(g, (0, 0), rng.uniform(0.8, 2.0)), -a, 0)


def site(g: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One decoded grey slice as another hospital might have exported it."""
    if rng.random() < 0.8:
        g = window(g, rng)
    g = frame(g, rng)
    if rng.random() < 0.3:
        g = overlay(g, rng)
    g = quality(g, rng)
    if rng.random() < 0.7:
        g = tone(g, rng)
    if rng.random() < 0.3:
        g = sharpen(g, rng)
    return g


def jitter(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The model's input (H, W) uint8: horizontal flip, rotation within 10 degrees, scale 0.9-1.1,
    shift within 6%."""
    h, w = x.shape
    if rng.random() < 0.5:
        x = x[:, ::-1]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-10, 10), rng.uniform(0.9, 1.1))
    m[:, 2] += rng.uniform(-0.06, 0.06, 2) * (w, h)
    return cv2.warpAffine(np.ascontiguousarray(x), m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
