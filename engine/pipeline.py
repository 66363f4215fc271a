"""The screening pipeline on Ray.

Driver: walks the inputs lazily, skips what OUT_DIR already holds, submits batches of
paths, and writes the small rows that come back. Decode tasks (Ray workers) read and
decode+resize a batch with OpenCV into one uint8 array in the object store. Predictor
actors hold the ONNX Runtime session, take that array by reference and return rows.
Pixels never reach the driver; at most ``max_in_flight`` batches exist at once.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import shutil
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .contract import DISCLAIMER, Contract, ContractError, read_contract, sha256_file
from .decode import MAX_PIXELS, DecodeError, decode_inputs, read_file
from .dicom import redact
from .predictor import ModelError, Predictor
from .shift import STATS, Histograms, compare, slice_stats
from .sink import PREDICTIONS, DoneIndex, PartWriter, row_key
from .sources import iter_inputs
from .stats import Progress, Reservoir

log = logging.getLogger(__name__)

#: Exit codes of covidct-batch (documented in the README).
EXIT_OK = 0           # every file ok or skipped
EXIT_FILE_ERRORS = 1  # the run completed; some files are error rows
EXIT_BAD_RUN = 2      # nothing done: bad options, no model, broken contract, Ray unreachable
EXIT_INTERRUPTED = 130


class RunError(RuntimeError):
    """A run that cannot start; the CLI prints it and exits EXIT_BAD_RUN."""


@dataclass(frozen=True)
class ScreenConfig:
    inputs: tuple[str, ...]
    model: Path
    out: Path
    from_list: Path | None = None
    batch_size: int = 32
    num_cpus: int | None = None          # local runtime only; default: all cores
    predictors: int | None = None        # default: one per GPU, else one per node
    inference_threads: int | None = None  # per predictor; default: the node's CPUs (CPU provider)
    decode_cpus: float = 1.0              # Ray CPUs per decode task (OpenCV runs single-threaded)
    max_in_flight: int | None = None      # batches submitted but not written; default from workers
    device: str = "auto"
    address: str | None = None
    overwrite: bool = False
    max_pixels: int = MAX_PIXELS
    progress: bool = True
    rows_per_part: int = 20000
    part_seconds: float = 30.0
    pseudonym_key: str | None = None      # --pseudonymize: HMAC key for the DICOM UIDs
    group_by: str | None = None           # studies for non-DICOM rows: "parent" or a regex
    top_k: int = 3
    object_store_mb: int = 512            # local runtime: the pipeline holds a few MB in flight
    fast_jpeg: bool = False               # half-scale JPEG decode (opt-in: not bit-equal to training's)

    def __post_init__(self):
        if not self.inputs and self.from_list is None:
            raise RunError("nothing to screen: give INPUT folders/files or --from-list FILE")
        if self.batch_size < 1:
            raise RunError(f"--batch-size must be >= 1, e.g. 32; got {self.batch_size}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise RunError(f"--device must be auto, cpu or cuda; got {self.device!r}")
        if self.top_k < 1:
            raise RunError(f"--top-k must be >= 1, e.g. 3; got {self.top_k}")
        if self.group_by not in (None, "parent"):
            import re
            try:
                re.compile(self.group_by)
            except re.error as e:
                raise RunError(f"--group-by must be 'parent' or a regex; {self.group_by!r}: {e}") from None
        if self.predictors is not None and self.predictors < 1:
            raise RunError(f"--predictors must be >= 1; got {self.predictors}")


# --------------------------------------------------------------------------- workers

def pseudonymize(uid: str, key: str | None) -> str:
    """A keyed hash of a UID, itself a valid UID (2.25.<decimal>); the same key gives the same value."""
    if not uid or key is None:
        return uid
    import hashlib
    import hmac
    digest = hmac.new(key.encode(), uid.encode(), hashlib.sha256).digest()[:16]
    return "2.25." + str(int.from_bytes(digest, "big"))


def decode_batch(items: list[tuple[str, int, int, int]], spec: dict) -> dict:
    """Ray task: read and decode+resize each file; one uint8 (k, H, W, 1) array for the k frames that decoded.

    ``items`` are (path, size, mtime_ns, key). Returns ``{"images": array, "meta": [dict, ...]}``:
    one meta row per frame (or per failed file) in input order; rows with status "ok" map to
    images in order. Paths and messages of DICOM rows carry no identifying header value.
    """
    import cv2

    cv2.setNumThreads(1)  # one Ray CPU per task: OpenCV must not start a pool of its own
    h, w = spec["image_size"]
    images, meta = [], []
    for path, size, mtime_ns, key in items:
        base = {"path": path, "file_size": size, "mtime_ns": mtime_ns, "key": key}
        t0 = time.perf_counter()
        try:
            data = read_file(path)
            t1 = time.perf_counter()
            frames = decode_inputs(data, spec["image_size"], spec["interpolation"], window=spec["window"],
                                   preprocessing=spec["preprocessing"], max_pixels=spec["max_pixels"],
                                   reduced_jpeg=spec["fast_jpeg"])
            t2 = time.perf_counter()
        except DecodeError as e:
            meta.append({**base, "path": redact(path, e.redact), "status": "skipped" if e.skipped else "error",
                         "reason": e.code, "message": redact(e.message, e.redact),
                         "read_ms": (time.perf_counter() - t0) * 1e3, "decode_ms": 0.0})
            continue
        for img, sl, framing in frames:
            images.append(img)
            row = {**base, "status": "ok", "reason": None, "message": None, "read_ms": (t1 - t0) * 1e3,
                   "decode_ms": (t2 - t1) * 1e3 / len(frames)}
            stats = slice_stats(img, framing)  # the shift alarm's statistics: a few floats, no pixels
            if stats is not None:
                row.update(stats, framing=framing.fallback)
            if sl is not None:
                k = spec.get("pseudonym_key")
                row.update(path=redact(path, sl.identifying), study_uid=pseudonymize(sl.study_uid, k),
                           series_uid=pseudonymize(sl.series_uid, k), sop_uid=pseudonymize(sl.sop_uid, k),
                           instance_number=sl.instance_number, slice_position=sl.slice_position, frame=sl.frame)
            meta.append(row)
    batch = np.stack(images)[..., None] if images else np.empty((0, h, w, 1), np.uint8)
    return {"images": batch, "meta": meta}


def thumbnail(img: np.ndarray, size: int = 96) -> bytes:
    """A small JPEG of what the model saw, for the report's flagged studies."""
    import cv2
    ok, buf = cv2.imencode(".jpg", cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA),
                           [cv2.IMWRITE_JPEG_QUALITY, 80])
    return buf.tobytes() if ok else None


class PredictorActor:
    """Ray actor around :class:`Predictor`: decoded batch in, result rows out."""

    def __init__(self, model_path: str, threads: int, device: str, model_sha256: str, run_id: str):
        self.predictor = Predictor(model_path, threads, device)
        self.sha = model_sha256
        self.run_id = run_id
        import ray
        self.node = ray.get_runtime_context().get_node_id()[:12]

    def info(self) -> dict:
        import socket
        return {"provider": self.predictor.provider, "host": socket.gethostname(), "pid": os.getpid(),
                "node": self.node}

    def predict(self, decoded: dict) -> list[dict]:
        c: Contract = self.predictor.contract
        images, meta = decoded["images"], decoded["meta"]
        probs, seconds = (self.predictor.predict(images) if len(images) else (np.zeros(0, np.float32), 0.0))
        share = seconds * 1e3 / max(1, len(images))
        rows, k = [], 0
        for m in meta:
            row = {**m, "threshold": c.threshold, "model_sha256": self.sha, "provider": self.predictor.provider,
                   "run_id": self.run_id, "node": self.node}
            if m["status"] == "ok":
                p = float(probs[k])
                pos = p >= c.threshold
                row.update(probability=p, positive=pos, label=c.class_names[int(pos)], infer_ms=share,
                           thumbnail=thumbnail(images[k, :, :, 0]) if pos else None)
                k += 1
            rows.append(row)
        return rows


# --------------------------------------------------------------------------- driver

@dataclass
class RunSummary:
    out: Path
    counts: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    already_done: int = 0
    provider: str = ""
    seconds: float = 0.0
    steady_images_per_s: float | None = None
    images_per_s: float = 0.0
    exit_code: int = EXIT_OK
    run: dict = field(default_factory=dict)


def check_model(model: Path) -> Contract:
    """Fail before any work: the file must exist, load in ONNX Runtime and carry a valid contract."""
    if not Path(model).is_file():
        raise RunError(f"model {model} does not exist (export one with covidct-export)")
    try:
        return read_contract(model)
    except ContractError as e:
        raise RunError(str(e)) from None


def check_auth_mode(cfg: ScreenConfig) -> None:
    """Ray >= 2.59 turns token authentication on for local runtimes (it generates a token in
    ~/.ray/auth_token). Its servers listen on every interface, so a local run must never opt out."""
    if cfg.address is None and os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        raise RunError(f"RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']}: covidct-batch will not start an "
                       "unauthenticated Ray runtime (its ports are reachable from the network); unset it")


def start_ray(cfg: ScreenConfig):
    """Join ``--address`` or start a local runtime in this process, with token authentication."""
    import ray

    if ray.is_initialized():  # e.g. tests that share one runtime
        return False
    check_auth_mode(cfg)
    kwargs = dict(include_dashboard=False, log_to_driver=True, configure_logging=False)
    try:
        if cfg.address is None:
            # Ray's default store is 30% of RAM; its shared pages, once touched, stay in RSS, so a
            # long run would grow towards it. At most max_in_flight batches exist: cap it.
            ray.init(num_cpus=cfg.num_cpus or os.cpu_count(), object_store_memory=cfg.object_store_mb << 20,
                     **kwargs)
        else:
            ray.init(address=cfg.address, **kwargs)
    except Exception as e:  # ConnectionError, auth failures, bad address
        raise RunError(f"cannot start or join Ray ({cfg.address or 'local'}): {e}. A cluster made with "
                       "`ray start` needs RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN or ~/.ray/auth_token)")
    return True


def plan_workers(cfg: ScreenConfig) -> dict:
    """Predictor count, threads and resources from what the Ray runtime has."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = int(sum(n["Resources"].get("GPU", 0) for n in nodes))
    cpus = int(sum(n["Resources"].get("CPU", 0) for n in nodes))
    node_cpus = max(1, min(int(n["Resources"].get("CPU", 1)) for n in nodes))
    use_gpu = cfg.device != "cpu" and gpus > 0
    if cfg.device == "cuda" and not gpus:
        raise RunError("--device cuda: the Ray runtime has no GPU")
    # CPU provider: one single-threaded predictor per CPU (up to 8 a node) beats one session with
    # N intra-op threads here (169 vs 162 images/s on 2 cores: no thread hand-offs per operator).
    per_node = 1 if use_gpu else min(node_cpus, 8)
    predictors = cfg.predictors or (gpus if use_gpu else per_node * len(nodes))
    threads = cfg.inference_threads or (2 if use_gpu else max(1, node_cpus * len(nodes) // predictors))
    decode_slots = max(1, int(cpus / max(cfg.decode_cpus, 1e-3)))
    return {"nodes": len(nodes), "node_ids": [n["NodeID"] for n in nodes], "cpus": cpus, "gpus": gpus, "use_gpu": use_gpu, "predictors": predictors,
            "inference_threads": threads, "decode_slots": decode_slots,
            "max_in_flight": cfg.max_in_flight or (decode_slots + 2 * predictors)}


def _chunks(items, size):
    batch = []
    for it in items:
        batch.append(it)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _first_small(batches, first: int = 8):
    """Split the first batch so that the first rows reach the disk as early as possible."""
    for i, batch in enumerate(batches):
        if i == 0 and len(batch) > first:
            yield batch[:first]
            yield batch[first:]
        else:
            yield batch


def run(cfg: ScreenConfig) -> RunSummary:
    """Screen every input file once; returns the summary written to ``run.json``."""
    import ray

    started = time.time()
    t_start = time.monotonic()
    if not Path(cfg.model).is_file():
        raise RunError(f"model {cfg.model} does not exist (export one with covidct-export)")
    out = Path(cfg.out)
    pred_dir = out / PREDICTIONS
    if cfg.overwrite and out.exists():
        shutil.rmtree(pred_dir, ignore_errors=True)
        (out / "run.json").unlink(missing_ok=True)
    pred_dir.mkdir(parents=True, exist_ok=True)

    # Ray takes seconds to start: validate the model and load the resume index meanwhile.
    prep: dict = {}

    def prepare() -> None:
        try:
            prep["contract"] = check_model(cfg.model)
            prep["sha"] = sha256_file(cfg.model)
            prep["done"] = DoneIndex.load(pred_dir, prep["sha"])
        except BaseException as e:  # re-raised in the main thread
            prep["error"] = e

    check_auth_mode(cfg)
    worker = threading.Thread(target=prepare, name="covidct-prepare", daemon=True)
    worker.start()
    try:
        owns_ray = start_ray(cfg)
    finally:
        # Never leave while the worker is inside ONNX Runtime: an interpreter that exits under a
        # live native thread pool aborts ("terminate called without an active exception").
        worker.join()
    log.debug("startup: Ray up and model checked at %.2f s", time.monotonic() - t_start)
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    try:
        if "error" in prep:
            raise prep["error"]
        return _run(cfg, prep["contract"], prep["sha"], out, prep["done"], run_id, started, t_start)
    finally:
        if owns_ray:
            ray.shutdown()


def _run(cfg, contract, model_sha, out, done, run_id, started, t_start) -> RunSummary:
    import ray

    plan = plan_workers(cfg)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def placement(i: int):
        # SPREAD is best effort and packs zero-CPU actors on one node: pin them round-robin.
        if plan["use_gpu"]:
            return "SPREAD"
        return NodeAffinitySchedulingStrategy(plan["node_ids"][i % len(plan["node_ids"])], soft=False)

    device = "cuda" if plan["use_gpu"] else "cpu"  # Ray saw no GPU: do not let ONNX Runtime try one
    actors = [
        ray.remote(PredictorActor).options(
            num_cpus=0 if not plan["use_gpu"] else 1, num_gpus=1 if plan["use_gpu"] else 0,
            max_restarts=3, max_task_retries=3, scheduling_strategy=placement(i),
        ).remote(str(Path(cfg.model).resolve()), plan["inference_threads"], device, model_sha, run_id)
        for i in range(plan["predictors"])]
    # Decoding starts while the predictors load the model; they must be up before any row is written.
    info_refs = [a.info.remote() for a in actors]
    providers: list[str] = []

    def predictors_ready() -> None:
        if providers:
            return
        try:
            infos = ray.get(info_refs)
        except ray.exceptions.RayActorError as e:
            raise RunError(f"predictor actors could not start: {e}") from None
        providers.extend(sorted({i["provider"] for i in infos}))
        summary.provider = ",".join(providers)
        log.info("Ray: %d node(s), %d CPU(s), %d GPU(s); %d predictor(s) x %d thread(s) on %s (ready at %.1f s)",
                 plan["nodes"], plan["cpus"], plan["gpus"], plan["predictors"], plan["inference_threads"],
                 summary.provider, time.monotonic() - t_start)
    decode = ray.remote(decode_batch).options(num_cpus=cfg.decode_cpus, max_retries=3)
    spec = {**contract.decode_kwargs(), "max_pixels": cfg.max_pixels, "pseudonym_key": cfg.pseudonym_key,
            "fast_jpeg": cfg.fast_jpeg}
    spec_ref = ray.put(spec)

    writer = PartWriter(out / PREDICTIONS, run_id, cfg.rows_per_part, cfg.part_seconds)
    summary = RunSummary(out=out)
    shift_hist = Histograms()  # this run's slices, in the reference's fixed bins: bounded memory
    stages = {k: Reservoir() for k in ("read_ms", "decode_ms", "infer_ms", "batch_latency_ms")}
    progress = Progress(cfg.progress)
    seen_this_run: set[int] = set()
    in_flight: dict = {}  # ref -> (items, submitted monotonic)
    walked = {"total": 0, "finished": False}
    t_first_row: list[float] = []  # when the first rows came back, and how many they were

    def todo():
        for item in iter_inputs(cfg.inputs, cfg.from_list):
            walked["total"] += 1
            key = row_key(item.path, item.size, item.mtime_ns, model_sha)
            if key in done:
                summary.already_done += 1
                continue
            if key in seen_this_run:
                continue
            seen_this_run.add(key)
            if item.error:  # could not even be stat'ed: an error row straight from the driver
                writer_rows([_driver_row(item, key, "unreadable", item.error, contract, model_sha, run_id)])
                continue
            yield item, key
        walked["finished"] = True

    def writer_rows(rows):
        writer.add(rows)
        for r in rows:
            summary.counts[r["status"]] += 1
            if r["status"] == "ok":
                summary.labels[r["label"]] += 1
                shift_hist.add({k: r[k] for k in STATS} if r.get("input_detail") is not None else None,
                               r.get("probability"))
            else:
                summary.reasons[(r["status"], r["reason"])] += 1
            for k in ("read_ms", "decode_ms", "infer_ms"):
                if r.get(k) is not None and (k != "decode_ms" or r["status"] == "ok"):
                    stages[k].add((r[k],))

    def drain(block_for: int) -> None:
        predictors_ready()
        ready, _ = ray.wait(list(in_flight), num_returns=min(block_for, len(in_flight)))
        for ref in ready:
            items, t_sub = in_flight.pop(ref)
            try:
                rows = ray.get(ref)
            except (ray.exceptions.RayError) as e:  # task/actor died beyond retries: rows, not loss
                msg = type(e).__name__  # its text may quote a path: keep identifiers out of the output
                rows = [_driver_row(it, key, "internal", f"worker failed ({msg}); rerun to retry", contract,
                                    model_sha, run_id) for it, key in items]
            stages["batch_latency_ms"].add(((time.monotonic() - t_sub) * 1e3,))
            writer_rows(rows)
            if not t_first_row:
                log.debug("startup: first rows written at %.2f s", time.monotonic() - t_start)
                t_first_row.extend((time.monotonic(), sum(summary.counts.values())))
        total = walked["total"] - summary.already_done if walked["finished"] else None
        progress.update(sum(summary.counts.values()), total, summary.counts["error"])

    next_actor = 0
    for batch in _first_small(_chunks(todo(), cfg.batch_size)):
        while len(in_flight) >= plan["max_in_flight"]:
            drain(1)
        dref = decode.remote([(i.path, i.size, i.mtime_ns, key) for i, key in batch], spec_ref)
        ref = actors[next_actor % len(actors)].predict.remote(dref)
        next_actor += 1
        in_flight[ref] = (batch, time.monotonic())
        del dref  # the actor call holds the only reference: the batch is freed once predicted
    while in_flight:
        drain(len(in_flight))
    predictors_ready()
    writer.flush()
    progress.update(sum(summary.counts.values()), walked["total"] - summary.already_done, summary.counts["error"],
                    force=True)

    t_end = time.monotonic()
    n = sum(summary.counts.values())
    summary.seconds = t_end - t_start
    summary.images_per_s = n / summary.seconds if summary.seconds else 0.0
    if t_first_row and n - t_first_row[1] >= 100 and t_end > t_first_row[0]:  # too few rows: no steady state
        summary.steady_images_per_s = (n - t_first_row[1]) / (t_end - t_first_row[0])
    summary.exit_code = EXIT_FILE_ERRORS if summary.counts["error"] else EXIT_OK
    summary.run = _run_record(cfg, contract, model_sha, run_id, plan, providers, summary, stages, started,
                              writer, t_start)
    summary.run["shift"] = compare(contract.reference, shift_hist)
    summary.run["shift"]["scope"] = "the slices predicted by this run"
    from .report import write_report
    from .studies import build_studies, current_rows

    rows = current_rows(out, model_sha)  # read the parts once for studies and report
    studies = build_studies(out, rows, contract.threshold, cfg.top_k, cfg.group_by, contract.reference)
    summary.run["studies"] = {"studies": sum(1 for v in studies.column("level").to_pylist() if v == "study"),
                              "flagged": sum(1 for lv, d in zip(studies.column("level").to_pylist(),
                                                                 studies.column("decision").to_pylist())
                                             if lv == "study" and d),
                              "rule": f"mean of the top {cfg.top_k} slice probabilities >= threshold",
                              "shifted": sum(1 for lv, v in zip(studies.column("level").to_pylist(),
                                                                studies.column("shift_verdict").to_pylist())
                                             if lv == "study" and v and v.startswith("shifted"))}
    tmp = out / "run.json.tmp"
    tmp.write_text(json.dumps(summary.run, indent=2, default=str))
    os.replace(tmp, out / "run.json")
    write_report(out, summary.run, rows, cfg.group_by)
    return summary


def _driver_row(item, key: int, reason: str, message: str, contract: Contract, model_sha: str, run_id: str) -> dict:
    return {"path": item.path, "key": key, "status": "error", "reason": reason, "message": message,
            "threshold": contract.threshold, "model_sha256": model_sha, "provider": None,
            "file_size": item.size if item.size >= 0 else None,
            "mtime_ns": item.mtime_ns if item.mtime_ns >= 0 else None, "run_id": run_id}


def _run_record(cfg, contract, model_sha, run_id, plan, providers, summary, stages, started, writer, t_start) -> dict:
    import cv2
    import onnxruntime
    import pyarrow
    import ray

    first_row_s = (writer.first_write_at - started) if writer.first_write_at else None
    return {
        "disclaimer": DISCLAIMER,
        "run_id": run_id,
        "started": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(),
        "ended": dt.datetime.now(dt.timezone.utc).isoformat(),
        "config": {k: ("<set>" if k == "pseudonym_key" and v else str(v) if isinstance(v, Path) else v)
                   for k, v in asdict(cfg).items()},
        "workers": plan,
        "model": {"path": str(cfg.model), "sha256": model_sha, "contract": json.loads(contract.to_json())},
        "execution_providers": providers,
        "versions": {"covidct-batch": __version__, "onnxruntime": onnxruntime.__version__, "ray": ray.__version__,
                     "opencv": cv2.__version__, "pyarrow": pyarrow.__version__, "numpy": np.__version__,
                     "python": platform.python_version()},
        "counts": {"ok": summary.counts["ok"], "error": summary.counts["error"],
                   "skipped": summary.counts["skipped"], "already_done": summary.already_done,
                   "by_label": dict(summary.labels),
                   "by_reason": [{"status": s, "reason": r, "files": n} for (s, r), n in
                                 sorted(summary.reasons.items(), key=lambda kv: -kv[1])]},
        "seconds": round(summary.seconds, 3),
        "images_per_s": round(summary.images_per_s, 2),
        "steady_images_per_s": round(summary.steady_images_per_s, 2) if summary.steady_images_per_s else None,
        "first_row_on_disk_s": round(first_row_s, 3) if first_row_s is not None else None,
        "latency_ms": {k: r.percentiles() for k, r in stages.items()},
        "rows_written": writer.rows_written,
        "exit_code": summary.exit_code,
    }


__all__ = ["ScreenConfig", "run", "RunError", "ModelError", "RunSummary", "decode_batch", "PredictorActor",
           "EXIT_OK", "EXIT_FILE_ERRORS", "EXIT_BAD_RUN"]
