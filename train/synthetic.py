"""Synthetic CT-like slices: a thorax phantom with two lungs, vessels and, on the
positive class, ground-glass opacities. Small enough to make in a test, learnable by the
seeds' CNN in a few epochs, and free of any licence or patient.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def phantom(rng: np.random.Generator, positive: bool, size: tuple[int, int] = (320, 320)) -> np.ndarray:
    """One grey uint8 axial slice (height, width)."""
    h, w = size
    img = np.zeros((h, w), np.float32)
    cy, cx = h / 2 + rng.normal(0, h * 0.02), w / 2 + rng.normal(0, w * 0.02)
    body = (int(w * rng.uniform(0.40, 0.46)), int(h * rng.uniform(0.30, 0.36)))
    cv2.ellipse(img, (int(cx), int(cy)), body, 0, 0, 360, 0.45, -1)
    lungs = np.zeros_like(img)
    for side in (-1, 1):
        centre = (int(cx + side * w * rng.uniform(0.17, 0.20)), int(cy - h * 0.02))
        axes = (int(w * rng.uniform(0.12, 0.15)), int(h * rng.uniform(0.20, 0.25)))
        cv2.ellipse(lungs, centre, axes, rng.uniform(-10, 10), 0, 360, 1.0, -1)
    img[lungs > 0] = 0.08
    for _ in range(rng.integers(15, 30)):  # vessels: small bright dots inside the lungs
        y, x = rng.integers(0, h), rng.integers(0, w)
        if lungs[y, x] > 0:
            cv2.circle(img, (int(x), int(y)), int(rng.integers(1, 4)), 0.5, -1)
    if positive:  # ground-glass: soft, hazy blobs in the lung fields
        ys, xs = np.nonzero(lungs)
        for _ in range(rng.integers(2, 5)):
            k = rng.integers(0, len(ys))
            sigma = rng.uniform(0.03, 0.07) * w
            yy, xx = np.mgrid[0:h, 0:w]
            blob = np.exp(-((yy - ys[k]) ** 2 + (xx - xs[k]) ** 2) / (2 * sigma ** 2))
            img += 0.28 * blob * (lungs > 0)
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    img = cv2.GaussianBlur(img, (3, 3), 0)
    return np.clip(img * 255, 0, 255).astype(np.uint8)


def make_dataset(root: Path, n_per_class: int = 60, seed: int = 0,
                 classes: tuple[str, str] = ("non-COVID", "COVID"), fmt: str = ".png",
                 size: tuple[int, int] = (320, 320)) -> Path:
    """Write ``n_per_class`` phantoms per class into ``root/<class>/``; returns root.

    ``classes`` is (negative, positive). File names carry a patient id (``p<k>_s<j>``),
    three slices per patient, so ``--groups 'p\\d+'`` keeps patients together.
    """
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        d = Path(root) / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = phantom(rng, positive=bool(label), size=size)
            cv2.imwrite(str(d / f"{name}_p{i // 3:04d}_s{i % 3}{fmt}"), img)
    return Path(root)


def make_archive(root: Path, n: int, seed: int = 0, size: tuple[int, int] = (512, 512),
                 per_folder: int = 1000, quality: int = 90) -> list[Path]:
    """``n`` grey JPEG slices that look like CT exports, in nested folders (for the engine and
    benchmarks); returns their paths.

    Each is an HU thorax (a body, two lungs with vessels, a vertebra; ground-glass on half of them)
    through a varied lung window, half of them framed as another site exports them (the whole field
    of view, a table, a round field of view padded with black), so lung-crop has its real work to do.
    Sixteen such renderings are reused with fresh noise so that a large archive stays fast to make.
    """
    rng = np.random.default_rng(seed)
    bases = []
    for k in range(16):
        grey = render(phantom_hu(rng, positive=bool(k % 2)), rng.uniform(-700, -450), rng.uniform(1000, 1800))
        if k % 4 >= 2:
            grey = other_site(grey, rng, table=True, pad=1.25 if k % 8 >= 4 else 1.4)
        bases.append(cv2.resize(grey, (size[1], size[0]), interpolation=cv2.INTER_AREA).astype(np.int16))
    paths = []
    for i in range(n):
        d = Path(root) / f"batch{i // per_folder:04d}"
        if i % per_folder == 0:
            d.mkdir(parents=True, exist_ok=True)
        noise = rng.integers(-6, 7, size, dtype=np.int16)
        img = np.clip(bases[i % len(bases)] + noise, 0, 255).astype(np.uint8)
        p = d / f"slice_{i:07d}.jpg"
        cv2.imwrite(str(p), img, [cv2.IMWRITE_JPEG_QUALITY, quality])
        paths.append(p)
    return paths


def phantom_hu(rng: np.random.Generator, positive: bool, size: tuple[int, int] = (512, 512)) -> np.ndarray:
    """An axial thorax in Hounsfield units (float32): air -1000 outside, soft tissue ~40, fat ~-100
    under the skin, lungs ~-850 with vessels, and on the positive class ground-glass (~-500)."""
    h, w = size
    hu = np.full((h, w), -1000.0, np.float32)
    cy, cx = h / 2 + rng.normal(0, h * 0.01), w / 2 + rng.normal(0, w * 0.01)
    body = (int(w * rng.uniform(0.36, 0.42)), int(h * rng.uniform(0.27, 0.32)))
    cv2.ellipse(hu, (int(cx), int(cy)), body, 0, 0, 360, -100.0, -1)
    cv2.ellipse(hu, (int(cx), int(cy)), (body[0] - w // 40, body[1] - h // 40), 0, 0, 360, 40.0, -1)
    lungs = np.zeros((h, w), np.uint8)
    for side in (-1, 1):
        centre = (int(cx + side * w * rng.uniform(0.15, 0.17)), int(cy - h * 0.01))
        axes = (int(w * rng.uniform(0.10, 0.12)), int(h * rng.uniform(0.17, 0.20)))
        cv2.ellipse(lungs, centre, axes, rng.uniform(-8, 8), 0, 360, 1, -1)
    hu[lungs > 0] = -850.0
    cv2.circle(hu, (int(cx), int(cy + body[1] * 0.75)), int(w * 0.03), 700.0, -1)  # a vertebra
    ys, xs = np.nonzero(lungs)
    for _ in range(int(rng.integers(25, 45))):
        k = rng.integers(0, len(ys))
        cv2.circle(hu, (int(xs[k]), int(ys[k])), int(rng.integers(1, 4)), 40.0, -1)
    if positive:
        yy, xx = np.mgrid[0:h, 0:w]
        for _ in range(int(rng.integers(2, 5))):
            k = rng.integers(0, len(ys))
            sigma = rng.uniform(0.03, 0.06) * w
            blob = np.exp(-((yy - ys[k]) ** 2 + (xx - xs[k]) ** 2) / (2 * sigma ** 2)).astype(np.float32)
            hu += 380.0 * blob * (lungs > 0)
    hu += rng.normal(0, 15, hu.shape).astype(np.float32)
    return hu


def render(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    """HU to grey through a CT window, as a scanner's or a paper's export would."""
    lo = level - width / 2.0
    return np.clip(np.rint((hu - lo) * (255.0 / width)), 0, 255).astype(np.uint8)


def other_site(grey: np.ndarray, rng: np.random.Generator | None = None, table: bool = True,
               round_fov: bool = True, pad: float = 1.4) -> np.ndarray:
    """A slice as another hospital exports it: the whole field of view around the body (``pad``
    times its size), a table under it, and a round field of view padded with black."""
    h, w = grey.shape
    H, W = int(h * pad), int(w * pad)
    y, x = (H - h) // 2, (W - w) // 2
    outside = int(np.percentile(grey, 1))  # air: the darkest the export shows (a crop's border may be chest wall)
    canvas = np.full((H, W), outside, np.uint8)
    canvas[y:y + h, x:x + w] = grey
    if table:
        cv2.ellipse(canvas, (W // 2, y + h + int(H * 0.02) + int(W * 0.9)), (int(W * 0.45), int(W * 0.9)), 0, 240, 300,
                    200, max(2, H // 100))
    if round_fov:
        m = np.zeros_like(canvas)
        cv2.circle(m, (W // 2, H // 2), int(min(H, W) * 0.49), 1, -1)
        canvas[m == 0] = 0
    return canvas
