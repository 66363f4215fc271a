"""What a user could run instead of covidct-batch, each timed the same way.

Run one per process (``python -m benchmarks.contenders NAME --archive DIR --model M.onnx
--keras RUN_DIR --out DIR``); it prints one JSON line with images, seconds and latencies.
Every contender runs the same model. All but ``seeds_way`` make its inputs with the engine's
decode function (the contract's preprocessing); ``seeds_way`` is the seeds' script as they ran it,
TensorFlow's reader and resize, which skips a contract's lung-crop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from covidct.engine.cluster import DEFAULT_BATCH_SIZE  # no more than the stdlib: the loops' RSS is their own
from covidct.engine.contract import read_contract
from covidct.engine.decode import decode_file


def list_images(archive: Path) -> list[str]:
    """The archive's slices: JPEG (the synthetic archives), DICOM (``benchmarks.compare.make_dicom_archive``) or
    real PNG/JPEG slices (``benchmarks.compare.make_real_archive``)."""
    return sorted(str(p) for p in Path(archive).rglob("*") if p.suffix in (".jpg", ".dcm", ".png", ".jpeg"))


def _session(model: str, threads: int):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _lat(per_image_ms: list[float]) -> dict:
    if not per_image_ms:
        return {}
    p50, p95, p99 = np.percentile(per_image_ms, [50, 95, 99])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3)}


def ceiling(args) -> dict:
    """The fastest runtime the project ships, alone on already-decoded uint8 tensors, all cores, best
    of batch sizes. ``--precision`` bf16 runs OpenVINO's BF16 hint on the FP32 file."""
    from covidct.engine.runtimes import BF16, ONNXRUNTIME, OPENVINO, load, openvino_installed

    c = read_contract(args.model)
    paths = list_images(args.archive)[: args.ceiling_images]
    x = np.stack([decode_file(p, **c.decode_kwargs()) for p in paths])[..., None]
    runtimes = ([ONNXRUNTIME] if args.precision != BF16 else []) + ([OPENVINO] if openvino_installed() else [])
    results = {}
    for rt in runtimes:
        backend = load(args.model, rt, args.precision, os.cpu_count())
        for bs in (8, 16, 32, 64):
            backend.run(x[:bs])  # warm-up
            lat, t = [], time.perf_counter()
            for i in range(0, len(x) - bs + 1, bs):
                t0 = time.perf_counter()
                backend.run(x[i:i + bs])
                lat.extend([(time.perf_counter() - t0) * 1e3 / bs] * bs)
            results[(rt, bs)] = {"images": len(lat), "seconds": time.perf_counter() - t, "latency_ms": _lat(lat)}
        del backend
    best = max(results, key=lambda k: results[k]["images"] / results[k]["seconds"])
    r = results[best]
    return {"images": r["images"], "seconds": r["seconds"], "runtime": best[0], "batch_size": best[1],
            "latency_ms": r["latency_ms"],
            "by_runtime_batch_size": {f"{k[0]}/{k[1]}": round(v["images"] / v["seconds"], 1)
                                      for k, v in results.items()}}


def plain_loop(args) -> dict:
    """One process: cv2 decode+resize, then the model in batches of ``--batch-size`` (ONNX Runtime unless ``--runtime``);
    ``--shard K/N`` takes every N-th file from the K-th."""
    from covidct.engine.runtimes import load

    c = read_contract(args.model)
    t_start = time.perf_counter()
    threads = args.threads or os.cpu_count()
    if threads == 1:
        import cv2
        cv2.setNumThreads(1)
    if args.runtime == "onnxruntime":  # a user's own session, ONNX Runtime's defaults
        sess = _session(args.model, threads)

        def run(x):
            return sess.run(None, {c.input_name: x})
    else:
        run = load(args.model, args.runtime, args.precision, threads).run
    k, n = (int(v) for v in args.shard.split("/"))
    paths = list_images(args.archive)[k::n]
    kwargs = c.decode_kwargs()
    t = time.perf_counter()
    startup = t - t_start
    lat, dec = [], []
    for i in range(0, len(paths), args.batch_size):
        t0 = time.perf_counter()
        x = np.stack([decode_file(p, **kwargs) for p in paths[i:i + args.batch_size]])[..., None]
        t1 = time.perf_counter()
        run(x)
        t2 = time.perf_counter()
        lat.extend([(t2 - t0) * 1e3 / len(x)] * len(x))
        dec.extend([(t1 - t0) * 1e3 / len(x)] * len(x))
    return {"images": len(paths), "seconds": time.perf_counter() - t, "startup_s": startup,
            "latency_ms": _lat(lat), "stages_ms": {"decode": _lat(dec)}, "runtime": args.runtime}


def per_core_loops(args) -> dict:
    """The ceiling with decoding: one single-threaded plain loop per core, each on its share of the
    files, all at once, with no coordination, no output and no error handling. What the cores can do
    when decoding and inference share them; steady rate = all images / the slowest loop's time."""
    import subprocess

    n = os.cpu_count()
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.contenders", "plain_loop", "--archive", args.archive,
                               "--model", args.model, "--out", args.out, "--precision", args.precision,
                               "--runtime", args.runtime, "--threads", "1", "--shard", f"{k}/{n}",
                               "--batch-size", str(args.batch_size)],
                              stdout=subprocess.PIPE, text=True) for k in range(n)]
    results = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"a per-core loop failed (exit {p.returncode})")
        results.append(json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT "))))
    return {"images": sum(r["images"] for r in results), "seconds": max(r["seconds"] for r in results),
            "startup_s": max(r["startup_s"] for r in results), "runtime": args.runtime, "processes": n}


def _predict_all(model, ds, t_start: float) -> dict:
    """Keras ``predict_on_batch`` over every batch of ``ds``; start-up counted from ``t_start``."""
    t = time.perf_counter()
    startup = t - t_start
    lat, n = [], 0
    for batch in ds:
        t0 = time.perf_counter()
        model.predict_on_batch(batch)
        lat.extend([(time.perf_counter() - t0) * 1e3 / len(batch)] * len(batch))
        n += len(batch)
    return {"images": n, "seconds": time.perf_counter() - t, "startup_s": startup, "latency_ms": _lat(lat)}


def _keras_model(args):
    """(the trained Keras model of ``--keras``, the ONNX model's contract)."""
    from covidct.train.model import load_trained

    c = read_contract(args.model)
    return load_trained(Path(args.keras) / "model.keras", c.image_size, c.architecture or "seed"), c


def seeds_way(args) -> dict:
    """Keras model.predict over keras.utils.image_dataset_from_directory (grey, 256x256)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t_start = time.perf_counter()
    import keras

    model, c = _keras_model(args)
    ds = keras.utils.image_dataset_from_directory(args.archive, labels=None, color_mode="grayscale",
                                                  image_size=c.image_size, batch_size=32, shuffle=False)
    return _predict_all(model, ds, t_start)


def keras_contract(args) -> dict:
    """Keras predict over tf.data running the engine's decode function (the contract's preprocessing, e.g.
    lung-crop) in parallel map calls: the seeds' way computing the same inputs as every other contender."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t_start = time.perf_counter()
    import tensorflow as tf

    model, c = _keras_model(args)
    kwargs = c.decode_kwargs()

    def decode(path):
        return decode_file(path.decode(), **kwargs)[..., None]

    ds = (tf.data.Dataset.from_tensor_slices(list_images(args.archive))
          .map(lambda p: tf.ensure_shape(tf.numpy_function(decode, [p], tf.uint8), (*c.image_size, 1)),
               num_parallel_calls=tf.data.AUTOTUNE)
          .batch(32).prefetch(tf.data.AUTOTUNE))
    return _predict_all(model, ds, t_start)


def ray_data(args) -> dict:
    """The Ray Data idiom: paths -> map_batches(decode) -> map_batches(ORT class) -> write_parquet."""
    t_start = time.perf_counter()
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
    c = read_contract(args.model)
    model, kwargs = args.model, c.decode_kwargs()

    def decode(batch):
        imgs = np.stack([decode_file(p, **kwargs) for p in batch["path"]])[..., None]
        return {"path": batch["path"], "image": imgs}

    class Predict:
        def __init__(self):
            self.sess = _session(model, os.cpu_count())

        def __call__(self, batch):
            p = self.sess.run(None, {"image": batch["image"]})[0][:, 0]
            return {"path": batch["path"], "probability": p}

    paths = list_images(args.archive)
    t = time.perf_counter()
    startup = t - t_start
    (ray.data.from_items([{"path": p} for p in paths])
        .map_batches(decode, batch_size=32)
        .map_batches(Predict, batch_size=32, concurrency=1)
        .write_parquet(str(Path(args.out) / "ray_data")))
    seconds = time.perf_counter() - t
    ray.shutdown()
    return {"images": len(paths), "seconds": seconds, "startup_s": startup}


CONTENDERS = {"ceiling": ceiling, "per_core_loops": per_core_loops, "plain_loop": plain_loop, "seeds_way": seeds_way,
              "keras_contract": keras_contract, "ray_data": ray_data}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name", choices=sorted(CONTENDERS))
    ap.add_argument("--archive", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--keras", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ceiling-images", type=int, default=1024)
    ap.add_argument("--precision", default="fp32", help="ceiling and loops: fp32, int8 (give the INT8 file) or bf16")
    ap.add_argument("--runtime", default="onnxruntime", help="plain_loop and per_core_loops: onnxruntime or openvino")
    ap.add_argument("--threads", type=int, default=None, help="plain_loop: inference threads (default: all cores)")
    ap.add_argument("--shard", default="0/1", help="plain_loop: K/N, every N-th file from the K-th")
    ap.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                    help="plain_loop and per_core_loops: images per batch (covidct-batch's default)")
    args = ap.parse_args()
    result = CONTENDERS[args.name](args)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
