"""covidct-evaluate: figures equal scikit-learn's (and an independent DeLong), CLI through the engine."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from covidct.engine.contract import read_contract
from covidct.engine.decode import decode_file
from covidct.engine.evaluate import figures
from covidct.engine.metrics import calibration, delong_ci, roc_curve
from tests.conftest import read_rows, run_cli, tiny_model

sk = pytest.importorskip("sklearn.metrics")


def _known(seed=0, n=400):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.35 * y + rng.random(n) * 0.65, 0, 1)
    return y, np.round(p, 2)  # rounded: ties, which every AUC implementation must count as one half


def _delong_bruteforce(y, p):
    """DeLong's variance from its definition: psi over every (positive, negative) pair."""
    pos, neg = p[y == 1], p[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    auc = psi.mean()
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    var = v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)
    return auc, var


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_figures_equal_scikit_learn(seed):
    y, p = _known(seed)
    thr = 0.55
    f = figures(y, p, thr, target_sensitivity=0.9)
    assert f["roc_auc"] == pytest.approx(sk.roc_auc_score(y, p), abs=1e-12)
    tn, fp, fn, tp = sk.confusion_matrix(y, p >= thr).ravel()
    at = f["at_stored_threshold"]
    assert at["confusion"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert at["sensitivity"] == pytest.approx(sk.recall_score(y, p >= thr))
    assert at["specificity"] == pytest.approx(sk.recall_score(1 - y, p < thr))
    fpr, tpr, _ = sk.roc_curve(y, p, drop_intermediate=False)
    assert np.allclose(f["roc_curve"]["fpr"], fpr) and np.allclose(f["roc_curve"]["tpr"], tpr)
    # the suggested threshold reaches the target with the highest specificity possible
    t = f["threshold_for_target"]
    assert t["sensitivity"] >= 0.9
    candidates = [c for c in np.unique(p) if np.mean(p[y == 1] >= c) >= 0.9]
    assert t["threshold"] == pytest.approx(max(candidates))


def test_delong_interval_equals_its_definition():
    y, p = _known(3, n=150)
    auc, lo, hi = delong_ci(y, p)
    ref_auc, var = _delong_bruteforce(y, p)
    assert auc == pytest.approx(ref_auc)
    assert (hi - lo) / 2 == pytest.approx(1.959963984540054 * np.sqrt(var), rel=1e-9)
    assert lo < auc < hi


def test_calibration_error_by_hand():
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.05, 0.15, 0.95, 0.85, 0.55, 0.52])
    c = calibration(y, p, bins=10)
    # bins: [0,.1) {0.05:0}, [.1,.2) {0.15:0}, [.5,.6) {0.55:1, 0.52:0}, [.8,.9) {0.85:1}, [.9,1] {0.95:1}
    expected = (abs(0.05 - 0) + abs(0.15 - 0) + 2 * abs(0.535 - 0.5) + abs(0.85 - 1) + abs(0.95 - 1)) / 6
    assert c["ece"] == pytest.approx(expected)
    assert sum(b["n"] for b in c["bins"]) == 6
    fpr, tpr, thr = roc_curve(y, p)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1


def _labelled(root: Path) -> Path:
    """Bright slices are 'COVID', dark ones 'non-COVID', with overlap; one corrupt file, one note."""
    rng = np.random.default_rng(7)
    for cls, centre in (("COVID", 150), ("non-COVID", 100)):
        d = root / cls
        d.mkdir(parents=True)
        for i in range(24):
            img = np.clip(rng.normal(centre + rng.normal(0, 30), 40, (80, 100)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(d / f"s {i}.png"), img)
    (root / "COVID" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    (root / "non-COVID" / "notes.txt").write_text("not an image")
    return root


def test_evaluate_cli_screens_through_the_engine(tmp_path):
    data = _labelled(tmp_path / "labelled data")
    model = tiny_model(tmp_path / "tiny.onnx", (64, 64), threshold=0.45)
    out = tmp_path / "eval"
    r = run_cli("covidct-evaluate", model, data, "--out", out, "--no-progress", timeout=600)
    assert r.returncode == 1, r.stderr[-3000:]  # one unreadable file: evaluated, and the exit code says so
    rep = json.loads((out / "evaluation.json").read_text())
    assert rep["files"] == {"ok": 48, "unreadable": 1, "skipped": 1}
    assert rep["unreadable"][0]["path"].endswith("broken.png") and rep["unreadable"][0]["class"] == "COVID"
    # the same figures from an independent decode with the model's contract and the tiny model's formula
    kwargs = read_contract(model).decode_kwargs()
    y, p = [], []
    for cls, label in (("COVID", 1), ("non-COVID", 0)):
        for f in sorted((data / cls).glob("s *.png")):
            y.append(label)
            p.append(decode_file(f, **kwargs).mean() / 255.0)
    y, p = np.array(y), np.array(p)
    assert rep["roc_auc"] == pytest.approx(sk.roc_auc_score(y, p), abs=1e-6)
    tn, fp, fn, tp = sk.confusion_matrix(y, p >= 0.45).ravel()
    assert rep["at_stored_threshold"]["confusion"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert rep["roc_auc_ci95"][0] < rep["roc_auc"] < rep["roc_auc_ci95"][1]
    for png in ("roc.png", "reliability.png"):
        img = cv2.imread(str(out / png))
        assert img is not None and img.shape[0] > 100
    assert "ROC AUC" in r.stdout and "Research use only" in r.stdout and "broken.png" in r.stdout


def test_evaluate_refuses_a_bad_model_and_one_class(tmp_path):
    data = _labelled(tmp_path / "data")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    r = run_cli("covidct-evaluate", bad, data, "--out", tmp_path / "e1", "--no-progress", timeout=300)
    assert r.returncode == 2 and "not a loadable ONNX model" in r.stderr
    assert not (tmp_path / "e1").exists()  # failed before any work
    for f in (data / "non-COVID").iterdir():
        f.unlink()
    r = run_cli("covidct-evaluate", tiny_model(tmp_path / "t.onnx", (64, 64)), data, "--out", tmp_path / "e2",
                "--no-progress", timeout=600)
    assert r.returncode == 2 and "both classes" in r.stderr


def _independent_threshold(p_pos: np.ndarray, target: float) -> float:
    """The highest threshold keeping at least ``target`` of the positives at or above it."""
    for t in sorted(set(p_pos.tolist()), reverse=True):
        if np.mean(p_pos >= t) >= target:
            return t
    raise AssertionError("unreachable")


def _labelled_ct(root: Path) -> Path:
    """Lung-window phantoms (ground glass on the positives), 24 per class, and one corrupt file."""
    from covidct.train.synthetic import phantom_hu, render

    rng = np.random.default_rng(11)
    for cls, positive in (("COVID", True), ("non-COVID", False)):
        (root / cls).mkdir(parents=True)
        for i in range(24):
            hu = phantom_hu(rng, positive=positive, size=(192, 192))
            cv2.imwrite(str(root / cls / f"s {i}.png"), render(hu, -600.0, 1500.0))
    (root / "COVID" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    return root


def test_calibrate_writes_a_new_model_with_the_threshold_and_its_provenance(tmp_path):
    import hashlib

    data = _labelled_ct(tmp_path / "local")
    model = tiny_model(tmp_path / "tiny.onnx", (64, 64), threshold=0.3)
    before = model.read_bytes()
    out = tmp_path / "eval"
    r = run_cli("covidct-evaluate", model, data, "--out", out, "--calibrate", "--target-sensitivity", "0.9",
                "--no-progress", timeout=600)
    assert r.returncode == 1, r.stderr[-3000:]  # calibrated; one unreadable file is still reported
    assert model.read_bytes() == before  # the original is never touched
    new_model = out / "tiny.calibrated.onnx"
    c = read_contract(new_model)
    kwargs = c.decode_kwargs()
    p_pos = np.array([decode_file(f, **kwargs).mean() / 255.0 for f in sorted((data / "COVID").glob("s *.png"))])
    assert c.threshold == pytest.approx(_independent_threshold(p_pos, 0.9), abs=1e-7)
    cal = c.calibration
    assert cal["original_sha256"] == hashlib.sha256(before).hexdigest() and cal["previous_threshold"] == 0.3
    assert cal["data"] == {"n": 48, "positives": 24, "negatives": 24} and cal["target_sensitivity"] == 0.9
    assert cal["at_new"]["sensitivity"] >= 0.9 and len(cal["at_new"]["specificity_ci95"]) == 2
    assert "calibrated" in r.stdout and "original model is unchanged" in r.stdout

    # covidct-batch flags by the new threshold and shows where it came from
    screen = tmp_path / "screen"
    b = run_cli("covidct-batch", data / "COVID", "--model", new_model, "--out", screen, "--no-progress", timeout=600)
    assert b.returncode == 1, b.stderr[-2000:]  # broken.png
    rows = read_rows(screen)
    ok = rows[rows.status == "ok"]
    assert np.allclose(ok.threshold, c.threshold) and (ok.positive == (ok.probability >= c.threshold)).all()
    assert not (ok.positive == (ok.probability >= 0.3)).all()  # the old threshold would label differently
    run = json.loads((screen / "run.json").read_text())
    assert run["model"]["contract"]["calibration"]["original_sha256"] == cal["original_sha256"]
    assert "calibrated on 48 local slices" in b.stdout
    assert 'id="calibration"' in (screen / "report.html").read_text()


def test_calibrate_refuses_too_few_slices_and_other_modalities(tmp_path):
    model = tiny_model(tmp_path / "tiny.onnx", (64, 64))
    small = tmp_path / "small"
    rng = np.random.default_rng(0)
    for cls in ("COVID", "non-COVID"):
        (small / cls).mkdir(parents=True)
        for i in range(12):
            cv2.imwrite(str(small / cls / f"{i}.png"), rng.integers(0, 256, (50, 50), dtype=np.uint8))
    r = run_cli("covidct-evaluate", model, small, "--out", tmp_path / "e1", "--calibrate", "--no-progress", timeout=300)
    assert r.returncode == 2 and "at least 20" in r.stderr
    assert not (tmp_path / "e1").exists()  # refused before any work

    pages = tmp_path / "pages"  # documents and discs: not lung CT
    for cls in ("COVID", "non-COVID"):
        (pages / cls).mkdir(parents=True)
        for i in range(22):
            img = np.full((120, 100), 255, np.uint8)
            cv2.putText(img, f"page {i} {cls}", (5, 60), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0, 1)
            cv2.circle(img, (50, 90), 5 + i % 7, 0, -1)
            cv2.imwrite(str(pages / cls / f"{i}.png"), img)
    out = tmp_path / "e2"
    r = run_cli("covidct-evaluate", model, pages, "--out", out, "--calibrate", "--no-progress", timeout=600)
    assert r.returncode == 2 and "does not read as lung CT" in r.stderr, r.stderr[-2000:]
    assert (out / "evaluation.json").exists() and not list(out.glob("*.onnx"))
