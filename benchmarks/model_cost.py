"""Per-image cost of the default model beside the seeds' CNN, and of the contract's preprocessing.

    python -m benchmarks.model_cost              # writes benchmarks/results/model-cost-<cores>core-cpu.{json,md}

Both architectures are exported through covidct-export's converter with random weights (the
cost of a forward pass does not depend on the weights) and timed in ONNX Runtime on one thread
and on every core, batch 32, best of several passes, in this one invocation. Preprocessing is
timed on one core over real slices from ``../shared/data`` (synthetic phantoms when absent):
decode alone, decode + plain resize (schema 1), decode + lung-crop; the added cost is the
difference, measured interleaved so that both see the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.compare import RESULTS, SHARED, best_of, machine


def model_costs(repeats: int = 7) -> list[dict]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import onnxruntime as ort

    from covidct.engine.contract import Contract
    from covidct.export.convert import keras_to_onnx
    from covidct.train.fit import ARCH_DEFAULTS
    from covidct.train.model import build_model

    rows = []
    for arch in ("seed", "compact"):
        size = ARCH_DEFAULTS[arch]["image_size"]
        model = build_model(size, 0, arch)
        contract = Contract(image_size=size, class_names=("neg", "pos"), positive_class="pos", threshold=0.5)
        proto = keras_to_onnx(model, contract).SerializeToString()
        x = np.random.default_rng(0).integers(0, 256, (32, *size, 1), dtype=np.uint8)
        row = {"arch": arch, "image_size": list(size), "parameters": int(model.count_params()),
               "onnx_mb": round(len(proto) / 2**20, 2)}
        for threads in (1, os.cpu_count()):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
            sess = ort.InferenceSession(proto, opts, providers=["CPUExecutionProvider"])
            sess.run(None, {"image": x})
            row[f"ms_per_image_{threads}_thread{'s' if threads > 1 else ''}"] = round(
                best_of(lambda: sess.run(None, {"image": x}), repeats) / len(x) * 1e3, 3)
        rows.append(row)
    return rows


def _slices(limit: int) -> tuple[list[bytes], str]:
    files = sorted(p for d in ("sarscov2-ct-subset", "ucsd-covid-ct") for p in (SHARED / d).rglob("*") if p.is_file())
    if files:
        step = max(1, len(files) // limit)
        return [p.read_bytes() for p in files[::step][:limit]], f"{min(limit, len(files))} real slices from {SHARED}"
    from covidct.train.synthetic import phantom
    rng = np.random.default_rng(0)
    return ([cv2.imencode(".png", phantom(rng, bool(k % 2), (360, 480)))[1].tobytes() for k in range(limit)],
            f"{limit} synthetic phantoms (no ../shared/data)")


def preprocessing_cost(limit: int = 400, rounds: int = 5, size=(192, 192)) -> dict:
    from covidct.engine.contract import DEFAULT_INTERPOLATION, INTERPOLATIONS
    from covidct.engine.decode import decode_grey_frames, resize
    from covidct.engine.preprocess import default_spec

    cv2.setNumThreads(1)  # one core, as in a decode task
    data, source = _slices(limit)
    greys = [decode_grey_frames(d)[0][0] for d in data]
    from covidct.engine.preprocess import preprocess
    from covidct.engine.shift import slice_stats

    spec = default_spec()
    framed = [preprocess(g, size, INTERPOLATIONS[DEFAULT_INTERPOLATION], spec) for g in greys]
    steps = {
        "decode": lambda: [decode_grey_frames(d) for d in data],
        "resize": lambda: [resize(g, size, DEFAULT_INTERPOLATION, None) for g in greys],
        "lung_crop": lambda: [resize(g, size, DEFAULT_INTERPOLATION, spec) for g in greys],
        "shift_stats": lambda: [slice_stats(x, f) for x, f in framed],
    }
    best = {k: float("inf") for k in steps}
    for _ in range(rounds):  # interleaved: every step sees the same moments of a shared machine
        for k, fn in steps.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], (time.perf_counter() - t) / len(data) * 1e3)
    ms = {k: round(v, 3) for k, v in best.items()}
    return {"source": source, "image_size": list(size), "ms_per_image_one_core": ms,
            "added_by_lung_crop_ms": round(best["lung_crop"] - best["resize"], 3),
            "lung_crop_over_resize": round(best["lung_crop"] / best["resize"], 2),
            "added_over_decode": round((best["lung_crop"] - best["resize"]) / best["decode"], 2),
            "shift_stats_ms": round(best["shift_stats"], 4)}


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Model and preprocessing cost ({m['cores']} cores, {m['cpu']}; CPU flags: "
             f"{', '.join(m['cpu_flags']) or 'none listed'})", "",
             "| architecture | input | parameters | ONNX MB | ms/image, 1 thread | ms/image, all cores |",
             "|---|---|---|---|---|---|"]
    all_cores = f"ms_per_image_{m['cores']}_threads" if m["cores"] > 1 else "ms_per_image_1_thread"
    for row in r["models"]:
        lines.append(f"| {row['arch']} | {row['image_size'][0]}x{row['image_size'][1]} | {row['parameters']:,} | "
                     f"{row['onnx_mb']} | {row['ms_per_image_1_thread']} | {row[all_cores]} |")
    c = r["compact_over_seed_1_thread"]
    p = r["preprocessing"]
    ms = p["ms_per_image_one_core"]
    lines += ["", f"Default (compact) / seeds' CNN, one thread: **{c}x** the cost per image.", "",
              f"Preprocessing on one core over {p['source']}, output {p['image_size'][0]}x{p['image_size'][1]}:", "",
              "| step | ms/image |", "|---|---|",
              f"| decode (bytes to grey) | {ms['decode']} |", f"| plain resize (schema 1) | {ms['resize']} |",
              f"| lung-crop (default) | {ms['lung_crop']} |",
              f"| **added by lung-crop** | **{p['added_by_lung_crop_ms']}** |",
              f"| shift alarm statistics | {p['shift_stats_ms']} |", "",
              f"The shift statistics are {r['shift_stats_share_of_work']:.2%} of one core's work per slice "
              "(decode + lung-crop + the default model on one thread).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=400, help="slices for the preprocessing timing")
    args = ap.parse_args()
    report = {"machine": machine(), "models": model_costs(), "preprocessing": preprocessing_cost(args.images)}
    seed, compact = (next(r for r in report["models"] if r["arch"] == a) for a in ("seed", "compact"))
    report["compact_over_seed_1_thread"] = round(compact["ms_per_image_1_thread"] / seed["ms_per_image_1_thread"], 3)
    ms = report["preprocessing"]["ms_per_image_one_core"]
    per_image = ms["decode"] + ms["lung_crop"] + compact["ms_per_image_1_thread"]  # one core's work per slice
    report["shift_stats_share_of_work"] = round(report["preprocessing"]["shift_stats_ms"] / per_image, 4)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"model-cost-{report['machine']['cores']}core-cpu"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
