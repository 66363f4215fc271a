"""covidct-evaluate: a hospital's local validation of a model on its own labelled slices.

The labelled folders are screened by the engine itself (``pipeline.run``: the same decoding,
preprocessing and batching as covidct-batch), so the figures are those screening will give.
Then: ROC AUC with DeLong's 95% interval, sensitivity and specificity at the model's stored
threshold with Wilson intervals, the confusion matrix, calibration (expected calibration error
and a reliability diagram), the ROC curve, and the threshold that would reach the target
sensitivity on this data. Files that cannot be read are counted and listed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import write_atomic
from .contract import DISCLAIMER, Contract
from .labels import resolve_classes
from .metrics import calibration, confusion, delong_ci, operating_threshold, roc_curve, wilson
from .reasons import LOCALIZER, NOT_CT_IMAGE
from .rows import Status

log = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation.json"

#: --calibrate refuses fewer readable slices than this in either class. With 20 positives the
#: threshold for 0.95 sensitivity sits at the lowest positive but one; below that it is set by one or
#: two slices and a Wilson interval on sensitivity spans more than 0.25.
MIN_CALIBRATION_SLICES = 20
#: --calibrate refuses a set in which the preprocessing finds no body or no lung fields in more than
#: this share of slices: it does not read as lung CT.
MAX_UNFRAMED_SHARE = 0.2


class CalibrationRefused(RuntimeError):
    """The labelled set cannot set a threshold with meaning; nothing was written."""


@dataclass(frozen=True)
class EvaluateConfig:
    model: Path
    data_dir: Path
    out: Path
    positive: str | None = None
    target_sensitivity: float | None = None   # None: the model's own target (0.95 when it has none)
    num_cpus: int | None = None
    batch_size: int = 32
    address: str | None = None
    device: str = "auto"
    progress: bool = True
    calibrate: bool = False                   # write a copy of the model with a threshold set on this data
    calibrated_out: Path | None = None        # default: OUT/<model name>.calibrated.onnx


def _at_threshold(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    c = confusion(y, p, threshold)
    npos, nneg = c["tp"] + c["fn"], c["tn"] + c["fp"]
    return {"threshold": float(threshold), "confusion": c,
            "sensitivity": c["tp"] / npos if npos else float("nan"), "sensitivity_ci95": list(wilson(c["tp"], npos)),
            "specificity": c["tn"] / nneg if nneg else float("nan"), "specificity_ci95": list(wilson(c["tn"], nneg))}


def figures(y: np.ndarray, p: np.ndarray, threshold: float, target_sensitivity: float) -> dict:
    """Every figure of the evaluation from labels (1 positive) and probabilities."""
    y = np.asarray(y).astype(np.int64)
    p = np.asarray(p, dtype=np.float64)
    auc, lo, hi = delong_ci(y, p)
    out = {"n": int(len(y)), "positives": int(y.sum()), "negatives": int((1 - y).sum()),
           "roc_auc": auc, "roc_auc_ci95": [lo, hi], "roc_auc_ci_method": "DeLong",
           "at_stored_threshold": _at_threshold(y, p, threshold), "calibration": calibration(y, p)}
    if 0 < y.sum() < len(y):
        local = operating_threshold(y, p, target_sensitivity)
        out["threshold_for_target"] = {"target_sensitivity": target_sensitivity, **_at_threshold(y, p, local)}
    fpr, tpr, thr = roc_curve(y, p)
    out["roc_curve"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(),
                        "thresholds": [None if math.isinf(t) else float(t) for t in thr]}
    return out


def _plots(fig: dict, contract: Contract, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roc = fig["roc_curve"]
    f, ax = plt.subplots(figsize=(4.8, 4.5))
    ax.plot(roc["fpr"], roc["tpr"], lw=2, label=f"AUC {fig['roc_auc']:.3f} "
                                                f"[{fig['roc_auc_ci95'][0]:.3f}, {fig['roc_auc_ci95'][1]:.3f}]")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    at = fig["at_stored_threshold"]
    ax.plot(1 - at["specificity"], at["sensitivity"], "o", c="C3", label=f"stored threshold {at['threshold']:.3f}")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC, n={fig['n']} ({contract.positive_class} {fig['positives']})")
    ax.legend(loc="lower right", fontsize=8)
    f.tight_layout()
    f.savefig(out / "roc.png", dpi=100)
    plt.close(f)

    bins = [b for b in fig["calibration"]["bins"] if b["n"]]
    f, ax = plt.subplots(figsize=(4.8, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfectly calibrated")
    ax.plot([b["mean_probability"] for b in bins], [b["positive_fraction"] for b in bins], "o-", label="this data")
    for b in bins:
        ax.annotate(str(b["n"]), (b["mean_probability"], b["positive_fraction"]), fontsize=7,
                    xytext=(3, -9), textcoords="offset points")
    ax.set_xlabel("mean predicted probability (bin)")
    ax.set_ylabel(f"fraction {contract.positive_class}")
    ax.set_title(f"reliability, ECE {fig['calibration']['ece']:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    f.tight_layout()
    f.savefig(out / "reliability.png", dpi=100)
    plt.close(f)


def evaluate(cfg: EvaluateConfig) -> dict:
    """Screen the labelled folders through the engine and compute the figures; writes ``cfg.out``."""
    from .pipeline import RunError, ScreenConfig, check_model, run

    contract = check_model(cfg.model)  # a bad model fails before any work
    classes = resolve_classes(cfg.data_dir, cfg.positive)
    if cfg.calibrate:
        _calibration_prechecks(cfg, classes)
    if set(classes) != set(contract.class_names):
        log.warning("class folders %s differ from the model's classes %s: %r is read as %r",
                    list(classes), list(contract.class_names), classes[1], contract.positive_class)
    folders = [os.path.abspath(Path(cfg.data_dir) / c) for c in classes]
    out = Path(cfg.out)
    screen = out / "screen"
    out.mkdir(parents=True, exist_ok=True)  # OUT (its plots, its calibrated model) is never input
    result = run(ScreenConfig(inputs=tuple(folders), model=cfg.model, out=screen, overwrite=True, exclude=(str(out),),
                              batch_size=cfg.batch_size, num_cpus=cfg.num_cpus, address=cfg.address,
                              device=cfg.device, progress=cfg.progress))
    import pyarrow.dataset as pads

    from .studies import utf8_path
    with utf8_path(screen / "predictions") as preds:  # pyarrow takes UTF-8 paths only
        table = pads.dataset(preds, format="parquet").to_table(
            columns=["path", "status", "reason", "message", "probability", "framing"])
    rows = table.to_pylist()
    labels, probs, unreadable, skipped, unframed = [], [], [], [], 0
    for r in rows:
        cls = next((k for k, f in enumerate(folders) if r["path"].startswith(f + os.sep)), None)
        if cls is None:  # cannot happen for paths under the two folders; never guess a label
            raise RunError(f"row outside the class folders: {r['path']}")
        if r["status"] == Status.OK:
            labels.append(cls)
            probs.append(r["probability"])
            unframed += r["framing"] is not None
        elif r["status"] == Status.ERROR:
            unreadable.append({"path": r["path"], "class": classes[cls], "reason": r["reason"], "message": r["message"]})
        else:
            skipped.append({"path": r["path"], "class": classes[cls], "reason": r["reason"]})
    y, p = np.asarray(labels), np.asarray(probs, dtype=np.float64)
    if len(set(labels)) < 2:
        raise RunError(f"evaluation needs readable images of both classes; got {len(labels)} of "
                       f"{sorted({classes[k] for k in labels})}")
    target = cfg.target_sensitivity or contract.target_sensitivity or 0.95
    fig = figures(y, p, contract.threshold, target)
    report = {
        "disclaimer": DISCLAIMER,
        "model": {"path": str(cfg.model), "sha256": result.run["model"]["sha256"], "threshold": contract.threshold,
                  "training_metrics": contract.metrics},
        "data_dir": str(cfg.data_dir), "classes": {"negative": classes[0], "positive": classes[1]},
        "files": {"ok": len(labels), "unreadable": len(unreadable), "skipped": len(skipped)},
        "unreadable": unreadable, "skipped": skipped, **fig,
        "screen": {"run_id": result.run["run_id"], "images_per_s": result.run["images_per_s"],
                   "provider": result.run["execution_providers"]},
        "shift": result.run.get("shift"),
        "unframed_share": unframed / len(labels),
    }
    if cfg.calibrate:
        try:
            report["threshold_calibration"] = calibrate(cfg, contract, result.run["model"]["sha256"], y, p, target,
                                                        report)
        except CalibrationRefused as e:
            report["threshold_calibration"] = {"refused": str(e)}
    write_atomic(out / EVALUATION_FILE, json.dumps(report, indent=2))
    _plots(fig, contract, out)
    if "refused" in report.get("threshold_calibration", {}):
        raise CalibrationRefused(report["threshold_calibration"]["refused"] + f" (the evaluation itself is in {out})")
    return report


def calibrated_path(cfg: EvaluateConfig) -> Path:
    return Path(cfg.calibrated_out or Path(cfg.out) / f"{Path(cfg.model).stem}.calibrated.onnx")


def _calibration_prechecks(cfg: EvaluateConfig, classes: tuple[str, str]) -> None:
    """Refusals that need no screening: the output would replace the model, or a class is too small."""
    dest = calibrated_path(cfg)
    if dest.resolve() == Path(cfg.model).resolve():
        raise CalibrationRefused(f"--calibrated-out {dest} is the model itself: the original is never overwritten")
    for name in classes:
        n = sum(1 for f in (Path(cfg.data_dir) / name).rglob("*") if f.is_file())
        if n < MIN_CALIBRATION_SLICES:
            raise CalibrationRefused(
                f"class folder {name!r} holds {n} file(s); a threshold needs at least {MIN_CALIBRATION_SLICES} "
                f"readable slices of each class to mean anything (with fewer, one slice moves it)")


def calibrate(cfg: EvaluateConfig, contract: Contract, model_sha: str, y: np.ndarray, p: np.ndarray,
              target: float, report: dict) -> dict:
    """Choose the threshold reaching ``target`` sensitivity on (y, p) with the highest specificity and
    write a copy of the model whose contract carries it and its provenance. Refuses (raises
    CalibrationRefused, writes nothing) when the set is too small or does not read as lung CT."""
    import dataclasses
    import datetime as dt

    import onnx

    from . import __version__
    from .contract import embed_contract, read_contract, save_atomic

    npos, nneg = int(y.sum()), int(len(y) - y.sum())
    if min(npos, nneg) < MIN_CALIBRATION_SLICES:
        raise CalibrationRefused(f"{npos} positive and {nneg} negative slices were readable; --calibrate needs at "
                                 f"least {MIN_CALIBRATION_SLICES} of each")
    skipped_not_ct = sum(1 for s in report["skipped"] if s["reason"] in (NOT_CT_IMAGE, LOCALIZER))
    if skipped_not_ct > len(y):
        raise CalibrationRefused(f"{skipped_not_ct} DICOM objects are not CT slices against {len(y)} that are: "
                                 "this set reads as a different modality")
    if report["unframed_share"] > MAX_UNFRAMED_SHARE:
        raise CalibrationRefused(f"in {report['unframed_share']:.0%} of the slices no body or no lung fields were "
                                 f"found (more than {MAX_UNFRAMED_SHARE:.0%}): this set does not read as lung CT")
    new = operating_threshold(y, p, target)
    provenance = {
        "tool": "covidct-evaluate --calibrate", "project_version": __version__,
        "date": dt.datetime.now(dt.timezone.utc).date().isoformat(),
        "data": {"n": int(len(y)), "positives": npos, "negatives": nneg},
        "target_sensitivity": float(target), "previous_threshold": float(contract.threshold),
        "at_previous": report["at_stored_threshold"], "at_new": _at_threshold(y, p, new),
        "roc_auc": report["roc_auc"], "roc_auc_ci95": report["roc_auc_ci95"],
        "original_sha256": model_sha, "previous_calibration": contract.calibration,
    }
    new_contract = dataclasses.replace(contract, threshold=float(new), calibration=provenance)
    proto = onnx.load(str(cfg.model))
    embed_contract(proto, new_contract)
    dest = calibrated_path(cfg)
    save_atomic(proto.SerializeToString(), dest)
    back = read_contract(dest)
    if back.threshold != new_contract.threshold or back.calibration != provenance:
        dest.unlink(missing_ok=True)
        raise CalibrationRefused(f"the calibrated model written to {dest} did not read back as written")
    return {"model": str(dest), "threshold": float(new), "provenance": provenance}


def _ci(v) -> str:
    return f"[{v[0]:.3f}, {v[1]:.3f}]"


def format_report(r: dict, out: Path) -> str:
    at = r["at_stored_threshold"]
    c = at["confusion"]
    lines = ["", f"covidct-evaluate: {r['n']} slices ({r['classes']['positive']} {r['positives']}, "
                 f"{r['classes']['negative']} {r['negatives']})",
             f"  ROC AUC {r['roc_auc']:.3f} {_ci(r['roc_auc_ci95'])} (95%, DeLong)",
             f"  at the stored threshold {at['threshold']:.4f}: sensitivity {at['sensitivity']:.3f} "
             f"{_ci(at['sensitivity_ci95'])}, specificity {at['specificity']:.3f} {_ci(at['specificity_ci95'])} (Wilson)",
             f"  confusion: TP {c['tp']}  FN {c['fn']}  TN {c['tn']}  FP {c['fp']}",
             f"  calibration: expected calibration error {r['calibration']['ece']:.3f} (10 bins)"]
    t = r.get("threshold_for_target")
    if t:
        lines.append(f"  on this data, threshold {t['threshold']:.4f} reaches sensitivity {t['sensitivity']:.3f} "
                     f"(target {t['target_sensitivity']}) with specificity {t['specificity']:.3f} "
                     f"{_ci(t['specificity_ci95'])}")
    f = r["files"]
    lines.append(f"  files: {f['ok']} ok, {f['unreadable']} unreadable, {f['skipped']} skipped")
    for u in r["unreadable"][:10]:
        lines.append(f"    unreadable: {u['path']} ({u['reason']})")
    if len(r["unreadable"]) > 10:
        lines.append(f"    ... {len(r['unreadable']) - 10} more in {EVALUATION_FILE}")
    sh = r.get("shift")
    if sh:
        lines.append(f"  shift alarm: {sh['verdict']}" + (f" (score {sh['score']:.3f})" if sh.get("score") is not None
                                                          else ""))
    cal = r.get("threshold_calibration")
    if cal and "model" in cal:
        a, b = cal["provenance"]["at_previous"], cal["provenance"]["at_new"]
        lines.append(f"  calibrated: threshold {cal['provenance']['previous_threshold']:.4f} -> {cal['threshold']:.4f}; "
                     f"sensitivity {a['sensitivity']:.3f} -> {b['sensitivity']:.3f} {_ci(b['sensitivity_ci95'])}, "
                     f"specificity {a['specificity']:.3f} -> {b['specificity']:.3f} {_ci(b['specificity_ci95'])}")
        lines.append(f"  wrote {cal['model']} (the original model is unchanged)")
    lines.append(f"  written: {out / EVALUATION_FILE}, {out / 'roc.png'}, {out / 'reliability.png'}")
    lines.append(DISCLAIMER)
    return "\n".join(lines)
