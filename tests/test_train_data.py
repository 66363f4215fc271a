"""Training data handling (no TensorFlow): classes, splits, duplicate leakage, metrics."""

import math

import numpy as np
import pytest

from covidct.train import data as D
from covidct.engine.metrics import operating_threshold, roc_auc, screening_metrics, wilson


def _folders(tmp_path, *names):
    for n in names:
        (tmp_path / n).mkdir()
    return tmp_path


@pytest.mark.parametrize("names,positive", [
    (("Infected", "Not_Infected"), "Infected"),
    (("COVID", "non-COVID"), "COVID"),
    (("negative", "positive"), "positive"),
    (("covid19", "normal"), "covid19"),
])
def test_positive_class_recognised_by_name(tmp_path, names, positive):
    neg, pos = D.resolve_classes(_folders(tmp_path, *names))
    assert pos == positive and neg != pos


def test_ambiguous_classes_are_an_error_listing_folders(tmp_path):
    _folders(tmp_path, "groupA", "groupB")
    with pytest.raises(D.DataError, match=r"groupA.*groupB.*--positive"):
        D.resolve_classes(tmp_path)
    assert D.resolve_classes(tmp_path, positive="groupB") == ("groupA", "groupB")
    with pytest.raises(D.DataError, match="not one of"):
        D.resolve_classes(tmp_path, positive="groupC")


def test_three_folders_rejected(tmp_path):
    _folders(tmp_path, "COVID", "non-COVID", "other")
    with pytest.raises(D.DataError, match="exactly two"):
        D.resolve_classes(tmp_path)


def _items(n=200, dup_every=7):
    paths = [f"/d/{'pos' if i % 2 else 'neg'}/p{i // 4:03d}_s{i % 4}.png" for i in range(n)]
    labels = np.array([i % 2 for i in range(n)])
    hashes = [f"h{i}" for i in range(n)]
    for i in range(0, n - 1, dup_every):  # identical content under two names
        hashes[i + 1 if labels[i + 1] == labels[i] else i] = hashes[i]
    for i in range(0, n - 2, dup_every):
        hashes[i + 2] = hashes[i]
    return paths, labels, hashes


def test_split_is_seeded_stratified_and_reproducible():
    paths, labels, hashes = _items()
    a = D.split(paths, labels, hashes, seed=5)
    assert np.array_equal(a, D.split(paths, labels, hashes, seed=5))
    assert not np.array_equal(a, D.split(paths, labels, hashes, seed=6))
    for cls in (0, 1):
        share = np.bincount(a[labels == cls], minlength=3) / (labels == cls).sum()
        assert np.allclose(share, D.FRACTIONS, atol=0.06), share


def test_identical_content_never_straddles_splits():
    paths, labels, hashes = _items()
    a = D.split(paths, labels, hashes, seed=1)
    by_hash = {}
    for h, s in zip(hashes, a):
        by_hash.setdefault(h, set()).add(int(s))
    assert any(hashes.count(h) > 1 for h in set(hashes))
    assert all(len(s) == 1 for s in by_hash.values())


def test_groups_keep_patients_together():
    paths, labels, hashes = _items()
    a = D.split(paths, labels, hashes, seed=2, groups=r"p(\d+)_")
    by_patient = {}
    for p, s in zip(paths, a):
        by_patient.setdefault(p.split("/")[-1][:4], set()).add(int(s))
    assert all(len(s) == 1 for s in by_patient.values())


def test_load_images_reports_unreadable(tmp_path):
    from covidct.train.synthetic import make_dataset

    make_dataset(tmp_path, n_per_class=3, classes=("non-COVID", "COVID"), size=(64, 64))
    (tmp_path / "COVID" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "COVID" / "empty.jpg").write_bytes(b"")
    ds = D.load_images(tmp_path, ("non-COVID", "COVID"), (32, 32), "area")
    assert len(ds.paths) == 6 and ds.images.shape == (6, 32, 32, 1)
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in ds.unreadable) == ["broken.png", "empty.jpg"]


def test_auc_and_wilson_known_values():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson(10, 10)[1] == pytest.approx(1.0) and wilson(10, 10)[0] < 0.99
    assert all(math.isnan(v) for v in wilson(0, 0))


def test_operating_threshold_reaches_target_with_best_specificity():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.7, 0.3, 0.65, 0.8, 0.9])
    thr = operating_threshold(y, p, 0.75)
    m = screening_metrics(y, p, thr)
    assert thr == pytest.approx(0.65) and m["sensitivity"] == 0.75 and m["specificity"] == 0.75
    thr = operating_threshold(y, p, 1.0)
    assert thr == pytest.approx(0.3) and screening_metrics(y, p, thr)["sensitivity"] == 1.0
