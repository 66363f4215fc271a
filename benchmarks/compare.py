"""Side-by-side throughput of covidct-batch and what a user would run instead, in one invocation.

    python -m benchmarks.compare --n 5000            # writes benchmarks/results/compare-<host>.{json,md}

Builds a synthetic archive of N grey 512x512 JPEG slices, exports a seed-architecture model
(random weights: the cost is the same) through covidct-export, then runs one after another:
the ceiling (ONNX Runtime alone on decoded tensors), covidct-batch (its CLI, end to end and
steady state), the seeds' way (Keras predict over image_dataset_from_directory), the Ray Data
idiom, and a plain loop. Each runs in its own process session; peak RSS is the sum over all
of that session's processes (Ray's included), sampled every 0.1 s.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from engine.contract import Contract

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent


def best_of(fn, repeats: int = 30) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn``: the least disturbed by a shared machine."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def session_pids(sid: int) -> list[int]:
    """Processes whose session id is ``sid`` (field 6 of /proc/PID/stat): a run and all it started."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid:
                    pids.append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    return pids


def kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (it was started with start_new_session=True)."""
    for pid in session_pids(sid):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def session_rss_mb(sid: int) -> float:
    total = 0
    for pid in session_pids(sid):
        try:
            for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1024


def run_measured(cmd: list[str], timeout: float = 3600) -> dict:
    """Run ``cmd`` in a new session; wall seconds, peak session RSS, exit code, output."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    peak = [0.0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], session_rss_mb(proc.pid))
            stop.wait(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop.set()
        th.join()
        kill_session(proc.pid)
    wall = time.perf_counter() - t
    result = {}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[7:])
    return {"wall_s": wall, "peak_rss_mb": round(peak[0], 1), "rc": proc.returncode, "result": result,
            "stderr_tail": err[-1500:], "stdout": out}


def make_seed_model(work: Path, archive: Path, int8: bool = True) -> Path:
    """A seed-architecture run directory with random weights, exported through covidct-export."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from engine import __version__
    from export.exporter import ExportConfig, export
    from engine.contract import sha256_file
    from train.fit import CONTRACT_FILE, MODEL_FILE, SPLIT_FILE
    from train.model import build_model

    run = work / "run"
    model_path = work / "model.onnx"
    if model_path.is_file():
        return model_path
    run.mkdir(parents=True, exist_ok=True)
    build_model((256, 256), seed=0).save(run / MODEL_FILE)
    contract = Contract(image_size=(256, 256), class_names=("non-COVID", "COVID"), positive_class="COVID",
                        threshold=0.5, source_sha256=sha256_file(run / MODEL_FILE), project_version=__version__)
    (run / CONTRACT_FILE).write_text(contract.to_json())
    imgs = sorted(archive.rglob("*.jpg"))[:64]
    with open(run / SPLIT_FILE, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "class", "split", "sha256"])
        for i, p in enumerate(imgs):
            w.writerow([p, "COVID", "test" if i % 2 else "train", ""])
    export(ExportConfig(run_dir=run, out=model_path, int8=int8))
    return model_path


def make_archive(root: Path, n: int, size=(512, 512)) -> Path:
    from train.synthetic import make_archive as mk
    marker = root / f".complete-{n}"
    if not marker.exists():
        mk(root, n, seed=0, size=size)
        marker.write_text("")
    return root


#: CPU instruction sets that decide which kernels run fast (FP32 FMA, INT8 VNNI, BF16, AMX).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_flags() -> list[str]:
    """The flags of CPU_FLAGS this machine has (from /proc/cpuinfo): named beside every figure."""
    try:
        have = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return []
    return [f for f in CPU_FLAGS if f in have]


def machine() -> dict:
    import cv2
    import onnxruntime
    import ray
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    gpu = None
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "cpu_flags": cpu_flags(), "gpu": gpu, "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "ray": ray.__version__, "opencv": cv2.__version__,
            "numpy": np.__version__, "host_kind": platform.machine()}


def contender(name: str, archive: Path, model: Path, work: Path) -> dict:
    r = run_measured([sys.executable, "-m", "benchmarks.contenders", name, "--archive", str(archive), "--model",
                      str(model), "--keras", str(work / "run"), "--out", str(work / name)])
    if r["rc"] != 0:
        raise RuntimeError(f"{name} failed:\n{r['stderr_tail']}")
    res = r["result"]
    return {"name": name, "images": res["images"], "images_per_s": res["images"] / res["seconds"],
            "wall_s": r["wall_s"], "end_to_end_images_per_s": res["images"] / r["wall_s"],
            "startup_s": res.get("startup_s"), "latency_ms": res.get("latency_ms", {}),
            "stages_ms": res.get("stages_ms", {}), "peak_rss_mb": r["peak_rss_mb"],
            **({"by_batch_size": res["by_batch_size"], "batch_size": res["batch_size"]} if "by_batch_size" in res
               else {})}


def covidct_batch(archive: Path, model: Path, out: Path, extra=()) -> dict:
    r = run_measured([str(BIN / "covidct-batch"), str(archive), "--model", str(model), "--out", str(out),
                      "--overwrite", "--no-progress", *extra])
    if r["rc"] not in (0, 1):
        raise RuntimeError(f"covidct-batch failed:\n{r['stderr_tail']}")
    run = json.loads((out / "run.json").read_text())
    n = run["counts"]["ok"] + run["counts"]["error"] + run["counts"]["skipped"]
    lat = run["latency_ms"]
    return {"name": "covidct-batch", "images": n, "images_per_s": run["steady_images_per_s"], "wall_s": r["wall_s"],
            "end_to_end_images_per_s": n / r["wall_s"], "startup_s": run["first_row_on_disk_s"],
            "first_row_on_disk_s": run["first_row_on_disk_s"],
            "latency_ms": lat["batch_latency_ms"],
            "stages_ms": {k.replace("_ms", ""): lat[k] for k in ("read_ms", "decode_ms", "infer_ms")},
            "peak_rss_mb": r["peak_rss_mb"], "workers": run["workers"]}


def rss_scaling(work: Path, small: int, large: int) -> dict:
    """Peak RSS of covidct-batch at ``large`` vs ``small`` images, with a tiny model (fast)."""
    from export.tiny import tiny_model
    model = tiny_model(work / "tiny.onnx", (256, 256))
    res = {}
    for n in (small, large):
        archive = make_archive(work / f"rss_archive_{n}", n, size=(128, 128))
        r = covidct_batch(archive, model, work / f"rss_out_{n}")
        res[n] = {"peak_rss_mb": r["peak_rss_mb"], "images": r["images"], "images_per_s": r["images_per_s"]}
    res["ratio"] = res[large]["peak_rss_mb"] / res[small]["peak_rss_mb"]
    return res


def int8_check(work: Path, int8_run: Path | None, real: Path | None) -> dict | None:
    """INT8 vs FP32 throughput (ORT on decoded tensors, all cores) and label agreement on real images."""
    import onnxruntime as ort

    from engine.contract import read_contract
    from engine.decode import DecodeError, decode_file

    fp32 = (int8_run / "model.onnx") if int8_run else work / "model.onnx"
    int8 = fp32.with_suffix(".int8.onnx")
    if not (fp32.is_file() and int8.is_file()):
        return None
    c = read_contract(fp32)
    paths = sorted(p for p in real.rglob("*") if p.is_file()) if real and real.is_dir() else []
    imgs = []
    for p in paths:
        try:
            imgs.append(decode_file(p, **c.decode_kwargs()))
        except DecodeError:
            pass
    if not imgs:
        return None
    x = np.stack(imgs)[..., None]
    out = {"fp32_model": str(fp32), "int8_model": str(int8), "real_images": len(x)}
    probs = {}
    for name, path in (("fp32", fp32), ("int8", int8)):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = os.cpu_count()
        s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        probs[name] = np.concatenate([s.run(None, {"image": x[i:i + 32]})[0][:, 0] for i in range(0, len(x), 32)])
        s.run(None, {"image": x[:32]})
        t = time.perf_counter()
        for i in range(0, min(len(x), 512) - 31, 32):
            s.run(None, {"image": x[i:i + 32]})
        out[f"{name}_images_per_s"] = round((min(len(x), 512) // 32 * 32) / (time.perf_counter() - t), 1)
    thr = c.threshold
    out["label_agreement"] = float(np.mean((probs["fp32"] >= thr) == (probs["int8"] >= thr)))
    out["speedup"] = round(out["int8_images_per_s"] / out["fp32_images_per_s"], 2)
    return out


def markdown(report: dict) -> str:
    m = report["machine"]
    rows = report["contenders"]
    ceil = next(r for r in rows if r["name"] == "ceiling")["images_per_s"]
    lines = [f"# covidct-batch throughput, {report['n']} grey 512x512 JPEG slices", "",
             f"Machine: {m['cores']} cores, {m['cpu']}, GPU: {m['gpu'] or 'none'}; onnxruntime {m['onnxruntime']}, "
             f"ray {m['ray']}, opencv {m['opencv']}, python {m['python']}. Date: {report['date']}.", "",
             f"Command: `{report['command']}`", "",
             "| contender | images/s | x ceiling | end-to-end images/s | x ceiling | latency/image ms p50/p95/p99 "
             "| peak RSS MB | start-up s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = r.get("latency_ms") or {}
        lat_s = "/".join(str(lat.get(k, "-")) for k in ("p50", "p95", "p99")) if lat else "-"
        su = r.get("startup_s")
        lines.append(f"| {r['name']} | {r['images_per_s']:.1f} | {r['images_per_s'] / ceil:.2f} | "
                     f"{r['end_to_end_images_per_s']:.1f} | {r['end_to_end_images_per_s'] / ceil:.2f} | {lat_s} | "
                     f"{r['peak_rss_mb']:.0f} | {su if su is None else round(su, 2)} |")
    lines += ["", "images/s: steady state (covidct-batch: first row written to last; others: after start-up). "
              "End to end: files / wall time of the whole process, start-up included. covidct-batch latency is "
              "per batch, submit to result.", ""]
    b = next(r for r in rows if r["name"] == "covidct-batch")
    lines.append("covidct-batch stages (ms per image, p50/p95/p99): " + "; ".join(
        f"{k} {v['p50']}/{v['p95']}/{v['p99']}" for k, v in b["stages_ms"].items()))
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def targets(report: dict) -> list[dict]:
    by = {r["name"]: r for r in report["contenders"]}
    ceil = by["ceiling"]["images_per_s"]
    b = by["covidct-batch"]
    out = [
        ("steady state >= 0.90 x ceiling", b["images_per_s"] / ceil, 0.90),
        ("end to end >= 0.85 x ceiling", b["end_to_end_images_per_s"] / ceil, 0.85),
        (">= 3.5 x the seeds' way (end to end)", b["end_to_end_images_per_s"] / by["seeds_way"]["end_to_end_images_per_s"],
         3.5),
        (">= 2 x the Ray Data idiom (end to end)",
         b["end_to_end_images_per_s"] / by["ray_data"]["end_to_end_images_per_s"], 2.0),
    ]
    res = [{"target": t, "measured": round(v, 3), "met": v >= goal} for t, v, goal in out]
    fr = b["first_row_on_disk_s"]
    res.append({"target": "first row on disk <= 5 s", "measured": fr, "met": fr is not None and fr <= 5.0})
    if report.get("rss"):
        r = report["rss"]
        res.append({"target": "peak RSS at large <= 1.2 x small", "measured": round(r["ratio"], 3),
                    "met": r["ratio"] <= 1.2})
    if report.get("int8"):
        q = report["int8"]
        res.append({"target": "INT8 >= 1.8 x FP32", "measured": q["speedup"], "met": q["speedup"] >= 1.8})
        res.append({"target": "INT8 labels agree with FP32 on >= 99% of real images",
                    "measured": round(q["label_agreement"], 4), "met": q["label_agreement"] >= 0.99})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--work", type=Path, default=Path("/tmp/covidct-bench"))
    ap.add_argument("--rss-n", type=int, nargs=2, default=(5000, 50000), metavar=("SMALL", "LARGE"))
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--int8-run", type=Path, default=None, help="run dir whose model.onnx/.int8.onnx to compare")
    ap.add_argument("--real", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
                    / "sarscov2-ct-subset")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    archive = make_archive(args.work / f"archive_{args.n}", args.n)
    model = make_seed_model(args.work, archive)
    rows = []
    names = args.only or ["ceiling", "covidct-batch", "seeds_way", "ray_data", "plain_loop"]
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.append(covidct_batch(archive, model, args.work / "screen") if name == "covidct-batch"
                    else contender(name, archive, model, args.work))
        print(f"  {rows[-1]['images_per_s']:.1f} img/s steady, {rows[-1]['end_to_end_images_per_s']:.1f} end to end",
              file=sys.stderr, flush=True)
    report = {"n": args.n, "date": time.strftime("%Y-%m-%d"), "machine": machine(), "contenders": rows,
              "command": "python -m benchmarks.compare " + " ".join(sys.argv[1:])}
    if not args.skip_rss:
        report["rss"] = rss_scaling(args.work, *args.rss_n)
    report["int8"] = int8_check(args.work, args.int8_run, args.real)
    if args.only is None:
        report["targets"] = targets(report)
        args.results.mkdir(parents=True, exist_ok=True)
        stem = args.results / f"compare-{report['machine']['cores']}core-{'gpu' if report['machine']['gpu'] else 'cpu'}"
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
        stem.with_suffix(".md").write_text(markdown(report))
        print(markdown(report))
    else:
        print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
