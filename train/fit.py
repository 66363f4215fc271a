"""covidct-train: fit the classifier, pick an operating threshold, write the run directory."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine import __version__
from engine.contract import DEFAULT_INTERPOLATION, LUNG_WINDOW, Contract, sha256_file
from engine.metrics import operating_threshold, screening_metrics
from engine.preprocess import LUNG_CROP, RESIZE, default_spec

from . import data as data_mod
from .model import ARCHITECTURES

log = logging.getLogger(__name__)

#: Files a run directory holds; export reads them by these names.
MODEL_FILE = "model.keras"
CONTRACT_FILE = "contract.json"
METRICS_FILE = "metrics.json"
SPLIT_FILE = "split.csv"
HISTORY_FILE = "history.json"

#: Per-architecture defaults: what ``None`` in TrainConfig means.
ARCH_DEFAULTS = {
    "compact": {"image_size": (192, 192), "epochs": 40, "learning_rate": 2e-3, "site_augmentation": True},
    "seed": {"image_size": (256, 256), "epochs": 30, "learning_rate": 1e-4, "site_augmentation": False},
}
PREPROCESSING = (LUNG_CROP, RESIZE)


@dataclass(frozen=True)
class TrainConfig:
    data_dir: Path
    out: Path
    arch: str = "compact"
    epochs: int | None = None                 # None: the architecture's default
    image_size: tuple[int, int] | None = None
    learning_rate: float | None = None
    site_augmentation: bool | None = None
    preprocessing: str = LUNG_CROP            # "lung-crop" (engine.preprocess) or "resize" (schema 1)
    batch_size: int = 32
    seed: int = 42
    target_sensitivity: float = 0.95
    positive: str | None = None
    groups: str | None = None
    patience: int = 6                         # seed only: early stopping on validation AUC
    weight_decay: float = 1e-4
    interpolation: str = DEFAULT_INTERPOLATION
    window: dict = field(default_factory=lambda: dict(LUNG_WINDOW))

    def __post_init__(self):
        if not Path(self.data_dir).is_dir():
            raise ValueError(f"data_dir {self.data_dir} is not a directory (expected one sub-folder per class)")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {list(ARCHITECTURES)}, e.g. 'compact'; got {self.arch!r}")
        if self.preprocessing not in PREPROCESSING:
            raise ValueError(f"preprocessing must be one of {list(PREPROCESSING)}, e.g. {LUNG_CROP!r}; "
                             f"got {self.preprocessing!r}")
        for name, value in ARCH_DEFAULTS[self.arch].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "image_size", tuple(self.image_size))
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, e.g. 40; got {self.epochs}")
        if not 0 < self.target_sensitivity <= 1:
            raise ValueError(f"target_sensitivity must be in (0, 1], e.g. 0.95; got {self.target_sensitivity}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, e.g. 32; got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, e.g. 2e-3; got {self.learning_rate}")

    @property
    def preprocessing_spec(self) -> dict:
        return default_spec() if self.preprocessing == LUNG_CROP else {"method": RESIZE}


class SiteSequence:
    """Batches for ``model.fit``: each decoded slice through site augmentation, the contract's
    preprocessing (the engine's ``resize``) and jitter; a new draw every epoch."""

    def __new__(cls, *args, **kwargs):  # a keras.utils.PyDataset, made lazily (no TensorFlow at import)
        import keras

        class _Seq(keras.utils.PyDataset):
            def __init__(self, greys, labels, weights, cfg: TrainConfig, spec: dict, augment_site: bool):
                super().__init__()
                self.greys, self.labels, self.weights = greys, labels.astype(np.float32), weights
                self.cfg, self.spec, self.augment_site = cfg, spec, augment_site
                self.rng = np.random.default_rng(cfg.seed)
                self.order = self.rng.permutation(len(labels))

            def __len__(self):
                return int(np.ceil(len(self.labels) / self.cfg.batch_size))

            def on_epoch_end(self):
                self.order = self.rng.permutation(len(self.labels))

            def __getitem__(self, k):
                from engine.decode import resize

                from .augment import jitter, site
                idx = self.order[k * self.cfg.batch_size:(k + 1) * self.cfg.batch_size]
                batch = []
                for i in idx:
                    g = self.greys[i]
                    if self.augment_site:
                        g = site(g, self.rng)
                    x = resize(g, self.cfg.image_size, self.cfg.interpolation, self.spec)
                    batch.append(jitter(x, self.rng))
                x = np.stack(batch)[..., None].astype(np.float32)
                return x, self.labels[idx], self.weights[idx]

        return _Seq(*args, **kwargs)


def _fit_compact(model, cfg: TrainConfig, ds, tr, va) -> dict:
    """AdamW with a warm-up and cosine decay over a fixed number of epochs; the final weights are kept.

    No early stopping: its only signal would be the validation split (62 images on the shared set),
    whose AUC moves by +-0.05 from one epoch to the next. Validation AUC is still recorded.
    """
    import keras

    from engine.metrics import roc_auc

    counts = np.bincount(ds.labels[tr], minlength=2)
    class_w = counts.sum() / (2.0 * np.maximum(counts, 1))
    seq = SiteSequence([ds.grey[i] for i in np.nonzero(tr)[0]], ds.labels[tr], class_w[ds.labels[tr]].astype(np.float32),
                       cfg, cfg.preprocessing_spec, cfg.site_augmentation)
    steps = len(seq) * cfg.epochs
    schedule = keras.optimizers.schedules.CosineDecay(0.0, steps, alpha=0.01, warmup_target=cfg.learning_rate,
                                                      warmup_steps=max(1, steps // 20))
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay),
                  loss="binary_crossentropy", metrics=["accuracy"])
    history: dict[str, list[float]] = {"loss": [], "accuracy": [], "val_auc": [], "val_loss": []}
    xv, yv = ds.images[va], ds.labels[va]
    for epoch in range(cfg.epochs):
        h = model.fit(seq, epochs=1, verbose=0)
        pv = model.predict(xv, batch_size=64, verbose=0)[:, 0]
        history["loss"].append(float(h.history["loss"][-1]))
        history["accuracy"].append(float(h.history["accuracy"][-1]))
        history["val_auc"].append(roc_auc(yv, pv))
        history["val_loss"].append(float(keras.losses.binary_crossentropy(yv.astype(np.float32), pv).numpy()))
        log.info("epoch %d/%d: loss %.4f, validation AUC %.3f", epoch + 1, cfg.epochs, history["loss"][-1],
                 history["val_auc"][-1])
    return history


def _fit_seed(model, cfg: TrainConfig, ds, tr, va) -> dict:
    """The seeds' recipe: Adam 1e-4 (compiled in the model), early stopping on validation AUC."""
    import keras

    y = ds.labels.astype(np.float32)
    counts = np.bincount(ds.labels[tr], minlength=2)
    class_weight = {c: float(counts.sum() / (2 * counts[c])) for c in (0, 1)}
    if cfg.learning_rate != ARCH_DEFAULTS["seed"]["learning_rate"]:
        model.optimizer.learning_rate = cfg.learning_rate
    history = model.fit(
        ds.images[tr], y[tr], validation_data=(ds.images[va], y[va]),
        epochs=cfg.epochs, batch_size=cfg.batch_size, class_weight=class_weight, verbose=2, shuffle=True,
        callbacks=[keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=cfg.patience,
                                                 restore_best_weights=True)],
    )
    return {k: [float(v) for v in vs] for k, vs in history.history.items()}


def train(cfg: TrainConfig) -> dict:
    """Train and evaluate; returns the test metrics written to ``metrics.json``."""
    t0 = time.time()
    out = Path(cfg.out)
    classes = data_mod.resolve_classes(cfg.data_dir, cfg.positive)  # before out exists: it may sit inside
    out.mkdir(parents=True, exist_ok=True)
    log.info("classes: negative=%r positive=%r", *classes)
    spec = cfg.preprocessing_spec
    ds = data_mod.load_images(cfg.data_dir, classes, cfg.image_size, cfg.interpolation, window=cfg.window,
                              preprocessing=spec, keep_grey=cfg.arch == "compact")
    assignment = data_mod.split(ds.paths, ds.labels, ds.sha256, cfg.seed, cfg.groups)
    data_mod.write_split(out / SPLIT_FILE, ds, assignment, classes)
    sizes = {name: int((assignment == i).sum()) for i, name in enumerate(data_mod.SPLITS)}
    log.info("split sizes %s (%d unreadable skipped)", sizes, len(ds.unreadable))
    tr, va, te = (assignment == 0), (assignment == 1), (assignment == 2)
    for name, mask in zip(data_mod.SPLITS, (tr, va, te)):
        if len(set(ds.labels[mask].tolist())) < 2:
            raise data_mod.DataError(f"the {name} split lacks one class: each class needs at least ~10 images")

    from .model import build_model
    model = build_model(cfg.image_size, cfg.seed, cfg.arch)
    history = (_fit_compact if cfg.arch == "compact" else _fit_seed)(model, cfg, ds, tr, va)
    model.save(out / MODEL_FILE)

    p_val = model.predict(ds.images[va], batch_size=cfg.batch_size, verbose=0)[:, 0]
    threshold = operating_threshold(ds.labels[va], p_val, cfg.target_sensitivity)
    p_test = model.predict(ds.images[te], batch_size=cfg.batch_size, verbose=0)[:, 0]
    metrics = screening_metrics(ds.labels[te], p_test, threshold)
    metrics.update({
        "split": "test", "class_names": list(classes), "positive_class": classes[1],
        "target_sensitivity": cfg.target_sensitivity, "split_sizes": sizes,
        "validation": screening_metrics(ds.labels[va], p_val, threshold),
        "unreadable": [{"path": p, "reason": r} for p, r in ds.unreadable],
        "epochs_run": len(history["loss"]), "train_seconds": round(time.time() - t0, 1),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
    })
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=2))
    contract = Contract(
        image_size=tuple(cfg.image_size), class_names=classes, positive_class=classes[1], threshold=threshold,
        interpolation=cfg.interpolation, window=dict(cfg.window), preprocessing=spec,
        target_sensitivity=cfg.target_sensitivity, architecture=cfg.arch,
        metrics={k: metrics[k] for k in ("roc_auc", "sensitivity", "specificity", "accuracy", "n", "split")},
        source_sha256=sha256_file(out / MODEL_FILE), project_version=__version__)
    (out / CONTRACT_FILE).write_text(contract.to_json())
    _plot(history, metrics, classes, out)
    return metrics


def _plot(history: dict, metrics: dict, classes: tuple[str, str], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "auc")):
        if key in history:
            ax.plot(history[key], label="train")
        if "val_" + key in history:
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
