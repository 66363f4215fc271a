"""covidct-train: fit the seeds' CNN, pick an operating threshold, write the run directory."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine import __version__
from engine.contract import DEFAULT_INTERPOLATION, LUNG_WINDOW, Contract, sha256_file

from . import data as data_mod
from .metrics import operating_threshold, screening_metrics

log = logging.getLogger(__name__)

#: Files a run directory holds; export reads them by these names.
MODEL_FILE = "model.keras"
CONTRACT_FILE = "contract.json"
METRICS_FILE = "metrics.json"
SPLIT_FILE = "split.csv"
HISTORY_FILE = "history.json"


@dataclass(frozen=True)
class TrainConfig:
    data_dir: Path
    out: Path
    epochs: int = 30
    image_size: tuple[int, int] = (256, 256)
    batch_size: int = 32
    seed: int = 42
    target_sensitivity: float = 0.95
    positive: str | None = None
    groups: str | None = None
    patience: int = 6
    interpolation: str = DEFAULT_INTERPOLATION
    window: dict = field(default_factory=lambda: dict(LUNG_WINDOW))

    def __post_init__(self):
        if not Path(self.data_dir).is_dir():
            raise ValueError(f"data_dir {self.data_dir} is not a directory (expected one sub-folder per class)")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, e.g. 30; got {self.epochs}")
        if not 0 < self.target_sensitivity <= 1:
            raise ValueError(f"target_sensitivity must be in (0, 1], e.g. 0.95; got {self.target_sensitivity}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, e.g. 32; got {self.batch_size}")


def train(cfg: TrainConfig) -> dict:
    """Train and evaluate; returns the test metrics written to ``metrics.json``."""
    import keras

    t0 = time.time()
    out = Path(cfg.out)
    classes = data_mod.resolve_classes(cfg.data_dir, cfg.positive)  # before out exists: it may sit inside
    out.mkdir(parents=True, exist_ok=True)
    log.info("classes: negative=%r positive=%r", *classes)
    ds = data_mod.load_images(cfg.data_dir, classes, cfg.image_size, cfg.interpolation)
    assignment = data_mod.split(ds.paths, ds.labels, ds.sha256, cfg.seed, cfg.groups)
    data_mod.write_split(out / SPLIT_FILE, ds, assignment, classes)
    sizes = {name: int((assignment == i).sum()) for i, name in enumerate(data_mod.SPLITS)}
    log.info("split sizes %s (%d unreadable skipped)", sizes, len(ds.unreadable))
    tr, va, te = (assignment == 0), (assignment == 1), (assignment == 2)
    for name, mask in zip(data_mod.SPLITS, (tr, va, te)):
        if len(set(ds.labels[mask].tolist())) < 2:
            raise data_mod.DataError(f"the {name} split lacks one class: each class needs at least ~10 images")

    from .model import build_model
    model = build_model(cfg.image_size, cfg.seed)
    y = ds.labels.astype(np.float32)
    counts = np.bincount(ds.labels[tr], minlength=2)
    class_weight = {c: float(counts.sum() / (2 * counts[c])) for c in (0, 1)}
    history = model.fit(
        ds.images[tr], y[tr], validation_data=(ds.images[va], y[va]),
        epochs=cfg.epochs, batch_size=cfg.batch_size, class_weight=class_weight, verbose=2, shuffle=True,
        callbacks=[keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=cfg.patience,
                                                 restore_best_weights=True)],
    )
    model.save(out / MODEL_FILE)

    p_val = model.predict(ds.images[va], batch_size=cfg.batch_size, verbose=0)[:, 0]
    threshold = operating_threshold(ds.labels[va], p_val, cfg.target_sensitivity)
    p_test = model.predict(ds.images[te], batch_size=cfg.batch_size, verbose=0)[:, 0]
    metrics = screening_metrics(ds.labels[te], p_test, threshold)
    metrics.update({
        "split": "test", "class_names": list(classes), "positive_class": classes[1],
        "target_sensitivity": cfg.target_sensitivity, "split_sizes": sizes,
        "unreadable": [{"path": p, "reason": r} for p, r in ds.unreadable],
        "epochs_run": len(history.history["loss"]), "train_seconds": round(time.time() - t0, 1),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
    })
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    (out / HISTORY_FILE).write_text(json.dumps({k: [float(v) for v in vs] for k, vs in history.history.items()},
                                               indent=2))
    contract = Contract(
        image_size=tuple(cfg.image_size), class_names=classes, positive_class=classes[1], threshold=threshold,
        interpolation=cfg.interpolation, window=dict(cfg.window),
        metrics={k: metrics[k] for k in ("roc_auc", "sensitivity", "specificity", "accuracy", "n", "split")},
        source_sha256=sha256_file(out / MODEL_FILE), project_version=__version__)
    (out / CONTRACT_FILE).write_text(contract.to_json())
    _plot(history.history, metrics, classes, out)
    return metrics


def _plot(history: dict, metrics: dict, classes: tuple[str, str], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("accuracy", "loss")):
        ax.plot(history[key], label="train")
        ax.plot(history["val_" + key], label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)

    c = metrics["confusion"]
    cm = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="black", fontsize=14)
    ax.set_xticks([0, 1], [f"pred {classes[0]}", f"pred {classes[1]}"])
    ax.set_yticks([0, 1], [f"true {classes[0]}", f"true {classes[1]}"])
    ax.set_title(f"test split, threshold {metrics['threshold']:.3f}")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=100)
    plt.close(fig)


def summary(metrics: dict) -> str:
    lo, hi = metrics["sensitivity_ci95"]
    slo, shi = metrics["specificity_ci95"]
    return (f"test split (n={metrics['n']}): AUC {metrics['roc_auc']:.3f}  accuracy {metrics['accuracy']:.3f}  "
            f"sensitivity {metrics['sensitivity']:.3f} [{lo:.3f}, {hi:.3f}]  "
            f"specificity {metrics['specificity']:.3f} [{slo:.3f}, {shi:.3f}]  at threshold {metrics['threshold']:.4f}")
