"""Several sites in one training run: naming, loading, per-site splits, site-balanced draws, and an
operating threshold chosen across sites.

A site is one labelled folder (one hospital, one public set) with the class folders covidct-train has
always read. Each site gets its own stratified split, so every site has validation and test slices of
its own; training draws as many slices from each site per epoch, so a small site counts as much as a
big one (Wang, Liu & Dou, IEEE JBHI 2020, trained jointly on the two public sets this project holds);
the threshold must reach the target sensitivity on every site's validation split.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidct.engine.labels import DataError
from covidct.engine.metrics import delong_ci, operating_threshold, screening_metrics

from . import data as data_mod

#: A site's name: what --site NAME=DIR may say, and what metrics.json and the contract key figures by.
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Site:
    name: str
    path: Path


def parse_sites(dirs: tuple[Path, ...] = (), named: tuple[str, ...] = ()) -> tuple[Site, ...]:
    """Sites from positional folders (named by the folder's name) and ``NAME=DIR`` pairs, in that order."""
    sites = [Site(re.sub(r"[^A-Za-z0-9._-]+", "-", Path(d).resolve().name).strip("-.")[:64] or "site", Path(d))
             for d in dirs]
    for item in named:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise DataError(f"--site takes NAME=DIR, e.g. --site saopaulo=/data/sp; got {item!r}")
        sites.append(Site(name, Path(path)))
    if not sites:
        raise DataError("give at least one site folder (one sub-folder per class)")
    for s in sites:
        if not SITE_NAME.match(s.name):
            raise DataError(f"site name {s.name!r} must be letters, digits, '.', '_' or '-' (at most 64): "
                            f"name it with --site NAME={s.path}")
        if not Path(s.path).is_dir():
            raise DataError(f"site {s.name!r}: {s.path} is not a directory (expected one sub-folder per class)")
    names = [s.name for s in sites]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"two sites are named {dup}: name them with --site NAME=DIR")
    paths = [Path(s.path).resolve() for s in sites]
    if len(set(paths)) != len(paths):
        raise DataError("the same folder is given as two sites")
    return tuple(sites)


def site_classes(sites: tuple[Site, ...], positive: str | None) -> list[tuple[str, str]]:
    """(negative, positive) class folders of every site, by the same rule as one site's.

    ``positive`` names the positive folder in the sites that have a folder of that name (with one site,
    it must); the other sites' positive class is recognised by name.
    """
    if positive is not None and len(sites) > 1 and not any(positive in folder_names(s.path) for s in sites):
        raise DataError(f"--positive {positive!r} is a class folder of no site")
    return [data_mod.resolve_classes(s.path, positive if len(sites) == 1 or positive in folder_names(s.path)
                                     else None) for s in sites]


def folder_names(path: Path) -> set[str]:
    return {p.name for p in Path(path).iterdir() if p.is_dir()}


def load_sites(sites: tuple[Site, ...], positive: str | None, **load_kwargs) -> tuple[data_mod.Dataset,
                                                                                    tuple[str, str]]:
    """Every site's images in one Dataset whose ``site`` holds each image's site index; the first site's
    folder names become the model's class names."""
    classes = site_classes(sites, positive)
    parts = []
    for k, (s, c) in enumerate(zip(sites, classes)):
        ds = data_mod.load_images(s.path, c, **load_kwargs)
        ds.site = np.full(len(ds.paths), k, np.int64)
        parts.append(ds)
    return data_mod.concat(parts), classes[0]


def split_sites(ds: data_mod.Dataset, seed: int, groups: str | None) -> np.ndarray:
    """0 train / 1 val / 2 test for every image: each site split on its own (stratified, seeded, groups and
    duplicates together); a file whose content is in two sites follows its first copy's split."""
    out = np.empty(len(ds.paths), np.int64)
    for k in np.unique(ds.site):
        idx = np.nonzero(ds.site == k)[0]
        out[idx] = data_mod.split([ds.paths[i] for i in idx], ds.labels[idx], [ds.sha256[i] for i in idx], seed,
                                  groups)
    first: dict[str, int] = {}
    for i, h in enumerate(ds.sha256):
        if h in first:
            out[i] = out[first[h]]
        else:
            first[h] = i
    return out


def balanced_order(site: np.ndarray, rng: np.random.Generator, n: int | None = None) -> np.ndarray:
    """One epoch's draw of training indices (into ``site``): as many from each site.

    ``n`` (default: every training image once) is split evenly between sites; each site's share walks
    through fresh permutations of its images, so a small site's slices repeat only after all of them were
    drawn, and a big site's are subsampled. With one site this is exactly a permutation of all images.
    """
    site = np.asarray(site)
    names = np.unique(site)
    n = len(site) if n is None else n
    if len(names) == 1:
        return rng.permutation(len(site))[:n] if n <= len(site) else \
            np.concatenate([rng.permutation(len(site)) for _ in range(math.ceil(n / len(site)))])[:n]
    per = [n // len(names) + (1 if j < n % len(names) else 0) for j in range(len(names))]
    draws = []
    for k, m in zip(names, per):
        idx = np.nonzero(site == k)[0]
        passes = [idx[rng.permutation(len(idx))] for _ in range(math.ceil(m / len(idx)))]
        draws.append(np.concatenate(passes)[:m])
    order = np.concatenate(draws)
    return order[rng.permutation(len(order))]


def sample_weights(site: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-image loss weights that balance the classes within each site (mean 1 per site)."""
    w = np.empty(len(labels), np.float32)
    for k in np.unique(site):
        m = site == k
        counts = np.bincount(labels[m], minlength=2)
        cw = counts.sum() / (2.0 * np.maximum(counts, 1))
        w[m] = cw[labels[m]]
    return w


def threshold_across_sites(site: np.ndarray, labels: np.ndarray, p: np.ndarray, target: float,
                           names: tuple[str, ...]) -> tuple[float, dict[str, float]]:
    """The highest threshold that reaches ``target`` sensitivity on every site's validation slices.

    Each site's own threshold (``engine.metrics.operating_threshold``) is the highest that reaches the
    target there; the lowest of them reaches it everywhere. Returns it and every site's own.
    """
    own = {}
    for k, name in enumerate(names):
        m = site == k
        if m.any():
            own[name] = operating_threshold(labels[m], p[m], target)
    return min(own.values()), own


def figures(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """Screening figures of one set at a threshold, with the AUC's DeLong interval."""
    m = screening_metrics(y, p, threshold)
    m["roc_auc_ci95"] = list(delong_ci(y, p)[1:])
    m["n_positive"], m["n_negative"] = int(np.sum(y == 1)), int(np.sum(y == 0))
    return m


def per_site(site: np.ndarray, y: np.ndarray, p: np.ndarray, threshold: float, names: tuple[str, ...]) -> dict:
    return {name: figures(y[site == k], p[site == k], threshold) for k, name in enumerate(names)
            if (site == k).any()}


def figure_line(name: str, m: dict) -> str:
    """One printed line: AUC with its interval, sensitivity and specificity with theirs."""
    a_lo, a_hi = m.get("roc_auc_ci95", [float("nan")] * 2)
    s_lo, s_hi = m["sensitivity_ci95"]
    c_lo, c_hi = m["specificity_ci95"]
    return (f"{name} (n={m['n']}): AUC {m['roc_auc']:.3f} [{a_lo:.3f}, {a_hi:.3f}]  "
            f"sensitivity {m['sensitivity']:.3f} [{s_lo:.3f}, {s_hi:.3f}]  "
            f"specificity {m['specificity']:.3f} [{c_lo:.3f}, {c_hi:.3f}]")
