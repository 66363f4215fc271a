"""covidct-train LOCAL_DIR --init RUN_DIR: adapt a trained model to a new site with a few labelled slices.

The new run starts from the source run's model, architecture, preprocessing and window, and fine-tunes
on the local folder (20-200 slices). Ten validation slices cannot steer early stopping, so there is none:

- a fixed, short schedule (``epochs`` at a small learning rate, AdamW with weight decay), with the same
  site augmentation and jitter as training, so a few dozen slices are seen in many forms;
- the threshold and the figures reported for the local site come from **cross-fitting**: the local set is
  cut into ``folds`` (stratified, groups and identical files together), each fold is scored by a model
  adapted on the other folds, and the threshold that reaches the target sensitivity on those
  out-of-fold probabilities is the one stored. The final model is then adapted on every local slice with
  the same recipe. The out-of-fold AUC is an honest estimate for the site's unseen slices (slightly
  pessimistic: each fold's model saw a fifth fewer slices than the final one).

What is adapted (``method``):

- ``probe`` (the default): nothing of the network is trained. Each local slice becomes the mean and
  maximum of every rectified feature map of the source model after the first
  (``model.probe_features``: 960 + 960 numbers for the compact network), and an L2-regularised logistic
  regression on them, classes weighted equally, becomes the new head (``model.with_probe``). Its
  strength is chosen by repeated 5-fold cross-validation inside whatever slices it is fitted on (nested
  in the cross-fitting), from ``PROBE_L2``. The fit is exact and takes seconds: with fewer slices than features the
  solution lies in the span of the slices, so it is solved in that basis (an SVD), by Newton's method.
  Measured (README, trust section): on UCSD's unseen slices the São Paulo model goes from 0.68 to 0.77
  with 100 local slices, where fine-tuning every weight reached 0.70;
- ``all`` (every weight; BatchNorm statistics follow the site), ``bn`` (BatchNorm statistics and affine
  parameters only), ``head`` (the last Dense layer only): fine-tuning, with the schedule above.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidct.engine import __version__
from covidct.engine.contract import Contract, ContractError, sha256_file
from covidct.engine.labels import DataError
from covidct.engine.metrics import operating_threshold

from . import data as data_mod
from . import sites as sites_mod
from .fit import AUGMENT_SHARE

log = logging.getLogger(__name__)

#: Fewer slices than this of either class are refused: no threshold or estimate can be set on them.
MIN_PER_CLASS = 10
METHODS = ("probe", "all", "bn", "head")
#: The probe's L2 strengths (on standardised features, classes weighted to equal total weight) that
#: cross-validation chooses from. On UCSD the unseen AUC was flat within 0.01 from 1 to 100.
PROBE_L2 = (1.0, 10.0, 100.0)
PROBE_CV_REPEATS = 3


@dataclass(frozen=True)
class AdaptConfig:
    local_dir: Path
    init: Path
    out: Path
    method: str = "probe"
    epochs: int = 12
    learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    folds: int = 5
    batch_size: int = 16
    seed: int = 42
    groups: str | None = None
    positive: str | None = None
    target_sensitivity: float | None = None   # None: the source model's
    site_augmentation: bool = True
    augment_share: float = AUGMENT_SHARE

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"adapt method must be one of {list(METHODS)}, e.g. 'all'; got {self.method!r}")
        if self.epochs < 1 or self.folds < 2 or self.batch_size < 1 or not self.learning_rate > 0:
            raise ValueError("epochs >= 1, folds >= 2, batch_size >= 1 and learning_rate > 0 are required")
        if not Path(self.local_dir).is_dir():
            raise DataError(f"{self.local_dir} is not a directory (expected one sub-folder per class)")


def source_run(run: Path, option: str = "--init") -> tuple[Contract, Path]:
    """The source run's contract and model, checked: refuses a folder that is not a covidct-train run, a
    model changed since training, or an architecture this version cannot rebuild."""
    from .fit import CONTRACT_FILE, MODEL_FILE
    from .model import REBUILDS

    run = Path(run)
    missing = [n for n in (MODEL_FILE, CONTRACT_FILE) if not (run / n).is_file()]
    if missing:
        raise DataError(f"{option} {run} is not a covidct-train run directory: missing {missing}")
    try:
        contract = Contract.from_json((run / CONTRACT_FILE).read_text())
    except ContractError as e:
        raise DataError(f"{option} {run}: its {CONTRACT_FILE} is not a valid contract ({e})") from None
    if contract.architecture not in REBUILDS:
        raise DataError(f"{option} {run}: architecture {contract.architecture!r} cannot be adapted by this version "
                        f"(it rebuilds {list(REBUILDS)})")
    actual = sha256_file(run / MODEL_FILE)
    if contract.source_sha256 != actual:
        raise DataError(f"{option} {run}: {MODEL_FILE} changed since training (sha256 {actual[:12]} != contract "
                        f"{contract.source_sha256[:12]})")
    return contract, run / MODEL_FILE


def folds_of(ds: data_mod.Dataset, k: int, seed: int, groups: str | None) -> np.ndarray:
    """Fold index of every slice: groups (``groups`` regex, identical content) stay in one fold; each group
    goes to the fold furthest below its share of the group's majority class."""
    keys = data_mod._group_keys(ds.paths, ds.sha256, groups)
    members: dict[int, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    order = sorted(members)
    np.random.default_rng(seed).shuffle(order)
    filled = np.zeros((2, k))
    out = np.empty(len(ds.paths), np.int64)
    for key in order:
        idx = members[key]
        cls = int(round(ds.labels[idx].mean()))
        f = int(np.argmin(filled[cls] + 1e-6 * np.arange(k)))
        out[idx] = f
        for c in (0, 1):
            filled[c, f] += int((ds.labels[idx] == c).sum())
    return out


def _fine_tune(model_path: Path, contract: Contract, cfg: AdaptConfig, ds: data_mod.Dataset, idx: np.ndarray,
               seed: int):
    """The source model adapted on ``idx`` with the fixed recipe; returns the Keras model and its history."""
    import keras

    from .fit import SiteSequence, TrainConfig
    from .model import PROBE, load_trained

    model = load_trained(model_path, contract.image_size, contract.architecture)
    if cfg.method != "all":
        for layer in model.layers:
            is_bn = isinstance(layer, keras.layers.BatchNormalization)
            layer.trainable = is_bn if cfg.method == "bn" else layer.name == contract.output_name
    tcfg = TrainConfig(data_dir=cfg.local_dir, out=cfg.out, arch=contract.architecture.removesuffix(PROBE),
                       image_size=tuple(contract.image_size), batch_size=cfg.batch_size, seed=seed,
                       interpolation=contract.interpolation, window=dict(contract.window),
                       site_augmentation=cfg.site_augmentation, augment_share=cfg.augment_share, epochs=cfg.epochs,
                       learning_rate=cfg.learning_rate)
    labels = ds.labels[idx]
    seq = SiteSequence([ds.grey[i] for i in idx], labels, sites_mod.sample_weights(np.zeros(len(idx), np.int64), labels),
                       tcfg, dict(contract.preprocessing), cfg.site_augmentation)
    model.compile(optimizer=keras.optimizers.AdamW(cfg.learning_rate, weight_decay=cfg.weight_decay),
                  loss="binary_crossentropy", metrics=["accuracy"])
    h = model.fit(seq, epochs=cfg.epochs, verbose=0)
    return model, {k: [float(v) for v in vs] for k, vs in h.history.items()}


def adapt(cfg: AdaptConfig) -> dict:
    """Adapt, cross-fit the threshold, write the new run directory; returns its metrics."""
    t0 = time.time()
    contract, model_path = source_run(cfg.init)
    if cfg.method == "probe":
        return _adapt(cfg, contract, model_path, t0, _ProbeAdapter(model_path, contract))
    return _adapt(cfg, contract, model_path, t0, _FineTuner(model_path, contract, cfg))


class _FineTuner:
    """Fine-tuning (``all``, ``bn``, ``head``): ``fit(ds, idx, seed)`` gives a Keras model."""

    def __init__(self, model_path: Path, contract: Contract, cfg: AdaptConfig):
        self.model_path, self.contract, self.cfg = model_path, contract, cfg
        self.architecture = contract.architecture

    def fit(self, ds: data_mod.Dataset, idx: np.ndarray, seed: int):
        return _fine_tune(self.model_path, self.contract, self.cfg, ds, idx, seed)

    def provenance(self, history: dict) -> dict:
        c = self.cfg
        return {"epochs": c.epochs, "learning_rate": c.learning_rate, "site_augmentation": c.site_augmentation}


class _ProbeAdapter:
    """The linear probe (``probe``): features of every local slice once, then a logistic regression per fit."""

    def __init__(self, model_path: Path, contract: Contract):
        from .model import PROBE, load_trained, probe_features

        self.source = load_trained(model_path, contract.image_size, contract.architecture)
        self.features, self.width = probe_features(self.source)
        self.architecture = contract.architecture.removesuffix(PROBE) + PROBE
        self._x = None

    def fit(self, ds: data_mod.Dataset, idx: np.ndarray, seed: int):
        from .model import with_probe

        if self._x is None:
            self._x = self.features.predict(ds.images, batch_size=64, verbose=0).astype(np.float64)
        probe = fit_probe(self._x[idx], ds.labels[idx], seed)
        model = with_probe(self.source)
        model.get_layer("probability").set_weights([probe["weights"][:, None].astype(np.float32),
                                                    np.array([probe["bias"]], np.float32)])
        return model, {"l2": probe["l2"], "cv_auc": probe["cv_auc"]}

    def provenance(self, history: dict) -> dict:
        return {"features": f"mean and maximum of each of the source model's rectified feature maps "
                            f"({self.width} numbers a slice)", "l2": history["l2"],
                "l2_chosen_from": list(PROBE_L2), "l2_cv_auc": history["cv_auc"]}


def _logistic(z: np.ndarray, y: np.ndarray, l2: float, iters: int = 40) -> np.ndarray:
    """Weights (last: intercept, not penalised) of an L2 logistic regression, classes weighted equally."""
    n, d = z.shape
    zb = np.hstack([z, np.ones((n, 1))])
    sw = np.where(y == 1, 0.5 / max(1, int(y.sum())), 0.5 / max(1, int((1 - y).sum()))) * n
    penalty = np.full(d + 1, float(l2))
    penalty[-1] = 0.0
    w = np.zeros(d + 1)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(zb @ w, -50, 50)))
        grad = zb.T @ (sw * (p - y)) + penalty * w
        hess = (zb * (sw * p * (1 - p))[:, None]).T @ zb + np.diag(penalty) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def _probe_fit(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """(weights, bias) on the raw features: standardised, solved in the span of the centred slices."""
    mu, sd = x.mean(0), x.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    xc = (x - mu) / sd
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    basis = vt[s > 1e-9 * max(s[0], 1e-30)].T if len(s) and s[0] > 0 else np.zeros((x.shape[1], 0))
    w = _logistic(xc @ basis, y.astype(np.float64), l2)
    weights = basis @ w[:-1] / sd
    return weights, float(w[-1] - weights @ mu)


def fit_probe(x: np.ndarray, y: np.ndarray, seed: int) -> dict:
    """The probe on features ``x`` (n, d) and labels ``y``: its strength chosen by repeated 5-fold
    cross-validated AUC (stratified) from PROBE_L2, then fitted on every slice."""
    from covidct.engine.metrics import roc_auc

    k = int(min(5, np.bincount(y, minlength=2).min()))
    scores = {}
    for l2 in PROBE_L2:
        aucs = []
        for r in range(PROBE_CV_REPEATS if k >= 2 else 0):
            rng = np.random.default_rng(seed * 1000 + r)
            fold = np.empty(len(y), np.int64)
            for c in (0, 1):
                members = rng.permutation(np.nonzero(y == c)[0])
                fold[members] = np.arange(len(members)) % k
            oof = np.zeros(len(y))
            for f in range(k):
                w, b = _probe_fit(x[fold != f], y[fold != f], l2)
                oof[fold == f] = x[fold == f] @ w + b
            aucs.append(roc_auc(y, oof))
        scores[l2] = float(np.mean(aucs)) if aucs else float("nan")
    best = max(PROBE_L2, key=lambda v: (np.nan_to_num(scores[v], nan=-1.0), v))
    weights, bias = _probe_fit(x, y, best)
    return {"weights": weights, "bias": bias, "l2": best, "cv_auc": round(scores[best], 4)}


def _adapt(cfg: AdaptConfig, contract: Contract, model_path: Path, t0: float, adapter) -> dict:
    from .fit import CONTRACT_FILE, HISTORY_FILE, METRICS_FILE, MODEL_FILE, SPLIT_FILE, contract_metrics
    from .model import load_trained

    target = cfg.target_sensitivity or contract.target_sensitivity or 0.95
    classes = data_mod.resolve_classes(cfg.local_dir, cfg.positive)
    ds = data_mod.load_images(cfg.local_dir, classes, tuple(contract.image_size), contract.interpolation,
                              window=dict(contract.window), preprocessing=dict(contract.preprocessing),
                              keep_grey=True, exclude=Path(cfg.out))
    counts = np.bincount(ds.labels, minlength=2)
    if counts.min() < MIN_PER_CLASS:
        raise DataError(f"{cfg.local_dir} is too small to adapt on: {counts[1]} {classes[1]} and {counts[0]} "
                        f"{classes[0]} readable slices; --init needs at least {MIN_PER_CLASS} of each "
                        "(nothing written)")
    folds = min(cfg.folds, int(counts.min()))
    fold = folds_of(ds, folds, cfg.seed, cfg.groups)
    oof = np.full(len(ds.paths), np.nan)
    for f in range(folds):
        held = fold == f
        if not held.any():
            continue
        m, _ = adapter.fit(ds, np.nonzero(~held)[0], cfg.seed + 1 + f)
        oof[held] = m.predict(ds.images[held], batch_size=64, verbose=0)[:, 0]
        log.info("fold %d/%d adapted on %d slices, scored %d", f + 1, folds, int((~held).sum()), int(held.sum()))
    threshold = operating_threshold(ds.labels, oof, target)
    estimate = sites_mod.figures(ds.labels, oof, threshold)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model, history = adapter.fit(ds, np.arange(len(ds.paths)), cfg.seed)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        model.save(Path(tmp) / MODEL_FILE)
        # what export and screening rebuild must be the model fitted here (a probe's head is set, not trained)
        mine = model.predict(ds.images[:64], batch_size=64, verbose=0)[:, 0]
        again = load_trained(Path(tmp) / MODEL_FILE, contract.image_size, adapter.architecture)
        if not np.allclose(again.predict(ds.images[:64], batch_size=64, verbose=0)[:, 0], mine, atol=1e-5):
            raise RuntimeError(f"the adapted model does not load back as architecture {adapter.architecture!r}")
        os.replace(Path(tmp) / MODEL_FILE, out / MODEL_FILE)
    provenance = {
        "tool": "covidct-train --init", "project_version": __version__,
        "date": dt.datetime.now(dt.timezone.utc).date().isoformat(),
        "source_run": str(Path(cfg.init).resolve()), "source_model_sha256": contract.source_sha256,
        "source_threshold": float(contract.threshold), "source_metrics": contract.metrics,
        "local_set": {"n": int(len(ds.paths)), "class_counts": {classes[0]: int(counts[0]), classes[1]: int(counts[1])},
                      "unreadable": len(ds.unreadable)},
        "method": cfg.method, **adapter.provenance(history), "folds": folds, "target_sensitivity": float(target),
        "threshold_rule": f"the highest threshold reaching the target sensitivity on {folds}-fold out-of-fold "
                          "probabilities of the local set",
        "cross_validated": {k: estimate[k] for k in ("n", "roc_auc", "roc_auc_ci95", "sensitivity",
                                                     "sensitivity_ci95", "specificity", "specificity_ci95")},
        "previous_adaptation": contract.adaptation,
    }
    metrics = {**estimate, "split": f"local set, {folds}-fold out-of-fold", "class_names": list(contract.class_names),
               "positive_class": contract.positive_class, "target_sensitivity": float(target),
               "adaptation": provenance, "unreadable": [{"path": p, "reason": r} for p, r in ds.unreadable],
               "train_seconds": round(time.time() - t0, 1)}
    # every local slice is adaptation data ("train"); export's parity and reference read them from here
    data_mod.write_split(out / SPLIT_FILE, ds, np.zeros(len(ds.paths), np.int64),
                         (contract.class_names[0], contract.class_names[1]))
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=2))
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    new = dataclasses.replace(contract, threshold=float(threshold), target_sensitivity=float(target),
                              metrics=contract_metrics(metrics), source_sha256=sha256_file(out / MODEL_FILE),
                              project_version=__version__, reference=None, calibration=None, agreement=None,
                              adaptation=provenance, architecture=adapter.architecture)
    (out / CONTRACT_FILE).write_text(new.to_json())
    return metrics


def summary(metrics: dict) -> str:
    a = metrics["adaptation"]
    return "\n".join([
        f"adapted {a['method']} from {a['source_run']} (model sha256 {a['source_model_sha256'][:12]}) on "
        f"{a['local_set']['n']} local slices {a['local_set']['class_counts']}",
        "local site, out-of-fold: " + sites_mod.figure_line("local", metrics)
        + f"  at threshold {metrics['threshold']:.4f} (was {a['source_threshold']:.4f})",
    ])
