"""Screening metrics with plain NumPy: ROC AUC, Wilson intervals, an operating threshold."""

from __future__ import annotations

import math

import numpy as np


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic (ties count one half)."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p), dtype=np.float64)
    sorted_p = p[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_p, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (sensible at 0% and 100%, unlike Wald)."""
    if n == 0:
        return (float("nan"), float("nan"))
    phat = successes / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def confusion(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, int]:
    y = np.asarray(y).astype(bool)
    pred = np.asarray(p) >= threshold
    return {"tn": int((~y & ~pred).sum()), "fp": int((~y & pred).sum()),
            "fn": int((y & ~pred).sum()), "tp": int((y & pred).sum())}


def operating_threshold(y: np.ndarray, p: np.ndarray, target_sensitivity: float) -> float:
    """The threshold reaching ``target_sensitivity`` with the highest specificity.

    Candidates are the observed probabilities; labelling is ``p >= threshold``. The highest
    candidate whose sensitivity meets the target keeps the most negatives below it.
    """
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    if not y.any() or y.all():
        raise ValueError("the validation split needs both classes to choose a threshold")
    pos = np.sort(p[y])[::-1]
    # the k-th highest positive probability keeps k positives at or above it
    k = max(1, math.ceil(target_sensitivity * len(pos) - 1e-9))
    return float(pos[k - 1])


def screening_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """Accuracy, AUC, sensitivity and specificity with Wilson 95% intervals, confusion matrix."""
    c = confusion(y, p, threshold)
    n_pos, n_neg = c["tp"] + c["fn"], c["tn"] + c["fp"]
    n = n_pos + n_neg
    return {
        "n": n,
        "accuracy": (c["tp"] + c["tn"]) / n if n else float("nan"),
        "roc_auc": roc_auc(y, p),
        "sensitivity": c["tp"] / n_pos if n_pos else float("nan"),
        "sensitivity_ci95": list(wilson(c["tp"], n_pos)),
        "specificity": c["tn"] / n_neg if n_neg else float("nan"),
        "specificity_ci95": list(wilson(c["tn"], n_neg)),
        "confusion": c,
        "threshold": threshold,
    }
