"""Training data: class folders, decoding through the engine's function, honest splits."""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.decode import DecodeError, decode_and_resize, read_file

log = logging.getLogger(__name__)

#: Folder names read as the positive class unless --positive says otherwise.
POSITIVE_WORDS = re.compile(r"^(infected|covid(-?19)?|positive|pos|sars-?cov-?2|abnormal|disease|yes|1)$", re.I)
NEGATIVE_PREFIX = re.compile(r"^(not|non|no|un)[-_ ]?", re.I)

SPLITS = ("train", "val", "test")
FRACTIONS = (0.7, 0.1, 0.2)


class DataError(ValueError):
    """The data folder cannot be used for training; the message says how to fix it."""


def resolve_classes(data_dir: Path, positive: str | None = None) -> tuple[str, str]:
    """(negative, positive) class folder names of ``data_dir``.

    The positive class is named by ``positive`` or recognised from its name (Infected,
    COVID, positive...); it is never taken from sort order.
    """
    folders = sorted(p.name for p in Path(data_dir).iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) != 2:
        raise DataError(f"{data_dir} must hold exactly two class folders, found {len(folders)}: {folders}")
    if positive is not None:
        if positive not in folders:
            raise DataError(f"--positive {positive!r} is not one of the class folders {folders}")
        pos = positive
    else:
        hits = [f for f in folders if POSITIVE_WORDS.match(f)
                or (POSITIVE_WORDS.match(NEGATIVE_PREFIX.sub("", f)) and not NEGATIVE_PREFIX.match(f))]
        if len(hits) != 1:
            raise DataError(f"cannot tell which class is positive among {folders}: "
                            f"name it with --positive, e.g. --positive {folders[0]!r}")
        pos = hits[0]
    neg = next(f for f in folders if f != pos)
    return neg, pos


@dataclass
class Dataset:
    paths: list[str]
    labels: np.ndarray          # 0 negative, 1 positive
    images: np.ndarray          # uint8 (N, H, W, 1)
    sha256: list[str]
    unreadable: list[tuple[str, str]]  # (path, reason)


def load_images(data_dir: Path, classes: tuple[str, str], image_size: tuple[int, int],
                interpolation: str) -> Dataset:
    """Decode every file under the class folders with the engine's decode function.

    Unreadable files are logged and listed, never fatal.
    """
    paths, labels, images, hashes, bad = [], [], [], [], []
    for label, name in enumerate(classes):
        for path in sorted(p for p in (Path(data_dir) / name).rglob("*") if p.is_file()):
            try:
                data = read_file(path)
                img = decode_and_resize(data, image_size, interpolation)
            except DecodeError as e:
                reason = f"{e.code}: {e}"
                bad.append((str(path), reason))
                continue
            paths.append(str(path))
            labels.append(label)
            images.append(img)
            hashes.append(hashlib.sha256(data).hexdigest())
    if bad:
        log.warning("skipped %d unreadable file(s): %s", len(bad), "; ".join(f"{p} ({r})" for p, r in bad[:20]))
    if not paths:
        raise DataError(f"no readable images under {data_dir}/{{{','.join(classes)}}}")
    x = np.stack(images)[..., None] if images else np.zeros((0, *image_size, 1), np.uint8)
    return Dataset(paths, np.asarray(labels, np.int64), x, hashes, bad)


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


def write_split(path: Path, ds: Dataset, assignment: np.ndarray, classes: tuple[str, str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "class", "split", "sha256"])
        for p, y, s, h in zip(ds.paths, ds.labels, assignment, ds.sha256):
            w.writerow([p, classes[y], SPLITS[s], h])


def read_split(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
