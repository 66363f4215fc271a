"""The shift alarm: quiet on data like the reference, fires on another site's export, and quiet on
DICOM rendered through the contract's window. Synthetic HU phantoms, so each case is controlled."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from covidct.engine.contract import Contract
from covidct.engine.decode import decode_inputs
from covidct.engine.shift import (DECIDING, IN_RANGE, MIN_SLICES, NO_REFERENCE, SHIFTED, STATS, TOO_FEW, Histograms, compare,
                          slice_stats)
from tests.conftest import read_rows, run_cli, tiny_model
from covidct.train.synthetic import other_site, phantom_hu, render

SIZE = (96, 96)
LUNG = {"level": -600.0, "width": 1500.0}  # the contract's window, and the reference site's export window


def _phantoms(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [phantom_hu(rng, positive=bool(k % 2), size=(256, 256)) for k in range(n)]


def _png(grey: np.ndarray) -> bytes:
    return cv2.imencode(".png", grey)[1].tobytes()


@pytest.fixture(scope="module")
def model_with_reference(tmp_path_factory) -> Path:
    """A tiny model whose contract carries a reference made from 120 lung-window phantoms."""
    base = Contract(image_size=SIZE, class_names=("neg", "pos"), positive_class="pos", threshold=0.5, window=LUNG)
    hist = Histograms()
    for hu in _phantoms(100, 120):
        for img, _, framing in decode_inputs(_png(render(hu, **LUNG)), **base.decode_kwargs()):
            hist.add(slice_stats(img, framing), float(img.mean() / 255.0))
    contract = Contract(**{**base.__dict__, "reference": hist.to_reference("synthetic lung-window phantoms")})
    return tiny_model(tmp_path_factory.mktemp("m") / "tiny.onnx", SIZE, contract=contract)


def _screen(model: Path, inputs: Path, out: Path) -> dict:
    r = run_cli("covidct-batch", inputs, "--model", model, "--out", out, "--no-progress", "--group-by", "parent",
                timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert "SHIFT ALARM" in r.stdout and run["shift"]["verdict"] in r.stdout
    return run


def test_alarm_rule_on_histograms():
    ref_hist, same, far = Histograms(), Histograms(), Histograms()
    rng = np.random.default_rng(0)
    base = {"dark_anchor": 80, "tissue_anchor": 225, "lung_fraction": 0.5, "input_mean": 110, "input_detail": 15}
    for _ in range(300):
        ref_hist.add({k: v + rng.normal(0, 4 if k != "lung_fraction" else 0.05) for k, v in base.items()}, 0.5)
    for _ in range(200):
        same.add({k: v + rng.normal(0, 4 if k != "lung_fraction" else 0.05) for k, v in base.items()}, 0.9)
        far.add({**{k: v + rng.normal(0, 4 if k != "lung_fraction" else 0.05) for k, v in base.items()},
                 "dark_anchor": 140 + rng.normal(0, 4)}, 0.5)
    ref = ref_hist.to_reference("test")
    assert compare(ref, same)["verdict"] == IN_RANGE  # probabilities differ (prevalence): never the verdict
    assert compare(ref, same)["prediction_shift"]["ks"] > 0.5
    r = compare(ref, far)
    assert r["verdict"] == SHIFTED and r["shifted_stats"] == ["dark_anchor"] and r["score"] > 0.9
    content = Histograms()  # disease moves lung fraction and input mean: information, not a verdict
    for _ in range(200):
        content.add({**base, "lung_fraction": 0.1 + rng.normal(0, 0.02), "input_mean": 170 + rng.normal(0, 4),
                     "dark_anchor": base["dark_anchor"] + rng.normal(0, 4),
                     "tissue_anchor": base["tissue_anchor"] + rng.normal(0, 4),
                     "input_detail": base["input_detail"] + rng.normal(0, 4)})
    r = compare(ref, content)
    assert r["stats"]["lung_fraction"]["ks"] > 0.9 and r["verdict"] == IN_RANGE
    few = Histograms()
    for _ in range(MIN_SLICES - 1):
        few.add({**base, "dark_anchor": 200}, 0.5)
    assert compare(ref, few)["verdict"] == TOO_FEW
    assert compare(None, same)["verdict"] == NO_REFERENCE
    assert set(DECIDING) < set(STATS)


def test_quiet_on_like_data_fires_on_another_site_quiet_on_windowed_dicom(model_with_reference, tmp_path):
    from tests.test_dicom import write_ct

    held_out = _phantoms(7, 40)
    like, other, dicom = (tmp_path / n for n in ("like", "other site", "dicom"))
    for d in (like, other, dicom):
        d.mkdir()
    for k, hu in enumerate(held_out):
        lung = render(hu, **LUNG)
        cv2.imwrite(str(like / f"s{k:03d}.png"), lung)
        # another hospital: a wide window (air and lungs mid grey), the whole field of view, a table, a round FOV
        wide = render(hu, level=-200.0, width=2600.0)
        cv2.imwrite(str(other / f"s{k:03d}.png"), other_site(wide, table=True, round_fov=True, pad=1.4))
        write_ct(dicom / f"s{k:03d}.dcm", hu)

    quiet = _screen(model_with_reference, like, tmp_path / "o-like")["shift"]
    fired = _screen(model_with_reference, other, tmp_path / "o-other")["shift"]
    dcm = _screen(model_with_reference, dicom, tmp_path / "o-dicom")["shift"]
    assert quiet["verdict"] == IN_RANGE and quiet["slices"] == 40, quiet
    assert fired["verdict"] == SHIFTED and fired["score"] > 0.5, fired
    assert dcm["verdict"] == IN_RANGE and dcm["slices"] == 40, dcm

    # the banner is visible in the report, and each study (here: the folder) carries its own verdict
    html = (tmp_path / "o-other" / "report.html").read_text()
    assert 'id="shift"' in html and 'class="shifted"' in html and "may not be reliable" in html
    assert 'class="inrange"' in (tmp_path / "o-like" / "report.html").read_text()
    import pyarrow.parquet as pq
    st = pq.read_table(tmp_path / "o-other" / "studies.parquet").to_pandas()
    assert (st[st.level == "study"].shift_verdict == SHIFTED).all()
    rows = read_rows(tmp_path / "o-like")
    assert rows.input_detail.notna().all() and rows.framing.isna().all()


def test_model_without_reference_still_screens_and_says_so(tmp_path):
    model = tiny_model(tmp_path / "plain.onnx", SIZE)
    d = tmp_path / "in"
    d.mkdir()
    for k, hu in enumerate(_phantoms(3, 5)):
        cv2.imwrite(str(d / f"{k}.png"), render(hu, **LUNG))
    run = _screen(model, d, tmp_path / "out")
    assert run["shift"]["verdict"] == NO_REFERENCE and run["counts"]["ok"] == 5
