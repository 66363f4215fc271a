"""The screening run: its configuration, and what happens before and after the driver.

``run`` takes OUT_DIR's lock (``engine.lock``), sets damaged parts aside, checks the model and loads
the resume index while Ray starts (``engine.cluster``), then hands the run to the driver
(``engine.driver``): it walks the inputs lazily (``engine.sources``), skips what OUT_DIR already holds
(``engine.sink.DoneIndex``), submits batches of paths to the Ray workers (``engine.workers``), writes
the small rows that come back (``engine.sink.PartWriter``) and at the end builds studies and the
report (``engine.report.build_report``). Pixels never reach the driver; at most ``max_in_flight``
batches exist at once.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .cluster import (DEFAULT_BATCH_SIZE, check_auth_mode, cpu_predictors, plan_workers, shutdown_ray,  # noqa: F401
                      start_ray)
from .contract import Contract, ContractError, read_contract, sha256_file
from .decode import MAX_PIXELS
from .driver import Driver, RayPool, RunContext, RunSummary
from .exits import Exit, RunError
from .lock import LockedError, OutDirLock
from .report import REPORT, RUN
from .runtimes import ModelError
from .sink import PREDICTIONS, SECRET, DoneIndex, OutputError, PartWriter, SecretError, out_secret, set_aside_damaged
from .studies import STUDIES
from .workers import PredictorActor, decode_batch  # noqa: F401  (their old home)

log = logging.getLogger(__name__)

# covidct-batch's exit codes, from the one table of every command (engine.exits)
EXIT_OK = Exit.OK                        # every file ok or skipped
EXIT_FILE_ERRORS = Exit.FILE_ERRORS      # the run completed; some files are error rows (this run's or still current)
EXIT_BAD_RUN = Exit.BAD_INPUT            # nothing done: bad options, no model, broken contract, Ray unreachable, ...
EXIT_OUTPUT_FAILED = Exit.OUTPUT_FAILED  # stopped: a part could not be written (disk full); rerun to resume
EXIT_INTERRUPTED = Exit.INTERRUPTED


@dataclass(frozen=True)
class ScreenConfig:
    inputs: tuple[str, ...]
    model: Path
    out: Path
    from_list: Path | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    num_cpus: int | None = None          # local runtime only; default: all cores
    predictors: int | None = None        # default: one per CPU (at most 16 a node); with GPUs, one per GPU
    inference_threads: int | None = None  # per predictor; default: the node's CPUs / its predictors (GPU: 2)
    decode_cpus: float = 1.0              # Ray CPUs per decode task (OpenCV runs single-threaded)
    max_in_flight: int | None = None      # batches submitted but not written; default from workers
    device: str = "auto"
    runtime: str = "auto"                 # inference runtime on the CPU (engine.runtimes)
    precision: str = "fp32"               # opt-in int8 / bf16 (engine.runtimes)
    address: str | None = None
    overwrite: bool = False
    max_pixels: int = MAX_PIXELS
    progress: bool = True
    rows_per_part: int = 20000
    part_seconds: float = 30.0
    pseudonym_key: str | None = None      # --pseudonymize: HMAC key for the DICOM UIDs and every path
    thumbnails: str = "auto"              # auto: not for DICOM unless BurnedInAnnotation is NO; on; off
    group_by: str | None = None           # studies for non-DICOM rows: "parent" or a regex
    top_k: int = 3
    object_store_mb: int = 512            # local runtime: the pipeline holds a few MB in flight
    fast_jpeg: bool = False               # half-scale JPEG decode (opt-in: not bit-equal to training's)
    worker_logs: bool = False             # Ray workers' stdout/stderr on the console (--verbose)
    allow_unauthenticated_cluster: bool = False  # join an --address cluster that requires no token
    exclude: tuple[str, ...] = ()         # more folders never walked as input (a caller's own output)

    def __post_init__(self):
        if not self.inputs and self.from_list is None:
            raise RunError("nothing to screen: give INPUT folders/files or --from-list FILE")
        if self.batch_size < 1:
            raise RunError(f"--batch-size must be >= 1, e.g. {DEFAULT_BATCH_SIZE}; got {self.batch_size}")
        from .runtimes import DEVICES, PRECISIONS, RUNTIME_CHOICES, THUMBNAILS
        if self.device not in DEVICES:
            raise RunError(f"--device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        if self.runtime not in RUNTIME_CHOICES:
            raise RunError(f"--runtime must be one of {', '.join(RUNTIME_CHOICES)}; got {self.runtime!r}")
        if self.precision not in PRECISIONS:
            raise RunError(f"--precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.top_k < 1:
            raise RunError(f"--top-k must be >= 1, e.g. 3; got {self.top_k}")
        from .studies import check_group_by
        problem = check_group_by(self.group_by)
        if problem:
            raise RunError(f"--group-by must be 'parent' or a regex; {self.group_by!r}: {problem}")
        out = os.path.realpath(self.out)
        for p in self.inputs:
            rp = os.path.realpath(p)
            if rp == out or rp.startswith(out.rstrip(os.sep) + os.sep):
                named = (f"input {p}" if not self.pseudonym_key else
                         f"input number {self.inputs.index(p) + 1} (not shown: --pseudonymize)")
                raise RunError(f"{named} is inside OUT_DIR: give another --out")
        if self.thumbnails not in THUMBNAILS:
            raise RunError(f"--thumbnails must be one of {', '.join(THUMBNAILS)}; got {self.thumbnails!r}")
        if self.pseudonym_key and self.thumbnails == "on":
            raise RunError("--thumbnails on cannot go with --pseudonymize: a slice's burned-in text (a name, a "
                           "date) can survive the lung crop, so pseudonymized runs embed no raster thumbnails")
        if self.predictors is not None and self.predictors < 1:
            raise RunError(f"--predictors must be >= 1; got {self.predictors}")


def check_model(model: Path) -> Contract:
    """Fail before any work: the file must exist, load in ONNX Runtime and carry a valid contract."""
    if not Path(model).is_file():
        raise RunError(f"model {model} does not exist (export one with covidct-export)")
    try:
        return read_contract(model)
    except ContractError as e:
        raise RunError(str(e)) from None


def _chunks(items, size):
    batch = []
    for it in items:
        batch.append(it)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _first_small(batches, first: int = 2):
    """Split the first batch so that the first rows reach the disk as early as possible (the seeds'
    CNN takes about 20 ms an image in its first batch)."""
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
    check_auth_mode(cfg)
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = OutDirLock(out).acquire()
    except LockedError as e:
        raise RunError(str(e)) from None
    except OSError as e:
        raise RunError(f"cannot write OUT_DIR {out}: {e.strerror or e}") from None
    try:
        return _locked_run(cfg, out, lock, started, t_start)
    finally:
        lock.release()


def _locked_run(cfg: ScreenConfig, out: Path, lock: OutDirLock, started: float, t_start: float) -> RunSummary:
    import ray

    pred_dir = out / PREDICTIONS
    if cfg.overwrite:
        shutil.rmtree(pred_dir, ignore_errors=True)
        for name in (RUN, STUDIES, REPORT, SECRET):
            (out / name).unlink(missing_ok=True)
    try:
        pred_dir.mkdir(parents=True, exist_ok=True)
        damaged = set_aside_damaged(pred_dir)  # before anything reads the parts
        secret = out_secret(out)
    except SecretError as e:
        raise RunError(str(e)) from None
    except OSError as e:
        raise RunError(f"cannot write OUT_DIR {out}: {e.strerror or e}") from None

    # Ray takes seconds to start: validate the model and load the resume index meanwhile.
    prep: dict = {}

    def prepare() -> None:
        try:
            contract = check_model(cfg.model)
            prep["choice"] = choice = choose_inference(cfg, contract=contract)
            # the INT8 twin carries its own contract
            prep["contract"] = contract if choice.model == str(cfg.model) else check_model(Path(choice.model))
            prep["sha"] = sha256_file(choice.model)
            prep["done"] = DoneIndex.load(pred_dir, prep["sha"])
        except BaseException as e:  # re-raised in the main thread
            prep["error"] = e

    worker = threading.Thread(target=prepare, name="covidct-prepare", daemon=True)
    worker.start()
    try:
        owns_ray = start_ray(cfg)
    finally:
        # Never leave while the worker is inside ONNX Runtime: an interpreter that exits under a
        # live native thread pool aborts ("terminate called without an active exception").
        worker.join()
    t_ray = time.monotonic()
    log.debug("startup: Ray up and model checked at %.2f s", t_ray - t_start)
    run_id = next_run_id(pred_dir)
    try:
        if "error" in prep:
            raise prep["error"]
        return _run(cfg, prep["contract"], prep["sha"], out, prep["done"], run_id, started, t_start, lock, secret,
                    prep["choice"], t_ray, damaged)
    finally:
        if owns_ray:
            shutdown_ray()


def next_run_id(pred_dir: Path) -> str:
    """``s<sequence>-<UTC time>-<random>``: the sequence is one more than any run's in OUT_DIR's part names,
    read while the lock is held, so "newest" never depends on a clock (another node's, a container's, an NTP
    step). The "s" sorts after the plain timestamps of runs written before the sequence existed."""
    last = 0
    for p in list(pred_dir.glob("part-s*.parquet")) + list((pred_dir / "damaged").glob("part-s*")):
        m = re.match(r"part-s(\d{8})-", p.name)
        if m:
            last = max(last, int(m.group(1)))
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"s{last + 1:08d}-{stamp}-{uuid.uuid4().hex[:6]}"


def choose_inference(cfg: ScreenConfig, gpu: bool | None = None, contract: Contract | None = None):
    """The run's runtime and precision (``engine.runtimes.choose``), measured on this machine."""
    from .runtimes import cuda_available
    from .runtimes import RuntimeChoiceError, choose

    if gpu is None:  # before Ray is up: a local runtime has a GPU where this machine has one
        gpu = cfg.device == "cuda" or (cfg.device == "auto" and cfg.address is None and cuda_available())
    threads = cpu_predictors(cfg, cfg.num_cpus or os.cpu_count() or 1)[1] if not gpu else 1
    try:
        return choose(cfg.model, cfg.runtime, cfg.precision, threads=threads, gpu=gpu, contract=contract)
    except (RuntimeChoiceError, ContractError) as e:
        raise RunError(str(e)) from None


def _run(cfg, contract, model_sha, out, done, run_id, started, t_start, lock, secret, choice, t_ray,
         damaged=()) -> RunSummary:
    """The run on Ray: its plan, the predictor pool and the driver (``engine.driver``)."""
    plan = plan_workers(cfg)
    if plan["use_gpu"] != (choice.isa == "CUDA"):  # Ray saw otherwise than this machine: decide again
        choice = choose_inference(cfg, gpu=plan["use_gpu"])
        if sha256_file(choice.model) != model_sha:
            raise RunError("the Ray runtime's devices call for another model file than this machine's; "
                           "give --device and --precision explicitly")
    ctx = RunContext(cfg, contract, model_sha, run_id, out, secret, choice, started, t_start, t_ray, tuple(damaged))
    spec = {**contract.decode_kwargs(), "max_pixels": cfg.max_pixels, "pseudonym_key": cfg.pseudonym_key,
            "thumbnails": cfg.thumbnails, "fast_jpeg": cfg.fast_jpeg}
    writer = PartWriter(out / PREDICTIONS, run_id, cfg.rows_per_part, cfg.part_seconds, secret=secret)
    driver = Driver(ctx, RayPool(ctx, plan, spec), writer, done, plan, lock.lost.is_set)
    return driver.run(lambda admitted: _first_small(_chunks(admitted, cfg.batch_size)))


__all__ = ["ScreenConfig", "run", "RunError", "OutputError", "ModelError", "RunSummary", "decode_batch",
           "PredictorActor", "EXIT_OK", "EXIT_FILE_ERRORS", "EXIT_BAD_RUN", "EXIT_OUTPUT_FAILED"]
