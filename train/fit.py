"""covidct-train: fit the classifier, pick an operating threshold, write the run directory."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from covidct.engine import __version__
from covidct.engine.contract import DEFAULT_INTERPOLATION, LUNG_WINDOW, Contract, sha256_file
from covidct.engine.metrics import operating_threshold, screening_metrics
from covidct.engine.preprocess import LUNG_CROP, RESIZE, default_spec

from . import data as data_mod
from . import sites as sites_mod
from .model import ARCHITECTURES
from .sites import Site, parse_sites

log = logging.getLogger(__name__)

#: Files a run directory holds; export reads them by these names.
MODEL_FILE = "model.keras"
CONTRACT_FILE = "contract.json"
METRICS_FILE = "metrics.json"
SPLIT_FILE = "split.csv"
HISTORY_FILE = "history.json"
#: Leave-one-site-out runs are run directories of their own under this folder, one per site left out.
LOSO_DIR = "leave-one-site-out"

#: Per-architecture defaults: what ``None`` in TrainConfig means.
ARCH_DEFAULTS = {
    "compact": {"image_size": (192, 192), "epochs": 120, "learning_rate": 2e-3, "site_augmentation": True},
    "seed": {"image_size": (256, 256), "epochs": 30, "learning_rate": 1e-4, "site_augmentation": False},
}
PREPROCESSING = (LUNG_CROP, RESIZE)
#: With site augmentation on, the share of training draws that go through it (training and --init); the others
#: are seen as their site exported them. Every draw augmented (1.0) left the compact model under-fitted on two
#: sites (training accuracy 0.67 after 40 epochs, against 0.83 with none).
AUGMENT_SHARE = 0.5
#: With a teacher for a site (``--teacher``), that site's training targets are (1 - DISTILL) * label +
#: DISTILL * the teacher's probability (Hinton et al. 2015, soft targets).
DISTILL = 0.5


@dataclass(frozen=True)
class TrainConfig:
    data_dir: Path | None = None              # one site: the single-folder form of ``sites``
    out: Path | None = None
    arch: str = "compact"
    epochs: int | None = None                 # None: the architecture's default
    image_size: tuple[int, int] | None = None
    learning_rate: float | None = None
    site_augmentation: bool | None = None
    augment_share: float = AUGMENT_SHARE
    mix_style: bool = True                    # compact: MixStyle in training (train.model.MIXSTYLE)
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
    sites: tuple[Site, ...] = ()              # every site (train.sites); from data_dir when empty
    leave_one_site_out: bool = False          # also train one model without each site, scored on it
    site_norm: bool = False                   # compact, 2+ sites: one BatchNorm per site in training
    teachers: tuple[tuple[str, Path], ...] = ()  # (site name, run trained on that site alone): distillation
    distill: float = DISTILL                  # weight of a teacher's probability in its site's targets

    def __post_init__(self):
        if self.out is None:
            raise ValueError("out (the run directory) is required, e.g. out=Path('runs/q')")
        if not self.sites:
            if self.data_dir is None:
                raise ValueError("give data_dir or sites, e.g. data_dir=Path('data/site-a')")
            if not Path(self.data_dir).is_dir():
                raise ValueError(f"data_dir {self.data_dir} is not a directory (expected one sub-folder per class)")
            object.__setattr__(self, "sites", parse_sites((Path(self.data_dir),)))
        object.__setattr__(self, "sites", tuple(self.sites))
        object.__setattr__(self, "data_dir", Path(self.sites[0].path))
        if self.leave_one_site_out and len(self.sites) < 2:
            raise ValueError("leave_one_site_out needs at least two sites")
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
        if not 0 <= self.augment_share <= 1:
            raise ValueError(f"augment_share must be in [0, 1], e.g. 0.5; got {self.augment_share}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, e.g. 2e-3; got {self.learning_rate}")
        object.__setattr__(self, "teachers", tuple((str(n), Path(r)) for n, r in self.teachers))
        unknown = sorted({n for n, _ in self.teachers} - {s.name for s in self.sites})
        if unknown:
            raise ValueError(f"teacher for {unknown}: no such site (sites: {[s.name for s in self.sites]})")
        if len({n for n, _ in self.teachers}) != len(self.teachers):
            raise ValueError("one teacher per site")
        if self.teachers and self.arch != "compact":
            raise ValueError("teachers (distillation) are for the compact architecture")
        if not 0 < self.distill <= 0.5:  # above 0.5 a teacher would overrule the label
            raise ValueError(f"distill must be in (0, 0.5], e.g. 0.5; got {self.distill}")

    @property
    def preprocessing_spec(self) -> dict:
        return default_spec() if self.preprocessing == LUNG_CROP else {"method": RESIZE}


class SiteSequence:
    """Batches for ``model.fit``: each decoded slice through site augmentation, the contract's
    preprocessing (the engine's ``resize``) and jitter; a new draw every epoch."""

    def __new__(cls, *args, **kwargs):  # a keras.utils.PyDataset, made lazily (no TensorFlow at import)
        import keras

        class _Seq(keras.utils.PyDataset):
            def __init__(self, greys, labels, weights, cfg: TrainConfig, spec: dict, augment_site: bool,
                         site=None, n_sites: int = 0):
                super().__init__()
                self.n_sites = n_sites  # > 1: the batches carry the one-hot site (site-specific BatchNorm)
                self.greys, self.labels, self.weights = greys, labels.astype(np.float32), weights
                self.cfg, self.spec, self.augment_site = cfg, spec, augment_site
                self.site = np.zeros(len(labels), np.int64) if site is None else np.asarray(site)
                self.rng = np.random.default_rng(cfg.seed)
                self.order = sites_mod.balanced_order(self.site, self.rng)

            def __len__(self):
                return int(np.ceil(len(self.labels) / self.cfg.batch_size))

            def on_epoch_end(self):
                self.order = sites_mod.balanced_order(self.site, self.rng)

            def __getitem__(self, k):
                from covidct.engine.decode import resize

                from .augment import jitter, site
                idx = self.order[k * self.cfg.batch_size:(k + 1) * self.cfg.batch_size]
                batch = []
                for i in idx:
                    g = self.greys[i]
                    if self.augment_site and self.rng.random() < self.cfg.augment_share:
                        g = site(g, self.rng)
                    x = resize(g, self.cfg.image_size, self.cfg.interpolation, self.spec)
                    batch.append(jitter(x, self.rng))
                x = np.stack(batch)[..., None].astype(np.float32)
                if self.n_sites > 1:
                    x = {"image": x, "site": np.eye(self.n_sites, dtype=np.float32)[self.site[idx]]}
                return x, self.labels[idx], self.weights[idx]

        return _Seq(*args, **kwargs)


def _fit_compact(model, cfg: TrainConfig, ds, tr, va, targets: np.ndarray) -> dict:
    """AdamW with a warm-up and cosine decay over a fixed number of epochs; the final weights are kept.

    No early stopping: its only signal would be the validation split (62 images on the shared set),
    whose AUC moves by +-0.05 from one epoch to the next. Validation AUC is still recorded.
    """
    import keras

    from covidct.engine.metrics import roc_auc

    n_sites = len(cfg.sites) if _site_norm(cfg) else 0
    seq = SiteSequence([ds.grey[i] for i in np.nonzero(tr)[0]], targets[tr],
                       sites_mod.sample_weights(ds.site[tr], ds.labels[tr]), cfg, cfg.preprocessing_spec,
                       cfg.site_augmentation, ds.site[tr], n_sites)
    steps = len(seq) * cfg.epochs
    schedule = keras.optimizers.schedules.CosineDecay(0.0, steps, alpha=0.01, warmup_target=cfg.learning_rate,
                                                      warmup_steps=max(1, steps // 20))
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay),
                  loss="binary_crossentropy", metrics=[_label_accuracy() if cfg.teachers else "accuracy"])
    history: dict[str, list[float]] = {"loss": [], "accuracy": [], "val_auc": [], "val_loss": []}
    xv, yv, sv = ds.images[va], ds.labels[va], ds.site[va]
    if n_sites:  # validated with each site's own BatchNorm (the exported model mixes them)
        xv = {"image": xv.astype(np.float32), "site": np.eye(n_sites, dtype=np.float32)[sv]}
    names = [s.name for s in cfg.sites] if len(cfg.sites) > 1 else []
    for epoch in range(cfg.epochs):
        h = model.fit(seq, epochs=1, verbose=0)
        pv = model.predict(xv, batch_size=64, verbose=0)[:, 0]
        history["loss"].append(float(h.history["loss"][-1]))
        history["accuracy"].append(float(h.history["accuracy"][-1]))
        history["val_auc"].append(roc_auc(yv, pv))
        history["val_loss"].append(float(keras.losses.binary_crossentropy(yv.astype(np.float32), pv).numpy()))
        for k, name in enumerate(names):  # every site's own validation AUC: the pooled one hides a site
            history.setdefault(f"val_auc/{name}", []).append(roc_auc(yv[sv == k], pv[sv == k]))
        log.info("epoch %d/%d: loss %.4f, validation AUC %.3f%s", epoch + 1, cfg.epochs, history["loss"][-1],
                 history["val_auc"][-1],
                 "".join(f", {n} {history[f'val_auc/{n}'][-1]:.3f}" for n in names))
    return history


def _label_accuracy():
    """Training accuracy against the labels when the targets are soft (a teacher's): Keras' own compares
    the prediction with the soft target itself, which no prediction equals."""
    from keras import ops

    def accuracy(y_true, y_pred):  # a soft target >= 0.5 is a positive label (distill <= 0.5)
        return ops.mean(ops.cast(ops.equal(y_true >= 0.5, y_pred > 0.5), "float32"))
    return accuracy


def _site_norm(cfg: TrainConfig) -> bool:
    return cfg.site_norm and cfg.arch == "compact" and len(cfg.sites) > 1


def _fit_seed(model, cfg: TrainConfig, ds, tr, va) -> dict:
    """The seeds' recipe: Adam 1e-4 (compiled in the model), early stopping on validation AUC."""
    import keras

    y = ds.labels.astype(np.float32)
    # classes balanced within each site, sites balanced against each other (one site: the class weights)
    site = ds.site[tr]
    weight = sites_mod.sample_weights(site, ds.labels[tr])
    share = np.bincount(site) / len(site)
    weight = (weight / (len(share) * share[site])).astype(np.float32)
    if cfg.learning_rate != ARCH_DEFAULTS["seed"]["learning_rate"]:
        model.optimizer.learning_rate = cfg.learning_rate
    history = model.fit(
        ds.images[tr], y[tr], validation_data=(ds.images[va], y[va]),
        epochs=cfg.epochs, batch_size=cfg.batch_size, sample_weight=weight, verbose=2, shuffle=True,
        callbacks=[keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=cfg.patience,
                                                 restore_best_weights=True)],
    )
    return {k: [float(v) for v in vs] for k, vs in history.history.items()}


def train(cfg: TrainConfig) -> dict:
    """Train and evaluate; returns the test metrics written to ``metrics.json`` (pooled over sites, with
    every site's own figures under ``sites`` and, with ``leave_one_site_out``, that table)."""
    t0 = time.time()
    out = Path(cfg.out)
    sites_mod.site_classes(cfg.sites, cfg.positive)  # before out exists: it may sit inside a site
    spec = cfg.preprocessing_spec
    ds, classes = sites_mod.load_sites(cfg.sites, cfg.positive, image_size=cfg.image_size,
                                       interpolation=cfg.interpolation, window=cfg.window, preprocessing=spec,
                                       keep_grey=cfg.arch == "compact", exclude=out)
    log.info("classes: negative=%r positive=%r", *classes)
    names = tuple(s.name for s in cfg.sites)
    assignment = sites_mod.split_sites(ds, cfg.seed, cfg.groups)
    targets, teachers = distillation_targets(cfg, ds, assignment, names)  # refused before anything is written
    out.mkdir(parents=True, exist_ok=True)
    data_mod.write_split(out / SPLIT_FILE, ds, assignment, classes, names)
    sizes = {name: int((assignment == i).sum()) for i, name in enumerate(data_mod.SPLITS)}
    site_sizes = {n: {split: int(((assignment == i) & (ds.site == k)).sum()) for i, split in enumerate(data_mod.SPLITS)}
                  for k, n in enumerate(names)}
    log.info("split sizes %s (%d unreadable skipped)%s", sizes, len(ds.unreadable),
             f"; per site {site_sizes}" if len(names) > 1 else "")
    tr, va, te = (assignment == 0), (assignment == 1), (assignment == 2)
    for k, site in enumerate(names):
        for name, mask in zip(data_mod.SPLITS, (tr, va, te)):
            if len(set(ds.labels[mask & (ds.site == k)].tolist())) < 2:
                where = f" of site {site!r}" if len(names) > 1 else ""
                raise data_mod.DataError(f"the {name} split{where} lacks one class: "
                                         "each class needs at least ~10 images")

    from .model import build_compact, build_model, merge_site_norms
    if _site_norm(cfg):
        model = build_compact(cfg.image_size, cfg.seed, sites=len(cfg.sites), mixstyle=cfg.mix_style)
        history = _fit_compact(model, cfg, ds, tr, va, targets)
        model = merge_site_norms(model, cfg.image_size, cfg.seed)  # what is exported: no site input
    else:
        model = build_model(cfg.image_size, cfg.seed, cfg.arch, cfg.mix_style)
        history = (_fit_compact(model, cfg, ds, tr, va, targets) if cfg.arch == "compact" else
                   _fit_seed(model, cfg, ds, tr, va))
    model.save(out / MODEL_FILE)

    p_val = model.predict(ds.images[va], batch_size=cfg.batch_size, verbose=0)[:, 0]
    threshold, site_thresholds = sites_mod.threshold_across_sites(ds.site[va], ds.labels[va], p_val,
                                                                  cfg.target_sensitivity, names)
    p_test = model.predict(ds.images[te], batch_size=cfg.batch_size, verbose=0)[:, 0]
    metrics = sites_mod.figures(ds.labels[te], p_test, threshold)
    validation = sites_mod.figures(ds.labels[va], p_val, threshold)
    validation.update({"sites": sites_mod.per_site(ds.site[va], ds.labels[va], p_val, threshold, names),
                       "site_thresholds": site_thresholds})
    metrics.update({
        "split": "test", "class_names": list(classes), "positive_class": classes[1],
        "target_sensitivity": cfg.target_sensitivity, "split_sizes": sizes,
        "sites": sites_mod.per_site(ds.site[te], ds.labels[te], p_test, threshold, names),
        "site_split_sizes": site_sizes,
        "threshold_rule": ("the highest threshold that reaches the target sensitivity on every site's "
                           "validation split" if len(names) > 1 else
                           "the highest threshold that reaches the target sensitivity on the validation split"),
        "validation": validation,
        "unreadable": [{"path": p, "reason": r} for p, r in ds.unreadable],
        "epochs_run": len(history["loss"]), "train_seconds": round(time.time() - t0, 1),
        "teachers": teachers,
        "config": _config_record(cfg),
    })
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=2))
    contract = Contract(
        image_size=tuple(cfg.image_size), class_names=classes, positive_class=classes[1], threshold=threshold,
        interpolation=cfg.interpolation, window=dict(cfg.window), preprocessing=spec,
        target_sensitivity=cfg.target_sensitivity, architecture=cfg.arch,
        metrics=contract_metrics(metrics), source_sha256=sha256_file(out / MODEL_FILE), project_version=__version__)
    if cfg.leave_one_site_out:
        metrics["leave_one_site_out"] = leave_one_site_out(cfg, ds)
        contract = dataclasses.replace(contract, metrics=contract_metrics(metrics))
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    (out / CONTRACT_FILE).write_text(contract.to_json())
    _plot(history, metrics, classes, out)
    return metrics


#: The figures of a set that the contract carries (the rest stays in metrics.json).
FIGURE_KEYS = ("n", "roc_auc", "roc_auc_ci95", "sensitivity", "sensitivity_ci95", "specificity",
               "specificity_ci95")


def contract_metrics(metrics: dict) -> dict:
    """What the contract says of training's figures: pooled test figures, every site's, and the
    leave-one-site-out table where there is one."""
    out = {k: metrics[k] for k in ("roc_auc", "sensitivity", "specificity", "accuracy", "n", "split") if k in metrics}
    if "roc_auc_ci95" in metrics:
        out["roc_auc_ci95"] = metrics["roc_auc_ci95"]
    if "sites" in metrics:
        out["sites"] = {n: {k: m[k] for k in FIGURE_KEYS} for n, m in metrics["sites"].items()}
    if "leave_one_site_out" in metrics:
        out["leave_one_site_out"] = [{"left_out": r["left_out"], "trained_on": r["trained_on"],
                                      **{k: r[k] for k in FIGURE_KEYS}} for r in metrics["leave_one_site_out"]]
    return out


def _config_record(cfg: TrainConfig) -> dict:
    rec = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k not in ("sites", "teachers")}
    rec["sites"] = [{"name": s.name, "path": str(s.path)} for s in cfg.sites]
    rec["teachers"] = [{"site": n, "run": str(r)} for n, r in cfg.teachers]
    return rec


def distillation_targets(cfg: TrainConfig, ds, assignment: np.ndarray, names: tuple[str, ...]
                         ) -> tuple[np.ndarray, list[dict]]:
    """Training targets (the labels, softened by every site's teacher) and what each teacher was.

    A teacher is a covidct-train run on that site alone, with the same preprocessing and input size, whose
    split put every slice of the site where this run puts it (same seed, same files): otherwise its
    probabilities on this run's training slices would carry what it learnt from this run's validation or
    test slices, and those figures would no longer be honest. Refused, before any training, if not.
    """
    targets = ds.labels.astype(np.float32)
    records: list[dict] = []
    if not cfg.teachers:
        return targets, records
    from .adapt import source_run
    from .model import load_trained

    for name, run in cfg.teachers:
        contract, model_path = source_run(run, option="--teacher")
        same = {"image_size": tuple(contract.image_size) == tuple(cfg.image_size),
                "preprocessing": dict(contract.preprocessing) == cfg.preprocessing_spec,
                "window": dict(contract.window) == dict(cfg.window),
                "interpolation": contract.interpolation == cfg.interpolation}
        if not all(same.values()):
            raise data_mod.DataError(f"--teacher {name}={run}: its {[k for k, v in same.items() if not v]} differ "
                                     "from this run's")
        k = names.index(name)
        theirs = {r["sha256"]: r["split"] for r in data_mod.read_split(Path(run) / SPLIT_FILE)}
        mine = np.nonzero(ds.site == k)[0]
        moved = [ds.paths[i] for i in mine if theirs.get(ds.sha256[i]) != data_mod.SPLITS[assignment[i]]]
        if moved:
            raise data_mod.DataError(
                f"--teacher {name}={run}: {len(moved)} of site {name!r}'s slices are not in the same split there "
                f"(e.g. {moved[0]}): train the teacher on that site alone, with this run's seed ({cfg.seed}) and "
                "--groups")
        train_idx = mine[assignment[mine] == 0]
        teacher = load_trained(model_path, cfg.image_size, contract.architecture)
        p = teacher.predict(ds.images[train_idx], batch_size=64, verbose=0)[:, 0]
        targets[train_idx] = (1 - cfg.distill) * targets[train_idx] + cfg.distill * p
        records.append({"site": name, "run": str(Path(run).resolve()), "model_sha256": contract.source_sha256,
                        "weight": cfg.distill, "n_train": int(len(train_idx))})
        log.info("teacher for %s: %s (%d training slices, weight %.2f)", name, run, len(train_idx), cfg.distill)
    return targets, records


def leave_one_site_out(cfg: TrainConfig, ds) -> list[dict]:
    """For every site: a model trained the same way on the other sites (a run directory of its own in
    ``LOSO_DIR/<site>``), scored on every readable slice of the site it never saw, at its own threshold
    (set on its training sites' validation splits). The honest estimate for a hospital not yet seen."""
    from .model import load_trained

    rows = []
    for k, left in enumerate(cfg.sites):
        rest = tuple(s for s in cfg.sites if s != left)
        sub = dataclasses.replace(cfg, data_dir=None, sites=rest, out=Path(cfg.out) / LOSO_DIR / left.name,
                                  leave_one_site_out=False,
                                  teachers=tuple(t for t in cfg.teachers if t[0] != left.name))
        log.info("leave-one-site-out: training without %r (on %s)", left.name, [s.name for s in rest])
        m = train(sub)
        model = load_trained(Path(sub.out) / MODEL_FILE, cfg.image_size, cfg.arch)
        mask = ds.site == k
        p = model.predict(ds.images[mask], batch_size=cfg.batch_size, verbose=0)[:, 0]
        rows.append({"left_out": left.name, "trained_on": [s.name for s in rest], "run_dir": str(sub.out),
                     "threshold": m["threshold"], "in_domain_test": {n: {k: f[k] for k in FIGURE_KEYS}
                                                                     for n, f in m["sites"].items()},
                     **sites_mod.figures(ds.labels[mask], p, m["threshold"])})
    return rows


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
    """The printed summary: pooled test figures, every site's, and the leave-one-site-out table."""
    lo, hi = metrics["sensitivity_ci95"]
    slo, shi = metrics["specificity_ci95"]
    a = metrics.get("roc_auc_ci95")
    auc = f"AUC {metrics['roc_auc']:.3f}" + (f" [{a[0]:.3f}, {a[1]:.3f}]" if a else "")
    lines = [f"test split (n={metrics['n']}): {auc}  accuracy {metrics['accuracy']:.3f}  "
             f"sensitivity {metrics['sensitivity']:.3f} [{lo:.3f}, {hi:.3f}]  "
             f"specificity {metrics['specificity']:.3f} [{slo:.3f}, {shi:.3f}]  at threshold {metrics['threshold']:.4f}"]
    sites = metrics.get("sites", {})
    if len(sites) > 1:
        lines.append("test split per site, at the same threshold:")
        lines += ["  " + sites_mod.figure_line(n, m) for n, m in sites.items()]
    loso = metrics.get("leave_one_site_out")
    if loso:
        lines.append("leave one site out (trained without the site, scored on all its slices, at that model's "
                     "own threshold):")
        lines += ["  " + sites_mod.figure_line(f"{r['left_out']} (trained on {', '.join(r['trained_on'])}; "
                                               f"threshold {r['threshold']:.4f})", r) for r in loso]
    return "\n".join(lines)
