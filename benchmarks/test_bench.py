"""pytest-benchmark checks: decode+resize, one predictor batch, a small end-to-end run.

``pytest benchmarks/ --benchmark-enable`` (or ``--benchmark-only``) times them; the default test
run executes each once at a small size. Assertions compare timings taken in the same test,
never absolute times: the machines are shared and noisy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from covidct.engine.decode import decode_and_resize, decode_file
from benchmarks.compare import best_of, best_of_paired
from covidct.export.tiny import tiny_model

SIZE = (256, 256)


@pytest.fixture(scope="module")
def jpeg512() -> bytes:
    from covidct.train.synthetic import phantom
    img = phantom(np.random.default_rng(0), positive=True, size=(512, 512))
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def test_decode_resize(benchmark, jpeg512):
    benchmark.extra_info.update(image_size=list(SIZE), source="512x512 JPEG", interpolation="area")
    out = benchmark(decode_and_resize, jpeg512, SIZE, "area")
    assert out.shape == SIZE
    # our checks (format sniffing, header size, end marker) cost little beside OpenCV's own work; the two
    # are timed in turn (a clean-clone CI run timed them one after the other and caught a busy moment on
    # one side only: 1.03 against 0.56 ms, where this machine measures 1.05x)
    buf = np.frombuffer(jpeg512, np.uint8)
    t = best_of_paired({
        "raw": lambda: cv2.resize(cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE), SIZE, interpolation=cv2.INTER_AREA),
        "ours": lambda: decode_and_resize(jpeg512, SIZE, "area"),  # the same resize as raw's
    }, 60)
    raw, ours = t["raw"], t["ours"]
    assert ours <= 1.5 * raw, (ours, raw)


#: The input path per slice on one core (read, decode, lung-crop, resize, shift statistics) against
#: the decoder alone of the same bytes (``cv2.imdecode``; for DICOM pydicom's ``pixel_array``). The
#: issue's target is 1.5x; see ``benchmarks/results/decode-path-*.md`` for what each CPU class reaches.
#: These bounds hold what is reached, with room for other CPU classes, so that a slower input path
#: fails here; the report names what is still short of 1.5.
INPUT_PATH_BOUND = {"jpeg": 3.0, "png": 2.0, "dicom": 4.0}


def test_input_path_against_the_decoder_alone(benchmark, tmp_path):
    from benchmarks.decode_path import measure_file
    from covidct.train.synthetic import make_archive

    files = {"jpeg": make_archive(tmp_path / "ct", 3, size=(512, 512))}
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "sarscov2-ct-subset"
    pngs = sorted(shared.rglob("*.png"))[:3]
    if pngs:
        files["png"] = pngs
    dicoms = sorted((shared.parent / "tcia-covid19-ny-sbu-dicom").rglob("*.dcm"))[:3]
    if dicoms:
        files["dicom"] = dicoms
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one core, as each worker runs
    try:
        got = benchmark.pedantic(lambda: {k: sorted(measure_file(p, repeats=10)["ratio"] for p in ps)[len(ps) // 2]
                                          for k, ps in files.items()}, rounds=1, iterations=1)
    finally:
        cv2.setNumThreads(threads)
    benchmark.extra_info.update(ratios=got, target=1.5,
                                real=[k for k in files if k != "jpeg"] or "absent: ../shared/data")
    for kind, ratio in got.items():
        assert ratio <= INPUT_PATH_BOUND[kind], (kind, got)


def test_predictor_batch(benchmark, default_arch_models):
    """The default model in batches of 32 costs at most 1.5x per image what one call per image costs, timed
    interleaved here. Whether batching wins depends on the CPU: on an AVX-512/AMX machine a toy model ran
    faster one image at a time, and on the 2-core Intel Xeon without AMX (2026-12-07) the default model in
    batches of 32 took 0.97-1.22x the per-image time of single calls (one failed run of the earlier 1.1x
    bound; 32 slices' activations outgrow a core's cache). So no winner is assumed: the bound catches a
    batch path gone badly wrong (a copy or a conversion per image), not a CPU's preference."""
    from covidct.engine.predictor import Predictor

    fp32, size = default_arch_models
    p = Predictor(str(fp32), threads=1, device="cpu")
    x = np.random.default_rng(0).integers(0, 256, (32, *size, 1), dtype=np.uint8)
    benchmark.extra_info.update(batch_size=32, provider=p.provider, image_size=list(size))
    probs, _ = benchmark.pedantic(p.predict, args=(x,), rounds=3, iterations=1)
    assert probs.shape == (32,)
    batched, single = float("inf"), float("inf")
    for _ in range(5):  # interleaved: both see the same moments of a shared machine
        batched = min(batched, best_of(lambda: p.predict(x), 1) / 32)
        single = min(single, best_of(lambda: [p.predict(x[i:i + 1]) for i in range(32)], 1) / 32)
    benchmark.extra_info.update(batched_ms=batched * 1e3, single_ms=single * 1e3)
    assert batched <= 1.5 * single, (batched, single)


def test_small_end_to_end(benchmark, tmp_path):
    from covidct.train.synthetic import make_archive

    paths = make_archive(tmp_path / "arch", 400, size=(256, 256), per_folder=100)
    model = tiny_model(tmp_path / "m.onnx", SIZE)
    out = tmp_path / "o"

    def screen():
        r = subprocess.run([str(Path(sys.executable).parent / "covidct-batch"), str(tmp_path / "arch"), "--model",
                            str(model), "--out", str(out), "--overwrite", "--no-progress", "--num-cpus", "2"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads((out / "run.json").read_text())

    run = benchmark.pedantic(screen, rounds=1, iterations=1)
    benchmark.extra_info.update(images=len(paths), provider=run["execution_providers"], batch_size=32,
                                image_size=list(SIZE))
    assert run["counts"]["ok"] == len(paths)
    # the same files through a plain loop (decode + the same model), timed in this test
    from covidct.engine.predictor import Predictor
    pred = Predictor(str(model), threads=1, device="cpu")
    t = time.perf_counter()
    for i in range(0, len(paths), 32):
        pred.predict(np.stack([decode_file(p, SIZE) for p in paths[i:i + 32]])[..., None])
    loop_rate = len(paths) / (time.perf_counter() - t)
    # with a model this cheap, Ray's per-batch hand-offs dominate: stay within an order of magnitude
    assert run["steady_images_per_s"] >= 0.1 * loop_rate, (run["steady_images_per_s"], loop_rate)


@pytest.mark.slow  # converts the seeds' 126 MB model with tf2onnx: about a minute on 2 cores
def test_default_model_costs_no_more_than_the_seeds_cnn(benchmark):
    """Model-quality issue: the default (compact, 192x192) must cost no more per image than the seeds'
    CNN (256x256) in ONNX Runtime. Both are timed here, one thread, batch 32."""
    from benchmarks.model_cost import model_costs

    rows = benchmark.pedantic(model_costs, kwargs={"repeats": 3}, rounds=1, iterations=1)
    seed, compact = (next(r for r in rows if r["arch"] == a) for a in ("seed", "compact"))
    benchmark.extra_info.update(seed_ms=seed["ms_per_image_1_thread"], compact_ms=compact["ms_per_image_1_thread"])
    assert compact["ms_per_image_1_thread"] <= seed["ms_per_image_1_thread"], rows  # measured 0.36-0.46x
    assert compact["parameters"] < seed["parameters"] / 10


def test_lung_crop_and_shift_statistics_cost_little_beside_decoding(benchmark, default_arch_models):
    """lung-crop's added cost and the shift statistics, against decoding the same slices in the same run.

    The statistics (0.05-0.08 ms) are held to 2% of one core's work per slice, as the README states it:
    decode, lung-crop and the default model's inference, all measured here (the median of three). Against
    decode + lung-crop alone they took 1.5-2.0% on the AVX2 machine and 2.2% on the AVX-512/AMX one, whose
    decoding is faster: that share is recorded, not held."""
    from benchmarks.model_cost import preprocessing_cost
    from covidct.engine.predictor import Predictor

    fp32, size = default_arch_models
    p = Predictor(str(fp32), threads=1, device="cpu")
    x = np.random.default_rng(0).integers(0, 256, (32, *size, 1), dtype=np.uint8)
    runs = [benchmark.pedantic(preprocessing_cost, kwargs={"limit": 60, "rounds": 5}, rounds=1, iterations=1)]
    runs += [preprocessing_cost(limit=60, rounds=5) for _ in range(2)]
    infer_ms = best_of(lambda: p.predict(x), 5) / 32 * 1e3
    r = runs[0]
    ms = r["ms_per_image_one_core"]
    pre = [x_["ms_per_image_one_core"]["decode"] + x_["ms_per_image_one_core"]["lung_crop"] for x_ in runs]
    benchmark.extra_info.update(infer_ms=round(infer_ms, 3), shift_share_of_decode_and_crop=sorted(
        round(x_["shift_stats_ms"] / d, 4) for x_, d in zip(runs, pre)))
    shares = sorted(x_["shift_stats_ms"] / (d + infer_ms) for x_, d in zip(runs, pre))
    benchmark.extra_info.update(**ms, added_ms=r["added_by_lung_crop_ms"], shift_stats_ms=r["shift_stats_ms"],
                                shift_stats_shares=[round(v, 4) for v in shares])
    assert r["added_by_lung_crop_ms"] <= 0.75 * ms["decode"], r  # measured 0.33-0.39x on real slices
    assert shares[1] <= 0.02, (runs, infer_ms)  # 2% of the slice's work, the median of three


@pytest.fixture(scope="module")
def default_arch_models(tmp_path_factory):
    """The default architecture (random weights: the cost is the same) in FP32 and its INT8 twin,
    written by covidct-export's converter and quantizer."""
    import onnx

    from covidct.engine.contract import Contract
    from covidct.engine.runtimes import int8_twin
    from covidct.export.convert import keras_to_onnx
    from covidct.export.quantize import quantize_int8
    from covidct.train.fit import ARCH_DEFAULTS
    from covidct.train.model import build_model
    from covidct.train.synthetic import phantom

    size = tuple(ARCH_DEFAULTS["compact"]["image_size"])
    contract = Contract(image_size=size, class_names=("neg", "pos"), positive_class="pos", threshold=0.5,
                        architecture="compact")
    proto = keras_to_onnx(build_model(size, 0, "compact"), contract)
    fp32 = tmp_path_factory.mktemp("models") / "m.onnx"
    onnx.save(proto, fp32)
    rng = np.random.default_rng(0)
    calibration = np.stack([phantom(rng, bool(k % 2), size) for k in range(32)])[..., None]
    onnx.save(quantize_int8(proto, calibration, contract)[0], int8_twin(fp32))
    return fp32, size


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_runtime_choice_is_never_slower_than_onnxruntime_fp32(benchmark, default_arch_models, precision,
                                                              tmp_path, monkeypatch):
    """Issue 10: whatever ``--runtime auto`` picks (runtime and, for ``--precision int8``, INT8 or the
    FP32 fallback), it runs the default model's batch at least as fast as ONNX Runtime FP32 does,
    timed interleaved in this test (10% allowed for a shared machine's noise)."""
    from covidct.engine import runtimes

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # measure now, not a cached choice
    fp32, size = default_arch_models
    choice = benchmark.pedantic(runtimes.choose, args=(fp32,), kwargs={"precision": precision, "threads": 1},
                                rounds=1, iterations=1)
    benchmark.extra_info.update(chosen=f"{choice.runtime}/{choice.precision}", cpu_flags=choice.cpu_flags,
                                measured_at_choice=choice.measured, notes=choice.notes)
    if (choice.runtime, choice.precision, Path(choice.model)) == (runtimes.ONNXRUNTIME, runtimes.FP32, fp32):
        # the reference itself was chosen: two sessions of one model differ by up to 20% on a shared machine,
        # so there is nothing to time; the choice must follow from what it measured
        m = choice.measured
        assert choice.source == "measured" and all(v < runtimes.MARGIN * m["onnxruntime/fp32"] for k, v in m.items()
                                                   if k != "onnxruntime/fp32"), choice.to_dict()
        return
    chosen = runtimes.load(choice.model, choice.runtime, choice.precision, threads=1)
    reference = runtimes.load(str(fp32), runtimes.ONNXRUNTIME, runtimes.FP32, threads=1)
    x = np.random.default_rng(1).integers(0, 256, (32, *size, 1), dtype=np.uint8)
    rate = runtimes.speeds({"chosen": chosen, "onnxruntime/fp32": reference}, x, rounds=15, budget_s=20.0)
    ratio = rate["chosen"] / rate["onnxruntime/fp32"]
    benchmark.extra_info.update(ratio=round(ratio, 3))
    assert ratio >= 0.9, (choice.to_dict(), rate)


def test_reports_of_two_vendors_with_the_same_flags_keep_apart(tmp_path):
    """An AMD EPYC and an Intel Xeon of this project both list avx2 fma avx512f avx512_vnni avx_vnni avx512_bf16:
    a report is named by the flags, and ``--tag`` keeps one vendor's beside the other's instead of over it."""
    from benchmarks.compare import result_stem

    flags = ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16"]
    amd = result_stem(tmp_path, "compare", {"cores": 2, "gpu": None, "cpu_flags": flags})
    intel = result_stem(tmp_path, "compare", {"cores": 2, "gpu": None, "cpu_flags": flags}, "intel")
    assert amd.name == "compare-2core-avx512-vnni-bf16" and intel.name == "compare-2core-avx512-vnni-bf16-intel"
    assert result_stem(tmp_path, "compare", {"cores": 2, "gpu": "H100", "cpu_flags": flags}).name == "compare-2core-gpu"
    assert result_stem(tmp_path, "decode-path", {"cpu_flags": [*flags, "amx_int8"]}, "-x").name == \
        "decode-path-avx512-vnni-bf16-amx-x"


def test_the_real_slice_archive_holds_the_shared_sets_own_files(tmp_path):
    """``compare --real N``: N files copied from the labelled sets' own slices, each its own file, found by the
    contenders' listing (PNG included) as by covidct-batch."""
    from benchmarks.compare import SHARED, make_real_archive, real_sources
    from benchmarks.contenders import list_images

    sources = real_sources()
    if not sources:
        pytest.skip(f"no real slices in {SHARED} (the shared data is absent)")
    root = make_real_archive(tmp_path / "real", 5)
    files = list_images(root)
    assert len(files) == 5 and len(set(files)) == 5
    assert Path(files[0]).read_bytes() == sources[0].read_bytes()
    assert make_real_archive(tmp_path / "real", 5) == root and len(list_images(root)) == 5  # made once
    # nothing else in it: covidct-batch screens every file of a folder, and a marker inside was one row too many
    assert sorted(str(p) for p in root.rglob("*") if p.is_file()) == files


def test_paired_rounds_report_the_median_ratio_and_the_targets_use_it(monkeypatch, tmp_path):
    """``compare --add-pairs K``: covidct-batch and the per-core loops in turn, K rounds a precision; the
    targets judge the median of the rounds' ratios, not one round (a shared machine's speed moves
    between runs). The two contenders are stood in for by fixed figures here."""
    from benchmarks import compare

    # covidct-batch per round (FP32 three, then INT8 three); the loops 100: each first round's verdict is the
    # median's opposite
    steady = iter([85.0, 95.0, 92.0, 99.0, 70.0, 80.0])
    e2e = iter([86.0, 80.0, 84.0, 70.0, 90.0, 88.0])
    monkeypatch.setattr(compare, "covidct_batch", lambda archive, model, out, extra: {
        "images_per_s": next(steady), "end_to_end_images_per_s": next(e2e), "runtime": "openvino",
        "precision": extra[1]})
    monkeypatch.setattr(compare, "contender", lambda name, archive, model, work, precision, runtime: {
        "images_per_s": 100.0, "end_to_end_images_per_s": 100.0})
    pairs = compare.paired_rounds(tmp_path, tmp_path, tmp_path / "model.onnx", 3)
    assert [round(r["steady"], 2) for r in pairs["fp32"]["rounds"]] == [0.85, 0.95, 0.92]
    assert round(pairs["fp32"]["steady"], 2) == 0.92 and round(pairs["fp32"]["end_to_end"], 2) == 0.84
    assert round(pairs["int8"]["steady"], 2) == 0.80 and round(pairs["int8"]["end_to_end"], 2) == 0.88
    report = {"n": 20000, "machine": {"cpu_flags": ["avx2"], "gpu": None}, "by_arch": {}, "pairs": pairs,
              "pairs_arch": "compact"}
    verdicts = {t["target"]: t["met"] for t in compare.targets(report) if "median" in t["target"]}
    assert list(verdicts.values()) == [True, False, False, True], verdicts
    assert "| fp32 | **median** | | | **0.920** | **0.840** |" in compare.markdown(
        {**report, "targets": compare.targets(report), "date": "-", "command": "-",
         "machine": {**report["machine"], "cores": 2, "cpu": "-", "onnxruntime": "-", "ray": "-", "opencv": "-",
                     "python": "-"}})
