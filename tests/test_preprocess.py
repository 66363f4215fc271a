"""The contract's site-invariant preprocessing keeps its promises; older models keep theirs."""

import dataclasses
import json

import cv2
import numpy as np
import pytest

from covidct.engine.contract import Contract, ContractError
from covidct.engine.decode import decode_and_resize, decode_frames
from covidct.engine.preprocess import LUNG_CROP_DEFAULTS, default_spec, lung_crop, preprocess
from covidct.train.synthetic import other_site, phantom_hu, render

SIZE = (128, 128)
SPEC = default_spec()


def _inputs(images):
    lung = [lung_crop(g, SIZE, cv2.INTER_AREA, SPEC)[0].astype(np.int16) for g in images]
    plain = [cv2.resize(g, SIZE[::-1], interpolation=cv2.INTER_AREA).astype(np.int16) for g in images]
    return lung, plain


def _tight(grey, hu):
    ys, xs = np.nonzero(hu > -500)  # the body's box: a thorax crop as the training set has it
    return grey[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_windows_give_nearly_the_same_input(seed):
    hu = phantom_hu(np.random.default_rng(seed), positive=bool(seed % 2))
    lung_window, wide_window = render(hu, -600, 1500), render(hu, -300, 2400)  # air+lungs mid grey in the wide one
    (a, b), (pa, pb) = _inputs([_tight(lung_window, hu), _tight(wide_window, hu)])
    ours, plain = float(np.abs(a - b).mean()), float(np.abs(pa - pb).mean())
    assert ours < 6, ours
    assert plain > 25, plain  # without it the two renderings are far apart: the test can fail


@pytest.mark.parametrize("seed", [3, 4])
def test_cropped_and_padded_with_table_and_round_fov_give_nearly_the_same_input(seed):
    hu = phantom_hu(np.random.default_rng(seed), positive=True)
    tight = _tight(render(hu, -600, 1500), hu)
    far = other_site(tight, table=True, round_fov=True, pad=1.5)
    (a, b), (pa, pb) = _inputs([tight, far])
    ours, plain = float(np.abs(a - b).mean()), float(np.abs(pa - pb).mean())
    assert ours < 12, ours
    assert plain > 25, plain
    # the lungs sit in the same place: their dark pixels overlap
    dark_a, dark_b = a < 60, b < 60
    assert (dark_a & dark_b).sum() / max(1, (dark_a | dark_b).sum()) > 0.8


def test_dicom_window_and_png_export_of_the_same_slice_agree(tmp_path):
    """DICOM goes through the contract's HU window, then the same preprocessing as a PNG."""
    pydicom = pytest.importorskip("pydicom")
    from tests.test_dicom import write_ct  # noqa: F401 (a DICOM writer shared with the DICOM tests)

    hu = phantom_hu(np.random.default_rng(5), positive=True)
    path = write_ct(tmp_path / "slice.dcm", hu)
    ok, png = cv2.imencode(".png", render(hu, -600, 1500))
    spec = {"window": {"level": -600.0, "width": 1500.0}, "preprocessing": SPEC}
    (d, _), = decode_frames(path.read_bytes(), SIZE, **spec)
    (p, _), = decode_frames(png.tobytes(), SIZE, **spec)
    assert np.abs(d.astype(int) - p).mean() < 1.0


def test_preprocessing_never_fails_on_strange_images():
    rng = np.random.default_rng(0)
    for g in (np.zeros((50, 70), np.uint8), np.full((300, 200), 255, np.uint8),
              rng.integers(0, 256, (256, 256), dtype=np.uint8), np.zeros((3, 3), np.uint8),
              np.tile(np.arange(256, dtype=np.uint8), (40, 1))):
        out, framing = lung_crop(g, SIZE, cv2.INTER_AREA, SPEC)
        assert out.shape == SIZE and out.dtype == np.uint8
        assert framing.fallback in (None, "no_body", "no_lungs")


def test_schema_1_contract_reads_as_resize_and_decodes_exactly_as_before():
    v1 = {"image_size": [64, 64], "class_names": ["neg", "pos"], "positive_class": "pos", "threshold": 0.5,
          "channels": 1, "interpolation": "area", "precision": "fp32", "input_name": "image",
          "output_name": "probability", "input_dtype": "uint8", "layout": "NHWC",
          "window": {"level": -600.0, "width": 1500.0}, "metrics": {}, "source_sha256": "", "project_version": "0.1.0",
          "schema_version": 1}
    c = Contract.from_json(json.dumps(v1))
    assert c.preprocessing == {"method": "resize"} and c.target_sensitivity is None
    grey = np.random.default_rng(0).integers(0, 256, (200, 150), dtype=np.uint8)
    ok, png = cv2.imencode(".png", grey)
    before = cv2.resize(grey, (64, 64), interpolation=cv2.INTER_AREA)  # what schema 1 decoding did
    assert np.array_equal(decode_and_resize(png.tobytes(), **c.decode_kwargs()), before)
    with pytest.raises(ContractError, match="schema 1 contract cannot carry"):
        Contract.from_json(json.dumps({**v1, "preprocessing": SPEC}))


def test_schema_2_contract_round_trip_and_bad_preprocessing_named():
    c = Contract(image_size=(96, 96), class_names=("a", "b"), positive_class="b", threshold=0.4,
                 target_sensitivity=0.95, architecture="compact")
    assert c.schema_version == 2 and c.preprocessing == SPEC
    assert Contract.from_json(c.to_json()) == c
    for bad, words in [({"method": "magic"}, "preprocessing.method"),
                       ({**SPEC, "dark_to": 250}, "dark_to < tissue_to"),
                       ({**SPEC, "warp": 1}, "unknown parameters"),
                       ({k: v for k, v in SPEC.items() if k != "margin"}, "lacks parameters")]:
        with pytest.raises(ContractError, match=words):
            Contract(image_size=(96, 96), class_names=("a", "b"), positive_class="b", threshold=0.4, preprocessing=bad)
    data = json.loads(c.to_json())
    del data["preprocessing"]
    with pytest.raises(ContractError, match="must say its preprocessing"):
        Contract.from_json(json.dumps(data))


def test_resize_method_is_plain_resize():
    grey = np.random.default_rng(1).integers(0, 256, (90, 120), dtype=np.uint8)
    out, framing = preprocess(grey, (32, 48), cv2.INTER_LINEAR, {"method": "resize"})
    assert framing is None and np.array_equal(out, cv2.resize(grey, (48, 32), interpolation=cv2.INTER_LINEAR))


def test_defaults_are_the_contracts_parameters():
    assert set(SPEC) == {"method", *LUNG_CROP_DEFAULTS}


@pytest.mark.parametrize("shape", [(224, 296), (420, 500), (700, 800), (150, 180), (128, 128)])
def test_area_linear_has_areas_quality(shape):
    from covidct.engine.preprocess import INTER_AREA_LINEAR, resample

    hu = phantom_hu(np.random.default_rng(shape[0]), positive=True)
    smooth = cv2.resize(render(hu, -600, 1500), shape[::-1], interpolation=cv2.INTER_AREA)
    ours = resample(smooth, SIZE[::-1], INTER_AREA_LINEAR).astype(np.int16)
    area = cv2.resize(smooth, SIZE[::-1], interpolation=cv2.INTER_AREA).astype(np.int16)
    assert ours.shape == SIZE and float(np.abs(ours - area).mean()) < 1.5
    # from twice the size on, anti-aliased: one-pixel stripes (the worst case) keep under half of what
    # bilinear alone leaves of them (area's own factor is never below 2 there; below 2 both are bilinear)
    stripes = np.zeros(shape, np.uint8)
    stripes[:, ::2] = 255
    flat = resample(stripes, SIZE[::-1], INTER_AREA_LINEAR)
    if min(shape[0] / SIZE[0], shape[1] / SIZE[1]) >= 2:
        assert float(flat.std()) < 0.5 * float(cv2.resize(stripes, SIZE[::-1], interpolation=cv2.INTER_LINEAR).std())
    if shape == SIZE:
        assert np.array_equal(resample(smooth, SIZE[::-1], INTER_AREA_LINEAR), smooth)


def test_new_contracts_name_area_linear_and_one_naming_none_reads_as_area():
    from covidct.engine.contract import DEFAULT_INTERPOLATION, EARLIER_INTERPOLATION
    from covidct.train.fit import TrainConfig

    assert DEFAULT_INTERPOLATION == "area-linear" and EARLIER_INTERPOLATION == "area"
    assert {f.name: f.default for f in dataclasses.fields(TrainConfig)}["interpolation"] == DEFAULT_INTERPOLATION
    c = Contract(image_size=(64, 64), class_names=("n", "p"), positive_class="p", threshold=0.5)
    assert c.interpolation == "area-linear"
    data = json.loads(c.to_json())
    del data["interpolation"]
    assert Contract.from_json(json.dumps(data)).interpolation == "area"
    grey = np.random.default_rng(1).integers(0, 256, (300, 200), dtype=np.uint8)
    png = cv2.imencode(".png", grey)[1].tobytes()
    old = Contract.from_json(json.dumps({**data, "preprocessing": {"method": "resize"}}))
    assert np.array_equal(decode_and_resize(png, **old.decode_kwargs()),
                          cv2.resize(grey, (64, 64), interpolation=cv2.INTER_AREA))


def test_area_reduction_by_an_integer_factor_is_opencvs_area_to_the_byte():
    """The float32 path for a factor 4 (faster than OpenCV's 8-bit one, which is vectorised for a factor 2
    only) must give OpenCV's INTER_AREA bytes, ties (a sum ending in half a grey level) included."""
    from covidct.engine.preprocess import _FLOAT_AREA_MAX, _area_by

    rng = np.random.default_rng(3)
    shapes = [(512, 512), (513, 519), (301, 403), (8, 12), (1024, 1024), (1025, 1030)]
    for shape in shapes:
        for img in (rng.integers(0, 256, shape, dtype=np.uint8), np.full(shape, 255, np.uint8),
                    (rng.random(shape) < 0.5).astype(np.uint8) * 255):
            for f in (2, 3, 4, 5, 8):
                hh, ww = shape[0] // f, shape[1] // f
                want = cv2.resize(img[:hh * f, :ww * f], (ww, hh), interpolation=cv2.INTER_AREA)
                got = _area_by(img, f)
                assert got.dtype == np.uint8 and got.shape == want.shape, (shape, f)
                assert np.array_equal(got, want), (shape, f, int((got != want).sum()))
    assert (1025 * 1030) > _FLOAT_AREA_MAX >= 1024 * 1024  # both paths were compared above


def test_components_areas_and_the_lung_box_are_opencvs_statistics():
    """Labels and areas without OpenCV's statistics (a third of the cost) are the same labels and areas, for
    both label types; the lung box is the bounding box of the lung fields' pixels."""
    from covidct.engine.preprocess import _components, find_body_and_lungs

    rng = np.random.default_rng(5)
    for shape in [(128, 128), (96, 128), (400, 400)]:  # 400x400: 32-bit labels
        for density in (0.05, 0.3, 0.6):
            mask = (cv2.GaussianBlur(rng.random(shape).astype(np.float32), (5, 5), 0) < density * 0.9 + 0.05)
            mask = mask.astype(np.uint8)
            n, lab, areas = _components(mask)
            ltype = cv2.CV_16U if mask.size < (1 << 17) else cv2.CV_32S
            n2, lab2, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(mask, 8, ltype, cv2.CCL_SPAGHETTI)
            assert n == n2 and np.array_equal(lab, lab2)
            assert np.array_equal(areas, stats[:, cv2.CC_STAT_AREA]), shape
    for blobs in range(8):  # few components (a working copy's usual case: counted label by label) and more
        mask = np.zeros((128, 128), np.uint8)
        for b in range(blobs):
            cv2.circle(mask, (int(rng.integers(8, 120)), int(rng.integers(8, 120))), int(rng.integers(1, 9)), 1, -1)
        n, lab, areas = _components(mask)
        n2, lab2, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(mask, 8, cv2.CV_16U, cv2.CCL_SPAGHETTI)
        assert n == n2 and np.array_equal(lab, lab2) and np.array_equal(areas, stats[:, cv2.CC_STAT_AREA]), blobs
        assert areas.dtype == np.int64
    for seed in range(6):
        hu = phantom_hu(np.random.default_rng(seed), positive=bool(seed % 2))
        small = cv2.resize(render(hu, -600, 1500), (128, 128), interpolation=cv2.INTER_AREA)
        body, box, _, lungs = find_body_and_lungs(small)
        assert box is not None and lungs is not None, seed
        ys, xs = np.nonzero(lungs)
        assert box == (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1), seed
