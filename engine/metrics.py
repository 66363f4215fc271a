"""Screening metrics with plain NumPy: ROC AUC with DeLong's interval, Wilson intervals, an
operating threshold, calibration. Training and covidct-evaluate both use these, so a model's
figures at training time and at a hospital's local validation are computed the same way."""

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


def _midranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    _, first, counts = np.unique(xs, return_index=True, return_counts=True)
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def delong_ci(y: np.ndarray, p: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """ROC AUC and its DeLong confidence interval (DeLong et al. 1988; Sun and Xu's fast form).

    Returns (auc, low, high); the interval is clipped to [0, 1]. NaNs when a class is missing.
    """
    from statistics import NormalDist

    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    pos, neg = p[y], p[~y]
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        return (float("nan"),) * 3
    tx, ty, tz = _midranks(pos), _midranks(neg), _midranks(np.concatenate([pos, neg]))
    auc = (tz[:m].sum() - m * (m + 1) / 2.0) / (m * n)
    v01 = (tz[:m] - tx) / n          # structural components of the positives
    v10 = 1.0 - (tz[m:] - ty) / m    # and of the negatives
    var = (np.var(v01, ddof=1) / m if m > 1 else 0.0) + (np.var(v10, ddof=1) / n if n > 1 else 0.0)
    half = NormalDist().inv_cdf(0.5 + level / 2.0) * float(np.sqrt(max(var, 0.0)))
    return float(auc), max(0.0, float(auc - half)), min(1.0, float(auc + half))


def roc_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), one point per distinct score, from
    the highest threshold down, starting at (0, 0): labelling is ``p >= threshold``."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order]
    last = np.r_[np.nonzero(np.diff(ps))[0], len(ps) - 1]  # last index of each distinct score
    tps = np.cumsum(ys)[last]
    fps = (last + 1) - tps
    npos, nneg = max(1, int(y.sum())), max(1, int((~y).sum()))
    return np.r_[0.0, fps / nneg], np.r_[0.0, tps / npos], np.r_[np.inf, ps[last]]


def calibration(y: np.ndarray, p: np.ndarray, bins: int = 10) -> dict:
    """Expected calibration error over ``bins`` equal-width probability bins, and the bins
    (mean predicted probability, observed positive fraction, count) for a reliability diagram."""
    y = np.asarray(y).astype(np.float64)
    p = np.asarray(p, dtype=np.float64)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        sel = idx == b
        k = int(sel.sum())
        if k == 0:
            rows.append({"low": b / bins, "high": (b + 1) / bins, "n": 0, "mean_probability": None,
                         "positive_fraction": None})
            continue
        conf, acc = float(p[sel].mean()), float(y[sel].mean())
        ece += k / len(p) * abs(conf - acc)
        rows.append({"low": b / bins, "high": (b + 1) / bins, "n": k, "mean_probability": conf,
                     "positive_fraction": acc})
    return {"ece": float(ece) if len(p) else float("nan"), "bins": rows}


def agreement(p_ref: np.ndarray, p_new: np.ndarray, threshold: float, y: np.ndarray | None = None) -> dict:
    """How a reduced-precision model's probabilities ``p_new`` agree with the FP32 ones ``p_ref``:
    the share of equal labels at ``threshold``, the largest difference, and with labels ``y`` both
    ROC AUCs and their difference."""
    p_ref, p_new = np.asarray(p_ref, np.float64), np.asarray(p_new, np.float64)
    out = {"n": int(len(p_ref)), "threshold": float(threshold),
           "label_agreement": float(np.mean((p_ref >= threshold) == (p_new >= threshold))) if len(p_ref) else None,
           "max_abs_diff": float(np.max(np.abs(p_ref - p_new))) if len(p_ref) else None}
    if y is not None and len(set(np.asarray(y).tolist())) == 2:
        a, b = roc_auc(y, p_ref), roc_auc(y, p_new)
        out.update(auc_fp32=round(a, 4), auc=round(b, 4), auc_difference=round(b - a, 4))
    return out
