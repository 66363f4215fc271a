"""Training data: class folders, decoding through the engine's function, honest splits."""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidct.engine.labels import DataError, resolve_classes  # noqa: F401  (re-exported for train)
from covidct.engine.decode import MULTI_FRAME, DecodeError, decode_grey_frames, read_file, resize

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FRACTIONS = (0.7, 0.1, 0.2)


#: Training images are kept decoded for augmentation, shrunk to this longest side at most: the
#: model's input is 256 or less, so nothing it can see is lost, and 10,000 slices stay ~2.6 GB.
RAW_MAX_SIDE = 512


@dataclass
class Dataset:
    paths: list[str]
    labels: np.ndarray          # 0 negative, 1 positive
    images: np.ndarray          # uint8 (N, H, W, 1): the model's input, made as the engine makes it
    sha256: list[str]
    unreadable: list[tuple[str, str]]  # (path, reason)
    grey: list[np.ndarray] | None = None  # decoded grey slices at their own size (for augmentation)
    site: np.ndarray | None = None        # each image's site index (train.sites); None: one site


def concat(parts: list[Dataset]) -> Dataset:
    """One Dataset of several, in order (sites keep their indices)."""
    if len(parts) == 1:
        return parts[0]
    return Dataset(
        paths=[p for d in parts for p in d.paths], labels=np.concatenate([d.labels for d in parts]),
        images=np.concatenate([d.images for d in parts]), sha256=[h for d in parts for h in d.sha256],
        unreadable=[u for d in parts for u in d.unreadable],
        grey=None if any(d.grey is None for d in parts) else [g for d in parts for g in d.grey],
        site=np.concatenate([d.site if d.site is not None else np.zeros(len(d.paths), np.int64) for d in parts]))


def _shrink(grey: np.ndarray) -> np.ndarray:
    h, w = grey.shape
    s = RAW_MAX_SIDE / max(h, w)
    if s >= 1:
        return grey
    import cv2
    return cv2.resize(grey, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def load_images(data_dir: Path, classes: tuple[str, str], image_size: tuple[int, int],
                interpolation: str, window: dict | None = None, preprocessing: dict | None = None,
                keep_grey: bool = False, exclude: Path | None = None) -> Dataset:
    """Decode every file under the class folders with the engine's decode functions.

    Each image becomes the model's input exactly as covidct-batch makes it (``decode_grey_frames``
    then ``resize`` with the contract's preprocessing); with ``keep_grey`` the decoded grey slice
    is kept too, for augmentation before that preprocessing. Unreadable files are logged and
    listed, never fatal; a multi-frame DICOM is one of them (one image per training file).
    """
    paths, labels, images, hashes, bad, greys = [], [], [], [], [], []
    for label, name in enumerate(classes):
        skip = Path(os.path.abspath(exclude)) if exclude is not None else None
        for path in sorted(p for p in (Path(data_dir) / name).rglob("*") if p.is_file()):
            if skip is not None and skip in Path(os.path.abspath(path)).parents:
                continue  # the run directory itself, inside a class folder: never a training image
            try:
                data = read_file(path)
                frames = decode_grey_frames(data, window=window)
                if len(frames) != 1:
                    raise DecodeError(MULTI_FRAME, f"{len(frames)} frames in one file (one image per training file)")
                grey = frames[0][0]
                img = resize(grey, image_size, interpolation, preprocessing)
            except DecodeError as e:
                bad.append((str(path), f"{e.code}: {e}"))
                continue
            paths.append(str(path))
            labels.append(label)
            images.append(img)
            hashes.append(hashlib.sha256(data).hexdigest())
            if keep_grey:
                greys.append(_shrink(grey))
    if bad:
        log.warning("skipped %d unreadable file(s): %s", len(bad), "; ".join(f"{p} ({r})" for p, r in bad[:20]))
    if not paths:
        raise DataError(f"no readable images under {data_dir}/{{{','.join(classes)}}}")
    x = np.stack(images)[..., None]
    return Dataset(paths, np.asarray(labels, np.int64), x, hashes, bad, greys if keep_grey else None)


def _group_keys(paths: list[str], hashes: list[str], groups: str | None) -> list[int]:
    """Connected components over 'same patient' (regex) and 'same content' (hash)."""
    parent = list(range(len(paths)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    pattern = re.compile(groups) if groups else None
    for i, (path, h) in enumerate(zip(paths, hashes)):
        keys = ["sha:" + h]
        if pattern is not None:
            m = pattern.search(Path(path).name) or pattern.search(path)
            if m:
                keys.append("grp:" + (m.group(1) if m.groups() else m.group(0)))
        for k in keys:
            if k in first:
                parent[find(i)] = find(first[k])
            else:
                first[k] = i
    return [find(i) for i in range(len(paths))]


def split(paths: list[str], labels: np.ndarray, hashes: list[str], seed: int,
          groups: str | None = None) -> np.ndarray:
    """Assign each file to 0 train, 1 val, 2 test: 70/10/20, stratified, seeded.

    Groups (a patient by ``groups`` regex, and files of identical content) never straddle
    two splits. Groups are shuffled with the seed and each goes to the split furthest
    below its target share for the group's majority class.
    """
    keys = _group_keys(paths, hashes, groups)
    members: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        members.setdefault(k, []).append(i)
    order = sorted(members)  # deterministic before the seeded shuffle
    rng = np.random.default_rng(seed)
    rng.shuffle(order)
    totals = np.bincount(labels, minlength=2).astype(float)
    filled = np.zeros((2, 3))
    out = np.empty(len(paths), np.int64)
    for k in order:
        idx = members[k]
        cls = int(round(labels[idx].mean()))
        deficit = np.asarray(FRACTIONS) * totals[cls] - filled[cls]
        s = int(np.argmax(deficit))
        out[idx] = s
        for c in (0, 1):
            filled[c, s] += int((labels[idx] == c).sum())
    return out


def write_split(path: Path, ds: Dataset, assignment: np.ndarray, classes: tuple[str, str],
                site_names: tuple[str, ...] | None = None) -> None:
    """split.csv: path, class (the model's class names), split, sha256 and, with ``site_names``, site."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "class", "split", "sha256"] + (["site"] if site_names else []))
        for i, (p, y, s, h) in enumerate(zip(ds.paths, ds.labels, assignment, ds.sha256)):
            site = [site_names[ds.site[i]]] if site_names else []
            w.writerow([p, classes[y], SPLITS[s], h] + site)


def read_split(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
