"""The shift alarm: is this archive made like the data the model was trained on?

At export, the contract records a reference: fixed-bin histograms of a few cheap statistics of
the training images as the preprocessing sees them, and of the model's probabilities on held-out
slices. covidct-batch computes the same statistics for every slice in its workers, merges them into
histograms of the same bins (bounded memory, whatever the archive size) and compares: per
statistic, the two-sample Kolmogorov-Smirnov distance between the reference and the run.

Statistics (``STATS``), all per slice:

- ``dark_anchor``, ``tissue_anchor``: grey levels of aerated lung and of soft tissue *before* the
  preprocessing maps them. They reveal the export window and gamma, which the preprocessing
  compensates only when they are linear.
- ``lung_fraction``: share of the body in the lung fields (framing of the lungs, slice level).
- ``input_mean``: mean of the model's input inside the body (what the model sees, after mapping).
- ``input_detail``: mean absolute Laplacian of the model's input (resolution, blur, noise, JPEG).

The verdict uses the statistics of *how the archive was made* (``DECIDING``: the two anchors and
input detail). Lung fraction and input mean are reported beside them but do not decide: they also
move with disease and slice level (measured: the 13 TCIA slices, severe COVID-19 with consolidated
lungs, have a lung fraction of 0.12 against 0.50 at the training site), and an archive of very sick
patients is not a reason to distrust the model. Nor are the probabilities ("prediction shift"): an
archive with 5% COVID-19 differs from a 50/50 test split for reasons that say nothing against the
model.

Rule: a statistic has shifted when its KS distance exceeds both the two-sample critical value at
``ALPHA`` (so a small sample does not fire on noise) and ``MIN_EFFECT`` (so a huge archive does not
fire on a trivial difference). The run or study is ``shifted`` when any statistic has, and is not
judged below ``MIN_SLICES`` slices. This is a screen for "not like the training data", not a
measure of accuracy: an archive in range can still be screened badly, which only a labelled local
check (covidct-evaluate) can tell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

REFERENCE_VERSION = 1

#: The statistics' names: defined here only (the output's columns, engine.rows, are made from STATS).
DARK_ANCHOR, TISSUE_ANCHOR, LUNG_FRACTION = "dark_anchor", "tissue_anchor", "lung_fraction"
INPUT_MEAN, INPUT_DETAIL = "input_mean", "input_detail"
#: (low, high, bins) of each statistic's fixed histogram. Values outside are clipped to the ends.
STATS: dict[str, tuple[float, float, int]] = {
    DARK_ANCHOR: (0.0, 256.0, 32),
    TISSUE_ANCHOR: (0.0, 256.0, 32),
    LUNG_FRACTION: (0.0, 1.0, 25),
    INPUT_MEAN: (0.0, 256.0, 32),
    INPUT_DETAIL: (0.0, 64.0, 32),
}
PROBABILITY_BINS = 20
#: The statistics that decide the verdict: acquisition (window, resolution, noise), not content.
DECIDING = (DARK_ANCHOR, TISSUE_ANCHOR, INPUT_DETAIL)

#: Two-sample KS critical value coefficient c(alpha) = sqrt(-ln(alpha / 2) / 2) at alpha = 0.001.
ALPHA = 0.001
MIN_EFFECT = 0.25
MIN_SLICES = 20

IN_RANGE = "in range"
SHIFTED = "shifted: predictions may not be reliable"
TOO_FEW = "too few slices to judge"
NO_REFERENCE = "no reference (the model was exported without one)"


def slice_stats(model_input: np.ndarray, framing) -> dict[str, float] | None:
    """The statistics of one slice: its model input (uint8 H x W) and the preprocessing's Framing.

    None when the model has no framing (schema 1 preprocessing): there is nothing to compare.
    """
    if framing is None:
        return None
    # Sums over the body, not masked means: the preprocessing leaves 0 outside the body, so the sum of
    # the image is the body's sum. Measured: 0.14 ms with masked means, half that this way.
    n = cv2.countNonZero(model_input) or model_input.size
    _, body = cv2.threshold(model_input, 0, 255, cv2.THRESH_BINARY)
    detail = cv2.bitwise_and(cv2.convertScaleAbs(cv2.Laplacian(model_input, cv2.CV_16S)), body)
    return {DARK_ANCHOR: float(framing.dark_anchor), TISSUE_ANCHOR: float(framing.tissue_anchor),
            LUNG_FRACTION: float(framing.lung_fraction), INPUT_MEAN: cv2.sumElems(model_input)[0] / n,
            INPUT_DETAIL: cv2.sumElems(detail)[0] / n}


def _bin(value: float, lo: float, hi: float, bins: int) -> int:
    if value != value:  # NaN
        return 0
    return min(bins - 1, max(0, int((value - lo) / (hi - lo) * bins)))


@dataclass
class Histograms:
    """Fixed-bin counts of every statistic (and of probabilities): merged by adding."""

    counts: dict[str, list[int]] = field(default_factory=lambda: {k: [0] * b for k, (_, _, b) in STATS.items()})
    probability: list[int] = field(default_factory=lambda: [0] * PROBABILITY_BINS)
    n: int = 0

    def add(self, stats: dict[str, float] | None, probability: float | None = None) -> None:
        if stats is not None:
            self.n += 1
            for k, (lo, hi, bins) in STATS.items():
                self.counts[k][_bin(stats[k], lo, hi, bins)] += 1
        if probability is not None:
            self.probability[_bin(probability, 0.0, 1.0, PROBABILITY_BINS)] += 1

    def merge(self, other: "Histograms") -> None:
        self.n += other.n
        for k in self.counts:
            self.counts[k] = [a + b for a, b in zip(self.counts[k], other.counts[k])]
        self.probability = [a + b for a, b in zip(self.probability, other.probability)]

    def to_reference(self, source: str) -> dict:
        return {"version": REFERENCE_VERSION, "n": self.n, "source": source,
                "stats": {k: {"low": lo, "high": hi, "counts": self.counts[k]} for k, (lo, hi, _) in STATS.items()},
                "probability": {"n": sum(self.probability), "counts": self.probability}}


def reference_problems(ref) -> list[str]:
    """Every way a contract's ``reference`` is malformed (empty when valid, or when there is none)."""
    if ref is None:
        return []
    if not isinstance(ref, dict) or ref.get("version") != REFERENCE_VERSION:
        return [f"reference must be a version {REFERENCE_VERSION} object; got "
                f"{type(ref).__name__ if not isinstance(ref, dict) else ref.get('version')!r}"]
    p = []
    stats = ref.get("stats")
    if not isinstance(stats, dict) or set(stats) != set(STATS):
        p.append(f"reference.stats must hold {sorted(STATS)}")
    else:
        for k, (lo, hi, bins) in STATS.items():
            s = stats[k]
            if not isinstance(s, dict) or s.get("low") != lo or s.get("high") != hi or len(s.get("counts", [])) != bins:
                p.append(f"reference.stats.{k} must have low {lo}, high {hi} and {bins} counts")
    prob = ref.get("probability")
    if not isinstance(prob, dict) or len(prob.get("counts", [])) != PROBABILITY_BINS:
        p.append(f"reference.probability must have {PROBABILITY_BINS} counts")
    if not isinstance(ref.get("n"), int) or ref["n"] < 1:
        p.append("reference.n must be a positive count")
    return p


def ks_distance(a: list[int], b: list[int]) -> float:
    """Largest gap between the two histograms' cumulative distributions (same bins)."""
    ca, cb = np.cumsum(a, dtype=np.float64), np.cumsum(b, dtype=np.float64)
    if ca[-1] == 0 or cb[-1] == 0:
        return float("nan")
    return float(np.max(np.abs(ca / ca[-1] - cb / cb[-1])))


def critical(n: int, m: int, alpha: float = ALPHA) -> float:
    """Two-sample KS critical value at ``alpha`` for samples of n and m."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def compare(reference: dict | None, hist: Histograms) -> dict:
    """Shift score and verdict of ``hist`` against the model's reference.

    Returns ``{"verdict", "score", "slices", "stats": {name: {"ks", "critical", "shifted"}},
    "prediction_shift": {"ks", ...}}``; ``score`` is the largest KS distance over the statistics
    that decide (0 = identical distributions, 1 = disjoint).
    """
    if reference is None:
        return {"verdict": NO_REFERENCE, "score": None, "slices": hist.n}
    out: dict = {"slices": hist.n, "reference_slices": reference["n"], "alpha": ALPHA, "min_effect": MIN_EFFECT,
                 "rule": f"shifted when the KS distance of any of {list(DECIDING)} exceeds its critical value at "
                         f"alpha={ALPHA} and {MIN_EFFECT}; judged from {MIN_SLICES} slices"}
    stats = {}
    for k in STATS:
        ks = ks_distance(reference["stats"][k]["counts"], hist.counts[k])
        crit = critical(reference["n"], hist.n) if hist.n else float("nan")
        stats[k] = {"ks": round(ks, 4) if ks == ks else None, "critical": round(crit, 4) if crit == crit else None,
                    "shifted": bool(k in DECIDING and ks == ks and ks > crit and ks > MIN_EFFECT),
                    "decides": k in DECIDING}
    out["stats"] = stats
    scores = [v["ks"] for k, v in stats.items() if v["ks"] is not None and k in DECIDING]
    out["score"] = round(max(scores), 4) if scores else None
    np_ = sum(hist.probability)
    if np_ and reference["probability"]["n"]:
        ks = ks_distance(reference["probability"]["counts"], hist.probability)
        flagged_ref = sum(reference["probability"]["counts"][PROBABILITY_BINS // 2:]) / reference["probability"]["n"]
        out["prediction_shift"] = {"ks": round(ks, 4), "critical": round(critical(reference["probability"]["n"], np_), 4),
                                   "note": "informational: prevalence differs between archives; never part of the verdict",
                                   "reference_share_above_0.5": round(flagged_ref, 4),
                                   "share_above_0.5": round(sum(hist.probability[PROBABILITY_BINS // 2:]) / np_, 4)}
    if hist.n < MIN_SLICES:
        out["verdict"] = TOO_FEW
    else:
        out["verdict"] = SHIFTED if any(v["shifted"] for v in stats.values()) else IN_RANGE
    out["shifted_stats"] = [k for k, v in stats.items() if v["shifted"]]
    return out


__all__ = ["STATS", "DECIDING", "Histograms", "slice_stats", "compare", "reference_problems", "ks_distance", "critical",
           "IN_RANGE", "SHIFTED", "TOO_FEW", "NO_REFERENCE", "REFERENCE_VERSION"]
