"""The screening run: configuration, Ray start-up, and the driver.

The driver takes OUT_DIR's lock (``engine.lock``), walks the inputs lazily
(``engine.sources``), skips what OUT_DIR already holds (``engine.sink.DoneIndex``), submits
batches of paths to the Ray workers (``engine.workers``) and writes the small rows that come
back (``engine.sink.PartWriter``); at the end it builds studies and the report
(``engine.report.build_report``). Pixels never reach the driver; at most ``max_in_flight``
batches exist at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import platform
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .contract import DISCLAIMER, Contract, ContractError, read_contract, sha256_file
from .decode import MAX_PIXELS
from .exits import Exit
from .lock import LockedError, OutDirLock
from .privacy import shown_path
from .reasons import INTERNAL
from .report import REPORT, RUN, build_report, write_json
from .rows import Row, Status
from .runtimes import ModelError
from .shift import STATS, Histograms, compare
from .sink import (PREDICTIONS, SECRET, DoneIndex, KeySet, OutputError, PartWriter, SecretError, file_key, out_secret,
                   row_key, set_aside_damaged)
from .sources import iter_inputs
from .studies import STUDIES
from .stats import Progress, Reservoir
from .workers import PredictorActor, decode_batch

log = logging.getLogger(__name__)

#: Exit codes of covidct-batch (documented in the README).
# covidct-batch's exit codes, from the one table of every command (engine.exits)
EXIT_OK = Exit.OK                        # every file ok or skipped
EXIT_FILE_ERRORS = Exit.FILE_ERRORS      # the run completed; some files are error rows (this run's or still current)
EXIT_BAD_RUN = Exit.BAD_INPUT            # nothing done: bad options, no model, broken contract, Ray unreachable, ...
EXIT_OUTPUT_FAILED = Exit.OUTPUT_FAILED  # stopped: a part could not be written (disk full); rerun to resume
EXIT_INTERRUPTED = Exit.INTERRUPTED


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
            raise RunError(f"--batch-size must be >= 1, e.g. 32; got {self.batch_size}")
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
    # Decoders' own messages (libpng, libjpeg) go to the workers' logs, not the console: the row says it.
    kwargs = dict(include_dashboard=False, log_to_driver=cfg.worker_logs, configure_logging=False)
    on_term = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        with _utf8_process_names():
            _init_ray(cfg, kwargs)
    except SystemExit as e:  # Ray's own SIGTERM handler, in place while it starts: end like Ctrl-C
        if callable(on_term):
            signal.signal(signal.SIGTERM, on_term)
        if e.code in (signal.SIGTERM, 1):
            raise KeyboardInterrupt from None
        raise
    except RunError:
        raise
    except Exception as e:  # ConnectionError, auth failures, bad address
        log.debug("Ray start-up failed", exc_info=True)
        raise RunError(f"cannot start or join Ray ({cfg.address or 'local'}): {e}. A cluster made with "
                       "`ray start` needs RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN or ~/.ray/auth_token)")
    if callable(on_term):  # Ray's core worker replaces it with one that exits at once: keep the caller's
        signal.signal(signal.SIGTERM, on_term)
    tighten_token_file()
    return True


@contextlib.contextmanager
def _utf8_process_names():
    """Ray records the driver's argv and working folder as UTF-8 text: a name that is not UTF-8 (an INPUT,
    --out, the current folder) would stop it from starting. While it starts, argv shows such bytes as
    escapes and the working folder is /; the run's own paths are absolute already."""
    argv, orig, cwd = sys.argv, getattr(sys, "orig_argv", None), None
    try:
        os.getcwd().encode("utf-8")
    except UnicodeEncodeError:
        cwd = os.getcwd()
    except OSError:  # the current folder was removed
        cwd = None
    def shown(args):
        return [a.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for a in args]

    sys.argv = shown(argv)
    if orig is not None:
        sys.orig_argv = shown(orig)
    import ray._private.utils as ray_utils  # it names the job by /proc/self/cmdline, as text
    entrypoint = getattr(ray_utils, "get_entrypoint_name", None)
    if entrypoint is not None:
        ray_utils.get_entrypoint_name = lambda: " ".join(shown(orig or argv))
    if cwd is not None:
        os.chdir("/")
    try:
        yield
    finally:
        sys.argv = argv
        if orig is not None:
            sys.orig_argv = orig
        if entrypoint is not None:
            ray_utils.get_entrypoint_name = entrypoint
        if cwd is not None:
            os.chdir(cwd)


def _init_ray(cfg: ScreenConfig, kwargs: dict) -> None:
    """A local runtime (with its reaper), or the cluster ``--address`` names, after its checks."""
    import ray

    if cfg.address is None:
        # Ray's default store is 30% of RAM; its shared pages, once touched, stay in RSS, so a
        # long run would grow towards it. At most max_in_flight batches exist: cap it.
        # address="local": always a new runtime, never one named by a stale /tmp/ray/ray_current_cluster
        global _REAPER
        if _REAPER is None:  # before Ray starts: whatever ends this driver, its runtime goes with it
            from . import reaper
            _REAPER = reaper.start()
        ray.init(address="local", num_cpus=cfg.num_cpus or os.cpu_count(),
                 object_store_memory=cfg.object_store_mb << 20, **kwargs)
    else:
        address = resolve_address(cfg.address)  # "auto" and RAY_ADDRESS get the same check as host:port
        check_reachable(address)
        if not cfg.allow_unauthenticated_cluster and not requires_token(address):
            raise RunError(f"the Ray cluster at {address} answers without authentication (started with "
                           "RAY_AUTH_MODE=disabled?): anyone who reaches its ports can run code on it. Restart "
                           "it with token authentication, or pass --allow-unauthenticated-cluster to accept that")
        ray.init(address=address, **kwargs)


#: The watcher that ends this driver's local Ray runtime when the driver is gone (engine.reaper).
_REAPER = None


def resolve_address(address: str) -> str:
    """The GCS host:port that ``--address`` names: "auto" is the cluster Ray itself would join (RAY_ADDRESS,
    or the one this machine's ``ray start`` recorded), so that every way of naming a cluster is checked."""
    if address != "auto":
        return address
    try:
        from ray._private.services import canonicalize_bootstrap_address
        found = canonicalize_bootstrap_address("auto")
    except Exception as e:  # noqa: BLE001  Ray raises ConnectionError and others when none is found
        raise RunError(f"--address auto: no running Ray cluster found on this machine ({str(e).splitlines()[0]})") \
            from None
    if not found:
        raise RunError("--address auto: no running Ray cluster found on this machine")
    return found


def _is_gcs_address(address: str) -> bool:
    """Whether ``--address`` names a GCS host:port (not "auto", "local" or a ray:// client URL)."""
    return address not in ("auto", "local") and "://" not in address


def requires_token(address: str, timeout: float = 10.0) -> bool:
    """Whether the cluster's GCS refuses a call that carries no token (False: it is open to anyone).

    One unauthenticated read of the node table through Ray's own gRPC stubs; anything but a
    success counts as protected (ray.init then reports what is wrong)."""
    if not _is_gcs_address(address):
        return True
    try:
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:  # a Ray without these stubs: cannot tell, do not block
        log.warning("cannot check whether the Ray cluster at %s requires a token", address)
        return True
    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetAllNodeInfo(
                gcs_service_pb2.GetAllNodeInfoRequest(), timeout=timeout)
        except grpc.RpcError:
            return True
    return False


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes, when ``--address`` cannot be reached (Ray itself retries for long)."""
    if not _is_gcs_address(address):
        return
    import socket

    host, _, port = address.rpartition(":")
    host, port = (host or address).strip("[]"), int(port) if port.isdigit() else 6379
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise RunError(f"cannot reach the Ray cluster at {address}: {e.strerror or e} (is `ray start --head` "
                       "running there, and is the port open from here?)") from None


def tighten_token_file() -> None:
    """Ray writes ~/.ray/auth_token world-readable (0644): a local user could join the runtime. Make it 0600."""
    path = Path.home() / ".ray" / "auth_token"
    try:
        st = path.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            path.chmod(0o600)
    except OSError:
        pass


def cpu_predictors(cfg: ScreenConfig, node_cpus: int, nodes: int = 1) -> tuple[int, int]:
    """(predictors, threads each) on CPU nodes: one single-threaded predictor per CPU (up to 16 a
    node), each decoding its own batches (see ``plan_workers``)."""
    predictors = cfg.predictors or min(node_cpus, 16) * nodes
    return predictors, cfg.inference_threads or max(1, node_cpus * nodes // predictors)


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
    ids = [n["NodeID"] for n in nodes]
    if use_gpu:
        # GPU: decode tasks on every CPU feed one predictor per GPU through the object store
        predictors, threads = cfg.predictors or gpus, cfg.inference_threads or 2
        decode_slots = max(1, int(cpus / max(cfg.decode_cpus, 1e-3)))
        return {"nodes": len(nodes), "node_ids": ids, "cpus": cpus, "gpus": gpus, "use_gpu": True, "fused": False,
                "predictors": predictors, "inference_threads": threads, "decode_slots": decode_slots,
                "actor_cpus": 1, "max_in_flight": cfg.max_in_flight or (decode_slots + 2 * predictors)}
    # CPU: each predictor decodes its own batch, then runs it. Separate decode tasks beside
    # predictors put two runnable processes on every core and hand every batch between processes:
    # measured on 2 cores (compact model, 5,000 slices), 197 images/s steady against 2 cores over
    # (decode + inference) = 296 for the work itself.
    predictors, threads = cpu_predictors(cfg, node_cpus, len(nodes))
    per_node = -(-predictors // len(nodes))
    return {"nodes": len(nodes), "node_ids": ids, "cpus": cpus, "gpus": gpus, "use_gpu": False, "fused": True,
            "predictors": predictors, "inference_threads": threads, "decode_slots": 0,
            "actor_cpus": min(1.0, node_cpus / per_node),
            "max_in_flight": cfg.max_in_flight or 2 * predictors}


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
            _shutdown_ray()


def _shutdown_ray() -> None:
    """``ray.shutdown()`` with SIGTERM held off: it resets the C-level handler, and a SIGTERM in that second
    would kill the driver with 143, its lock file left and no summary. One that arrives is raised after as
    Ctrl-C (exit 130; every part is already whole)."""
    import ray

    main = threading.current_thread() is threading.main_thread()
    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: got.append(s)) if main else None
    try:
        ray.shutdown()
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous if callable(previous) or previous in (signal.SIG_DFL,
                                                                                          signal.SIG_IGN)
                          else signal.SIG_DFL)
    if got and callable(previous):
        previous(signal.SIGTERM, None)


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
    import ray

    plan = plan_workers(cfg)
    if plan["use_gpu"] != (choice.isa == "CUDA"):  # Ray saw otherwise than this machine: decide again
        choice = choose_inference(cfg, gpu=plan["use_gpu"])
        if sha256_file(choice.model) != model_sha:
            raise RunError("the Ray runtime's devices call for another model file than this machine's; "
                           "give --device and --precision explicitly")
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def placement(i: int):
        # SPREAD is best effort and packs zero-CPU actors on one node: pin them round-robin.
        if plan["use_gpu"]:
            return "SPREAD"
        return NodeAffinitySchedulingStrategy(plan["node_ids"][i % len(plan["node_ids"])], soft=False)

    device = "cuda" if plan["use_gpu"] else "cpu"  # Ray saw no GPU: do not let ONNX Runtime try one
    actors: list = []
    info_refs: list = []
    ready: dict[int, dict] = {}  # actor index -> its info, once it answered
    providers: list[str] = []

    # Predictor i runs on node i % nodes. The first starts with the first batch, with those on other
    # nodes; the others on the first node once the first rows are written, so that on a small machine
    # they do not slow the first row down.
    nodes = len(plan["node_ids"])
    order = [0] + [i for i in range(1, plan["predictors"]) if i % nodes] + \
        [i for i in range(1, plan["predictors"]) if not i % nodes]
    first_wave = 1 + sum(1 for i in range(1, plan["predictors"]) if i % nodes)

    def add_actors(n: int) -> None:
        """Start predictors up to the ``n``-th of ``order``."""
        for k in range(len(actors), min(n, len(order))):
            actors.append(ray.remote(PredictorActor).options(
                num_cpus=plan["actor_cpus"] if plan["fused"] else 1, num_gpus=1 if plan["use_gpu"] else 0,
                max_restarts=3, max_task_retries=3, scheduling_strategy=placement(order[k]),
            ).remote(str(Path(choice.model).resolve()), plan["inference_threads"], device, model_sha, run_id,
                     choice.runtime, choice.precision))
            info_refs.append(actors[-1].info.remote())

    def actor_ready(i: int) -> None:
        """A predictor's rows are written only once it answered: a model it cannot load stops the run."""
        if i in ready:
            return
        try:
            ready[i] = info = ray.get(info_refs[i])
        except ray.exceptions.RayActorError as e:
            raise RunError(f"predictor actors could not start: {e}") from None
        if info["provider"] not in providers:
            providers.append(info["provider"])
        if info.get("note") and info["note"] not in choice.notes:
            choice.notes.append(info["note"])
        summary.provider = ",".join(providers)

    def predictors_ready() -> None:
        for i in range(len(actors)):
            actor_ready(i)
        log.info("Ray: %d node(s), %d CPU(s), %d GPU(s); %d predictor(s) x %d thread(s) on %s (ready at %.1f s)",
                 plan["nodes"], plan["cpus"], plan["gpus"], len(actors), plan["inference_threads"],
                 summary.provider or "-", time.monotonic() - t_start)
    decode = ray.remote(decode_batch).options(num_cpus=cfg.decode_cpus, max_retries=3)
    spec = {**contract.decode_kwargs(), "max_pixels": cfg.max_pixels, "pseudonym_key": cfg.pseudonym_key,
            "thumbnails": cfg.thumbnails, "fast_jpeg": cfg.fast_jpeg}
    spec_ref = ray.put(spec)

    writer = PartWriter(out / PREDICTIONS, run_id, cfg.rows_per_part, cfg.part_seconds, secret=secret)
    summary = RunSummary(out=out)
    shift_hist = Histograms()  # this run's slices, in the reference's fixed bins: bounded memory
    stages = {k: Reservoir() for k in ("read_ms", "decode_ms", "infer_ms", "batch_latency_ms")}
    progress = Progress(cfg.progress)
    listed = KeySet()  # files named on the command line or in --from-list may be named twice
    seen = KeySet()  # file_id of every file this run found
    in_flight: dict = {}  # ref -> (items, submitted monotonic, actor index)
    walked = {"total": 0, "finished": False}
    t_first_row: list[float] = []  # when the first rows came back, and how many they were

    def todo():
        for item in iter_inputs(cfg.inputs, cfg.from_list, exclude=[out, *cfg.exclude]):
            walked["total"] += 1
            fid = file_key(item.path, secret)  # which file a row is about, once per file
            seen.add(fid)  # 8 bytes a file: which earlier error rows still decide the exit
            key = row_key(item.path, item.size, item.mtime_ns, model_sha, secret)
            if key in done:
                summary.already_done += 1
                continue
            if item.listed:  # a walk yields each file once; only named files can come twice
                if key in listed:
                    continue
                listed.add(key)
            if item.error:  # not opened (special file) or could not be stat'ed: a row straight from the driver
                writer_rows([_driver_row(item, key, fid, item.reason, item.error, contract, model_sha, run_id,
                                         Status.SKIPPED if item.skipped else Status.ERROR, cfg.pseudonym_key)])
                continue
            yield item, key, fid
        walked["finished"] = True

    def writer_rows(rows):
        if lock.lost.is_set():
            raise OutputError("the lock of OUT_DIR was taken by another run; this run stopped writing")
        writer.add(rows)
        for r in rows:
            summary.counts[str(r.status)] += 1
            if r.status == Status.OK:
                summary.labels[r.label] += 1
                shift_hist.add({k: getattr(r, k) for k in STATS} if r.input_detail is not None else None,
                               r.probability)
            else:
                summary.reasons[(str(r.status), str(r.reason))] += 1
            for k in ("read_ms", "decode_ms", "infer_ms"):
                v = getattr(r, k)
                if v is not None and (k != "decode_ms" or r.status == Status.OK):
                    stages[k].add((v,))

    def drain(block_for: int) -> None:
        done_refs, _ = ray.wait(list(in_flight), num_returns=min(block_for, len(in_flight)))
        for ref in done_refs:
            items, t_sub, actor = in_flight.pop(ref)
            load[actor] -= 1
            actor_ready(actor)
            try:
                rows = ray.get(ref)
            except (ray.exceptions.RayError) as e:  # task/actor died beyond retries: rows, not loss
                msg = type(e).__name__  # its text may quote a path: keep identifiers out of the output
                rows = [_driver_row(it, key, fid, INTERNAL, f"worker failed ({msg}); rerun to retry", contract,
                                    model_sha, run_id, pseudonym_key=cfg.pseudonym_key) for it, key, fid in items]
            stages["batch_latency_ms"].add(((time.monotonic() - t_sub) * 1e3,))
            writer_rows(rows)
            if not t_first_row:
                log.debug("startup: first rows written at %.2f s", time.monotonic() - t_start)
                t_first_row.extend((time.monotonic(), sum(summary.counts.values())))
                add_actors(plan["predictors"])
        total = walked["total"] - summary.already_done if walked["finished"] else None
        progress.update(sum(summary.counts.values()), total, summary.counts["error"])

    def record(state: str) -> dict:
        return {"state": state, **_run_record(cfg, contract, model_sha, run_id, plan, providers, summary, stages,
                                              started, writer, t_start, choice, t_ray),
                "damaged_parts": list(damaged)}

    write_json(out / RUN, record("running"))  # covidct-report can rebuild from OUT_DIR even if this run dies
    load: Counter = Counter()  # actor index -> batches in flight on it
    try:
        for batch in _first_small(_chunks(todo(), cfg.batch_size)):
            while len(in_flight) >= plan["max_in_flight"]:
                drain(1)
            items = [(i.path, i.size, i.mtime_ns, key, fid) for i, key, fid in batch]
            if not actors:
                log.debug("startup: first batch submitted at %.2f s", time.monotonic() - t_start)
            if plan["fused"]:
                add_actors(first_wave)
                a = min(range(len(actors)), key=lambda i: load[i])  # the least busy predictor
                ref = actors[a].screen.remote(items, spec_ref)
            else:
                dref = decode.remote(items, spec_ref)
                add_actors(first_wave)  # after the first decode: it takes a worker Ray started beforehand
                a = min(range(len(actors)), key=lambda i: load[i])
                ref = actors[a].predict.remote(dref)
                del dref  # the actor call holds the only reference: the batch is freed once predicted
            load[a] += 1
            in_flight[ref] = (batch, time.monotonic(), a)
        while in_flight:  # one at a time: each batch's rows are written as soon as it is back
            drain(1)
        predictors_ready()
        writer.flush()
    except (OutputError, KeyboardInterrupt) as e:
        progress.update(sum(summary.counts.values()), None, summary.counts["error"], force=True)
        with contextlib.suppress(OSError, OutputError):  # the disk may be full: the record is best effort
            write_json(out / RUN, record("stopped: output not written" if isinstance(e, OutputError)
                                         else "interrupted"))
        raise
    progress.update(sum(summary.counts.values()), walked["total"] - summary.already_done, summary.counts["error"],
                    force=True)

    t_end = time.monotonic()
    n = sum(summary.counts.values())
    summary.seconds = t_end - t_start
    summary.images_per_s = n / summary.seconds if summary.seconds else 0.0
    if t_first_row and n - t_first_row[1] >= 100 and t_end > t_first_row[0]:  # too few rows: no steady state
        summary.steady_images_per_s = (n - t_first_row[1]) / (t_end - t_first_row[0])
    summary.exit_code = EXIT_FILE_ERRORS if summary.counts["error"] else EXIT_OK
    if walked["total"] == 0:  # an empty folder, an unmounted share: nothing was done, and the code says so
        summary.exit_code = EXIT_BAD_RUN
    summary.run = record("complete")
    summary.run["files_found"] = walked["total"]
    summary.run["shift"] = compare(contract.reference, shift_hist)
    summary.run["shift"]["scope"] = "the slices predicted by this run"
    write_json(out / RUN, summary.run)
    try:
        summary.run = build_report(out, cfg.top_k, cfg.group_by, seen=seen)
    except OutputError:
        raise
    except Exception as e:  # noqa: BLE001  OSError, DuckDB's IOException: studies/report could not be written
        if not _is_output_failure(e):
            raise
        raise OutputError(f"studies.parquet/report.html could not be written ({str(e).splitlines()[0][:200]}); "
                          "every prediction part is intact, and covidct-report OUT_DIR rebuilds them") from None
    cur = summary.run["current"]
    if cur["error"] - summary.run.get("current_errors_not_found", 0) and summary.exit_code == EXIT_OK:
        # error rows of earlier runs are still there (deterministic ones are not retried): say so
        summary.exit_code = summary.run["exit_code"] = EXIT_FILE_ERRORS
        write_json(out / RUN, summary.run)
    return summary


def _is_output_failure(e: Exception) -> bool:
    """A write that failed for want of space or permission (OSError, or DuckDB's IO error saying so)."""
    import errno
    if isinstance(e, OSError):
        return True
    text = str(e).lower()
    return type(e).__name__ in ("IOException", "IOError") or any(
        w in text for w in ("no space left", "disk quota", "read-only file system", "permission denied",
                            os.strerror(errno.ENOSPC).lower()))


def _driver_row(item, key: int, file_id: int, reason: str, message: str, contract: Contract, model_sha: str,
                run_id: str, status: Status = Status.ERROR, pseudonym_key: str | None = None) -> Row:
    return Row(path=shown_path(item.path, pseudonym_key), key=key, file_id=file_id, status=status, reason=reason,
               message=message, threshold=contract.threshold, model_sha256=model_sha,
               file_size=item.size if item.size >= 0 else None,
               mtime_ns=item.mtime_ns if item.mtime_ns >= 0 else None, run_id=run_id)


def _config_record(cfg: ScreenConfig) -> dict:
    """The run's options for run.json. Input paths may name patients: under --pseudonymize they are
    recorded as pseudonyms, and the key itself never."""
    rec = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    if cfg.pseudonym_key:
        rec["pseudonym_key"] = "<set>"
        rec["inputs"] = [shown_path(os.path.abspath(p), cfg.pseudonym_key) for p in cfg.inputs]
        rec["from_list"] = "<set>" if cfg.from_list else None
    return rec


def _run_record(cfg, contract, model_sha, run_id, plan, providers, summary, stages, started, writer, t_start,
                choice, t_ray) -> dict:
    import cv2
    import onnxruntime
    import pyarrow
    import ray

    first_row_s = (writer.first_write_at - started) if writer.first_write_at else None
    ray_up = t_ray - t_start
    return {
        "disclaimer": DISCLAIMER,
        "run_id": run_id,
        "started": dt.datetime.fromtimestamp(started, dt.timezone.utc).isoformat(),
        "ended": dt.datetime.now(dt.timezone.utc).isoformat(),
        "config": _config_record(cfg),
        "workers": plan,
        "model": {"path": str(cfg.model), "sha256": model_sha, "contract": json.loads(contract.to_json())},
        "execution_providers": providers,
        "inference": choice.to_dict(),
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
        "startup_s": {"ray_up": round(ray_up, 3),
                      "first_row_after_ray": round(first_row_s - ray_up, 3) if first_row_s is not None else None},
        "latency_ms": {k: r.percentiles() for k, r in stages.items()},
        "rows_written": writer.rows_written,
        "exit_code": summary.exit_code,
    }


__all__ = ["ScreenConfig", "run", "RunError", "OutputError", "ModelError", "RunSummary", "decode_batch",
           "PredictorActor", "EXIT_OK", "EXIT_FILE_ERRORS", "EXIT_BAD_RUN", "EXIT_OUTPUT_FAILED"]
