"""Several sites in one training run, leave-one-site-out, and adaptation to a new site (covidct-train --init)."""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest

from covidct.engine.contract import Contract, read_contract
from tests.conftest import run_cli
from covidct.train import sites as S


def _site(root, n_per_class, seed, classes=("non-COVID", "COVID")):
    from covidct.train.synthetic import make_dataset
    return make_dataset(root, n_per_class=n_per_class, seed=seed, classes=classes, size=(128, 128))


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory):
    """Two synthetic sites of different sizes and class-folder names, trained jointly with
    --leave-one-site-out (short: this checks the bookkeeping, not the accuracy)."""
    base = tmp_path_factory.mktemp("sites")
    big = _site(base / "big site", 45, seed=5)
    small = _site(base / "small", 24, seed=6, classes=("Not_Infected", "Infected"))
    run = base / "run"
    r = run_cli("covidct-train", big, "--site", f"clinic={small}", "--out", run, "--epochs", "2",
                "--image-size", "48", "--batch-size", "16", "--leave-one-site-out", "--groups", r"p\d+",
                timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    return {"big": big, "small": small, "run": run, "stdout": r.stdout}


def test_every_site_gets_its_own_stratified_split(two_sites):
    rows = list(csv.DictReader(open(two_sites["run"] / "split.csv")))
    assert {r["site"] for r in rows} == {"big-site", "clinic"}
    per = Counter((r["site"], r["split"], r["class"]) for r in rows)
    for site in ("big-site", "clinic"):
        for split in ("train", "val", "test"):
            # both classes in every split of every site, named by the model's (the first site's) class names
            assert per[(site, split, "COVID")] > 0 and per[(site, split, "non-COVID")] > 0, (site, split, per)
    assert sum(v for (s, _, _), v in per.items() if s == "clinic") == 48
    assert sum(v for (s, _, _), v in per.items() if s == "big-site") == 90
    # the small site's paths are its own files, labelled through its own folder names
    assert all((r["path"].rsplit("/", 2)[-2] == "Infected") == (r["class"] == "COVID")
               for r in rows if r["site"] == "clinic")


def test_per_site_figures_in_metrics_summary_and_contract(two_sites):
    run = two_sites["run"]
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["sites"]) == {"big-site", "clinic"}
    for name, f in m["sites"].items():
        assert f["n"] == m["site_split_sizes"][name]["test"]
        lo, hi = f["roc_auc_ci95"]
        assert lo <= f["roc_auc"] <= hi and f["n_positive"] + f["n_negative"] == f["n"]
        assert f["threshold"] == m["threshold"]
    assert sum(f["n"] for f in m["sites"].values()) == m["n"]
    # the threshold reaches the target on every site's validation split: the lowest of the sites' own
    own = m["validation"]["site_thresholds"]
    assert m["threshold"] == min(own.values())
    for f in m["validation"]["sites"].values():
        assert f["sensitivity"] >= m["target_sensitivity"]
    c = Contract.from_json((run / "contract.json").read_text())
    assert set(c.metrics["sites"]) == {"big-site", "clinic"} and "roc_auc_ci95" in c.metrics["sites"]["clinic"]
    out = two_sites["stdout"]
    assert "test split per site" in out and "big-site (n=" in out and "clinic (n=" in out


def test_leave_one_site_out_reports_one_row_per_site(two_sites):
    run = two_sites["run"]
    m = json.loads((run / "metrics.json").read_text())
    rows = m["leave_one_site_out"]
    assert [r["left_out"] for r in rows] == ["big-site", "clinic"]
    assert [r["trained_on"] for r in rows] == [["clinic"], ["big-site"]]
    # scored on every readable slice of the site left out, by a model that never saw it
    assert [r["n"] for r in rows] == [90, 48]
    for r in rows:
        sub = json.loads((run / "leave-one-site-out" / r["left_out"] / "metrics.json").read_text())
        assert list(sub["sites"]) == r["trained_on"] and r["threshold"] == sub["threshold"]
    assert len(Contract.from_json((run / "contract.json").read_text()).metrics["leave_one_site_out"]) == 2
    assert two_sites["stdout"].count("trained on") == 2


@pytest.mark.slow  # opt-in and experimental (--teacher): a training of its own
def test_a_teacher_trained_on_one_site_softens_only_its_training_targets(two_sites, tmp_path):
    """--teacher SITE=RUN: the leave-one-site-out run without the clinic was trained on big-site alone with
    this run's seed and groups, so its split is this run's for big-site: a valid teacher for it."""
    from covidct.train import fit

    run, teacher = two_sites["run"], two_sites["run"] / "leave-one-site-out" / "clinic"
    common = ("--site", f"clinic={two_sites['small']}", "--epochs", "1", "--image-size", "48", "--batch-size", "16",
              "--groups", r"p\d+")
    r = run_cli("covidct-train", two_sites["big"], *common, "--teacher", f"big-site={teacher}",
                "--out", tmp_path / "distilled", timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    m = json.loads((tmp_path / "distilled" / "metrics.json").read_text())
    rows = list(csv.DictReader(open(run / "split.csv")))
    n_train = sum(1 for x in rows if x["site"] == "big-site" and x["split"] == "train")
    [t] = m["teachers"]
    assert t["site"] == "big-site" and t["n_train"] == n_train and t["weight"] == fit.DISTILL
    assert t["model_sha256"] == Contract.from_json((teacher / "contract.json").read_text()).source_sha256
    assert m["config"]["teachers"] == [{"site": "big-site", "run": str(teacher)}]

    # the targets themselves: big-site's training slices move towards the teacher, nothing else moves
    cfg = fit.TrainConfig(sites=S.parse_sites((two_sites["big"],), (f"clinic={two_sites['small']}",)),
                          out=tmp_path / "x", image_size=(48, 48), groups=r"p\d+", teachers=(("big-site", teacher),))
    ds, _ = S.load_sites(cfg.sites, None, image_size=cfg.image_size, interpolation=cfg.interpolation,
                         window=cfg.window, preprocessing=cfg.preprocessing_spec)
    assignment = S.split_sites(ds, cfg.seed, cfg.groups)
    targets, _ = fit.distillation_targets(cfg, ds, assignment, ("big-site", "clinic"))
    moved = (ds.site == 0) & (assignment == 0)
    assert np.array_equal(targets[~moved], ds.labels[~moved].astype(np.float32))
    y = ds.labels[moved]
    assert np.all(np.abs(targets[moved] - y) <= fit.DISTILL + 1e-6) and np.any(targets[moved] != y)
    # training accuracy is against the labels the soft targets stand for, not the targets themselves
    acc = fit._label_accuracy()(np.array([0.75, 0.2, 0.5, 0.3], np.float32), np.array([0.9, 0.1, 0.4, 0.6], np.float32))
    assert float(acc) == pytest.approx(0.5)

    # refused before training: a teacher whose split differs (another seed), an unknown site, another size
    for extra, match in (((f"big-site={teacher}", "--seed", "7"), "not in the same split"),
                         ((f"nowhere={teacher}",), "no such site"),
                         ((f"clinic={teacher}",), "not in the same split")):
        bad = run_cli("covidct-train", two_sites["big"], *common, "--teacher", *extra, "--out", tmp_path / "bad",
                      timeout=900)
        assert bad.returncode == 2 and match in bad.stderr, (extra, bad.stderr[-2000:])
        assert not (tmp_path / "bad").exists()
    bad = run_cli("covidct-train", two_sites["big"], *common[:4], "--image-size", "40", *common[6:],
                  "--teacher", f"big-site={teacher}", "--out", tmp_path / "bad2", timeout=900)
    assert bad.returncode == 2 and "image_size" in bad.stderr and not (tmp_path / "bad2").exists(), bad.stderr[-2000:]


def test_site_balanced_draw_of_a_ten_to_one_pair():
    site = np.array([0] * 500 + [1] * 50)
    rng = np.random.default_rng(0)
    for _ in range(3):  # every epoch
        order = S.balanced_order(site, rng)
        counts = np.bincount(site[order])
        assert len(order) == 550 and abs(counts[0] - counts[1]) <= 1
        # the small site's slices are all drawn before any repeats: each 5 or 6 times
        small = Counter(order[site[order] == 1].tolist())
        assert len(small) == 50 and set(small.values()) <= {5, 6}
        assert len(set(order[site[order] == 0].tolist())) == counts[0]  # the big one subsampled, no repeats
    # one site: a plain permutation, as training did before sites existed
    assert sorted(S.balanced_order(np.zeros(7, int), np.random.default_rng(1)).tolist()) == list(range(7))


def test_class_weights_balance_within_each_site():
    site = np.array([0] * 10 + [1] * 4)
    labels = np.array([0] * 8 + [1] * 2 + [0, 1, 1, 1])
    w = S.sample_weights(site, labels)
    for k in (0, 1):
        m = site == k
        assert w[m & (labels == 0)].sum() == pytest.approx(w[m & (labels == 1)].sum())


def test_sites_are_named_and_checked(tmp_path):
    a = _site(tmp_path / "a", 3, 0)
    with pytest.raises(ValueError, match="NAME=DIR"):
        S.parse_sites((a,), ("oops",))
    with pytest.raises(ValueError, match="named"):
        S.parse_sites((a,), (f"a={a}",))
    with pytest.raises(ValueError, match="same folder"):
        S.parse_sites((a,), (f"b={a}",))
    r = run_cli("covidct-train", a, "--site", f"b={tmp_path / 'missing'}", "--out", tmp_path / "run")
    assert r.returncode == 2 and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def adapted(trained_run, tmp_path_factory):
    """The session's trained run adapted to a third synthetic site, then exported."""
    base = tmp_path_factory.mktemp("adapt")
    local = _site(base / "local site", 15, seed=9, classes=("Not_Infected", "Infected"))
    out = base / "adapted"
    r = run_cli("covidct-train", local, "--init", trained_run["run"], "--out", out, "--adapt", "all", "--epochs", "2",
                "--groups", r"p\d+", timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    e = run_cli("covidct-export", out, "--out", out / "model.onnx", timeout=900)
    assert e.returncode == 0, e.stderr[-4000:]
    return {"local": local, "out": out, "stdout": r.stdout, "export_stdout": e.stdout, "source": trained_run}


@pytest.mark.slow  # two trainings (--init cross-fits five folds) and an export: about a minute on 2 cores
def test_adapted_model_carries_its_provenance(adapted):
    src = read_contract(adapted["source"]["model"])
    c = read_contract(adapted["out"] / "model.onnx")
    a = c.adaptation
    assert a["source_model_sha256"] == src.source_sha256 and a["tool"] == "covidct-train --init"
    assert a["local_set"]["n"] == 30 and a["local_set"]["class_counts"] == {"Not_Infected": 15, "Infected": 15}
    assert a["method"] == "all" and a["source_threshold"] == src.threshold
    # the model's contract otherwise as the source's: same input, preprocessing, class names
    assert (c.image_size, c.preprocessing, c.class_names, c.window) == (src.image_size, src.preprocessing,
                                                                       src.class_names, src.window)
    # the threshold is set on the local set's out-of-fold probabilities, and the figures say so
    m = json.loads((adapted["out"] / "metrics.json").read_text())
    assert c.threshold == m["threshold"] and m["split"].startswith("local set")
    assert a["cross_validated"]["n"] == 30 and len(a["cross_validated"]["roc_auc_ci95"]) == 2
    assert "adapted all from" in adapted["stdout"] and "out-of-fold" in adapted["stdout"]
    assert "provenance is in the contract" in adapted["export_stdout"]


def test_the_probe_is_the_regularised_logistic_regression_whatever_the_number_of_features():
    from covidct.engine.metrics import roc_auc
    from covidct.train.adapt import PROBE_L2, _logistic, _probe_fit, fit_probe

    rng = np.random.default_rng(0)
    z = rng.normal(size=(140, 30))
    y = (z[:, :3].sum(1) + 0.5 * rng.normal(size=140) > 0).astype(np.int64)
    x = z * rng.uniform(0.1, 5, 30) + rng.normal(size=30)  # features on unlike scales
    # fewer slices than features after the split below: solved in the slices' span, it must equal the direct solution
    tr = np.arange(20)
    w, b = _probe_fit(x[tr], y[tr], 10.0)
    mu, sd = x[tr].mean(0), x[tr].std(0)
    direct = _logistic((x[tr] - mu) / sd, y[tr].astype(float), 10.0)
    np.testing.assert_allclose(w * sd, direct[:-1], atol=1e-6)
    np.testing.assert_allclose(b + (w * sd) @ (mu / sd), direct[-1], atol=1e-6)
    # a constant feature gets no weight; the strength is one of the grid, chosen by cross-validation
    x[:, 5] = 3.0
    probe = fit_probe(x[:40], y[:40], seed=1)
    assert abs(probe["weights"][5]) < 1e-12 and probe["l2"] in PROBE_L2 and 0 <= probe["cv_auc"] <= 1
    assert roc_auc(y[40:], x[40:] @ probe["weights"] + probe["bias"]) > 0.8


@pytest.fixture(scope="module")
def probed(trained_run, tmp_path_factory):
    """The session's trained run adapted with the default ``--adapt probe`` to a synthetic site, then exported."""
    base = tmp_path_factory.mktemp("probe")
    local = _site(base / "local", 12, seed=8, classes=("Not_Infected", "Infected"))
    out = base / "probe"
    r = run_cli("covidct-train", local, "--init", trained_run["run"], "--out", out, "--groups", r"p\d+")
    assert r.returncode == 0, r.stderr[-4000:]
    e = run_cli("covidct-export", out, "--out", out / "model.onnx")
    assert e.returncode == 0, e.stderr[-4000:]
    return {"local": local, "out": out, "stdout": r.stdout}


def test_probe_features_are_each_maps_mean_and_maximum_and_an_older_probe_is_refused(tmp_path):
    """The probe's features, against numpy on the same maps; a probe of an earlier release (another pooling
    under a head of the same width) is refused by name rather than loaded into today's graph."""
    import keras

    from covidct.train.model import RETIRED_PROBES, build_model, feature_layers, probe_features

    model = build_model((64, 64), arch="compact")
    features, width = probe_features(model)
    layers = feature_layers(model)
    x = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 1)).astype(np.float32)
    maps = keras.Model(model.inputs, [layer.output for layer in layers]).predict(x, verbose=0)
    expected = np.concatenate([np.concatenate([m.mean(axis=(1, 2)), m.max(axis=(1, 2))], axis=-1) for m in maps], -1)
    assert width == expected.shape[1] == 2 * sum(m.shape[-1] for m in maps)
    np.testing.assert_allclose(features.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    for old in RETIRED_PROBES:
        with pytest.raises(ValueError, match="earlier covidct-batch"):
            build_model((64, 64), arch="compact" + old)


def test_init_adapts_with_a_probe_that_export_carries_and_refits_the_same(trained_run, probed):
    """The default ``--adapt probe``: the exported model's probabilities are the logistic regression on the
    source model's pooled features, refitted here from the same features, labels and seed."""
    import onnxruntime as ort

    from covidct.engine.contract import read_contract
    from covidct.engine.decode import decode_file
    from covidct.train.adapt import fit_probe
    from covidct.train.model import PROBE, load_trained, probe_features

    local, out = probed["local"], probed["out"]
    assert "adapted probe from" in probed["stdout"]
    c = read_contract(out / "model.onnx")
    src = json.loads((trained_run["run"] / "contract.json").read_text())
    assert c.architecture == src["architecture"] + PROBE and c.adaptation["method"] == "probe"
    assert c.adaptation["source_model_sha256"] == src["source_sha256"] and c.adaptation["local_set"]["n"] == 24
    files = sorted(p for p in local.rglob("*") if p.is_file())
    x = np.stack([decode_file(p, **c.decode_kwargs()) for p in files])
    y = np.array([int(p.parent.name == "Infected") for p in files])
    source = load_trained(trained_run["run"] / "model.keras", c.image_size, src["architecture"])
    features, width = probe_features(source)
    assert c.adaptation["features"].endswith(f"({width} numbers a slice)")
    # the run's final fit used every local slice in load order (classes sorted, then names) and seed 42
    order = np.lexsort(([p.name for p in files], [p.parent.name != c.class_names[0] for p in files]))
    f = features.predict(x[order][..., None].astype(np.float32), verbose=0).astype(np.float64)
    probe = fit_probe(f, y[order], seed=42)
    assert probe["l2"] == c.adaptation["l2"]
    expected = 1 / (1 + np.exp(-(f @ probe["weights"] + probe["bias"])))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {c.input_name: x[order][..., None]})[0][:, 0]
    np.testing.assert_allclose(got, expected, atol=2e-4)
    assert len(set(np.round(got, 3))) > 3  # a head that says something, not a constant


@pytest.mark.slow  # two more adaptations (one fine-tunes, five folds and the final fit)
def test_an_adapted_model_adapts_again_by_probe_or_fine_tuning(probed, tmp_path):
    from covidct.engine.contract import read_contract
    from covidct.train.model import PROBE

    for method, extra in (("probe", ()), ("all", ("--epochs", "1"))):
        out = tmp_path / method
        r = run_cli("covidct-train", probed["local"], "--init", probed["out"], "--adapt", method, *extra,
                    "--out", out, "--groups", r"p\d+")
        assert r.returncode == 0, r.stderr[-4000:]
        c = json.loads((out / "contract.json").read_text())
        assert c["architecture"] == "compact" + PROBE and c["adaptation"]["method"] == method
        assert c["adaptation"]["previous_adaptation"]["method"] == "probe"
    assert read_contract(probed["out"] / "model.onnx").architecture == "compact" + PROBE


def test_init_refuses_a_missing_or_incompatible_run_and_a_small_set(trained_run, tmp_path):
    local = _site(tmp_path / "local", 15, seed=3)
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    r = run_cli("covidct-train", local, "--init", not_a_run, "--out", tmp_path / "o1")
    assert r.returncode == 2 and "not a covidct-train run directory" in r.stderr and not (tmp_path / "o1").exists()

    import shutil
    changed = tmp_path / "changed"
    shutil.copytree(trained_run["run"], changed)
    with open(changed / "model.keras", "ab") as f:
        f.write(b"\0")
    r = run_cli("covidct-train", local, "--init", changed, "--out", tmp_path / "o2")
    assert r.returncode == 2 and "changed since training" in r.stderr and not (tmp_path / "o2").exists()

    alien = tmp_path / "alien"
    shutil.copytree(trained_run["run"], alien)
    contract = json.loads((alien / "contract.json").read_text())
    contract["architecture"] = "vit-huge"
    (alien / "contract.json").write_text(json.dumps(contract))
    r = run_cli("covidct-train", local, "--init", alien, "--out", tmp_path / "o3")
    assert r.returncode == 2 and "cannot be adapted" in r.stderr and not (tmp_path / "o3").exists()

    small = _site(tmp_path / "small", 9, seed=4)
    r = run_cli("covidct-train", small, "--init", trained_run["run"], "--out", tmp_path / "o4")
    assert r.returncode == 2 and "too small to adapt on" in r.stderr and "at least 10 of each" in r.stderr
    assert not (tmp_path / "o4").exists()

    r = run_cli("covidct-train", local, small, "--init", trained_run["run"], "--out", tmp_path / "o5")
    assert r.returncode == 2 and "exactly one LOCAL_DIR" in r.stderr

    r = run_cli("covidct-train", local, "--init", trained_run["run"], "--no-mix-style", "--out", tmp_path / "o6")
    assert r.returncode == 2 and "--mix-style is a training choice" in r.stderr and not (tmp_path / "o6").exists()


@pytest.mark.slow
def test_site_batch_norm_trains_per_site_and_merges_into_the_plain_model():
    import keras

    from covidct.train.model import build_compact, merge_site_norms

    size = (32, 32)
    model = build_compact(size, seed=0, sites=2)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, *size, 1)).astype(np.float32)
    site = np.eye(2, dtype=np.float32)[np.r_[np.zeros(8, int), np.ones(8, int)]]
    x[8:] = np.clip(x[8:] * 0.5 + 100, 0, 255)  # the second site exports another window
    model.compile(optimizer="adam", loss="binary_crossentropy")
    model.fit({"image": x, "site": site}, np.r_[np.zeros(8), np.ones(8)], epochs=1, verbose=0)
    bn = [l for l in model.layers if type(l).__name__ == "SiteBatchNorm"]
    assert bn and all(np.asarray(l.moving_mean).shape[0] == 2 for l in bn)
    first = np.asarray(bn[0].moving_mean)
    assert not np.allclose(first[0], first[1])  # each site's own statistics
    plain = merge_site_norms(model, size)
    assert [i.name for i in plain.inputs] == ["image"]
    merged = [l for l in plain.layers if isinstance(l, keras.layers.BatchNormalization)][0]
    mm, mv = np.asarray(bn[0].moving_mean), np.asarray(bn[0].moving_variance)
    assert np.allclose(merged.moving_mean, mm.mean(0)) and np.allclose(merged.moving_variance, mv.mean(0) + mm.var(0))
    # with both sites' norms made equal, the plain model is the site model exactly
    for layer in bn:
        w = layer.get_weights()
        layer.set_weights([np.repeat(v[:1], 2, axis=0) for v in w])
    same = merge_site_norms(model, size)
    a = model.predict({"image": x, "site": site}, verbose=0)
    b = same.predict(x, verbose=0)
    assert np.allclose(a, b, atol=1e-5)


def test_mix_style_mixes_slice_statistics_in_training_only():
    """MixStyle moves each slice's channel statistics towards another slice's in training and is the identity
    at inference: a model built with it predicts exactly as one without it, with the same weights."""
    from covidct.train.model import build_compact, mix_style

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (16, 8, 8, 4)).astype(np.float32)
    x[8:] = x[8:] * 5 + 20  # the second half: another site's contrast and level
    layer = mix_style(p=1.0, alpha=0.1, seed=0)
    assert np.array_equal(np.asarray(layer(x, training=False)), x)
    y = np.asarray(layer(x, training=True))
    means_in, means_out = x.mean(axis=(1, 2)), y.mean(axis=(1, 2))
    assert not np.allclose(means_in, means_out)
    # a slice mixed with a slice of the other half moved towards it: its level is no longer its own half's
    moved = np.abs(means_out - means_in).max(axis=1) > 1.0
    assert moved.any()

    size = (32, 32)
    with_ms, without = build_compact(size, seed=1), build_compact(size, seed=1, mixstyle=False)
    assert sum("mix_style" in l.name for l in with_ms.layers) == 3
    without.set_weights(with_ms.get_weights())
    img = rng.integers(0, 256, (4, *size, 1)).astype(np.float32)
    assert np.allclose(with_ms.predict(img, verbose=0), without.predict(img, verbose=0), atol=1e-6)
