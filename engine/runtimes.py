"""Which inference runtime and precision a run uses, chosen at run time from what the machine offers.

Two runtimes read the same ONNX file and its contract: ONNX Runtime (always installed; the CUDA
provider where there is a GPU) and OpenVINO (optional: ``pip install 'covidct-batch[openvino]'``).
Three precisions: ``fp32`` (the exported model), ``int8`` (its QDQ twin ``NAME.int8.onnx``, written
by ``covidct-export --int8``) and ``bf16`` (the FP32 file run with OpenVINO's BF16 hint).

``choose`` decides, once per run, on the driver's machine:

- a runtime other than ONNX Runtime must pass the FP32 parity check (same probabilities within
  ``PARITY_TOLERANCE`` on a probe batch) and is chosen by ``--runtime auto`` only where it was
  *measured* faster on this CPU (interleaved rounds, best of each, ``MARGIN`` to switch);
- a reduced precision is opt-in (``--precision``). Where the CPU lacks its instructions (VNNI for
  INT8, BF16 for BF16) the run says so; BF16 then falls back to FP32, and INT8 is kept only where it
  was measured faster than FP32 here. Nothing runs slower than FP32 by surprise.

Measurements are cached per machine (CPU, flags, runtime versions, model files, threads) in
``$XDG_CACHE_HOME/covidct-batch/runtime-choice.json``, so only the first run on a machine pays them.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .contract import read_contract

log = logging.getLogger(__name__)

ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
RUNTIMES = (ONNXRUNTIME, OPENVINO)
FP32, INT8, BF16 = "fp32", "int8", "bf16"
PRECISIONS = (FP32, INT8, BF16)
AUTO = "auto"
#: The values of --runtime, --device (every command that runs a model) and --thumbnails: defined here only.
RUNTIME_CHOICES = (AUTO, *RUNTIMES)
DEVICES = (AUTO, "cpu", "cuda")
THUMBNAILS = (AUTO, "on", "off")

#: FP32 probabilities of another runtime may differ from ONNX Runtime's by at most this much.
PARITY_TOLERANCE = 1e-4
#: INT8 probabilities of another runtime may differ from ONNX Runtime's INT8 by at most this much.
INT8_PARITY_TOLERANCE = 0.02
#: Another runtime or a reduced precision must be this much faster to be chosen.
MARGIN = 1.05

#: CPU flags (``/proc/cpuinfo``) that decide which kernels run fast, named beside every figure.
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> list[str]:
    """The flags of CPU_FLAGS this machine has, in that order."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next(line for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    have = set(line.split(":", 1)[1].split())
    return [f for f in CPU_FLAGS if f in have]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or "unknown CPU"


def isa(precision: str, flags: list[str]) -> str:
    """The best instruction set this CPU offers the kernels of ``precision``."""
    f = set(flags)
    if precision == INT8:
        for flag, name in (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI")):
            if flag in f:
                return name
        return ("AVX-512 (no VNNI)" if "avx512f" in f else "AVX2 (no VNNI)" if "avx2" in f else "SSE (no VNNI)")
    if precision == BF16:
        for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX-512 BF16")):
            if flag in f:
                return name
        return "none (no BF16 instructions)"
    return "AVX-512" if "avx512f" in f else "AVX2+FMA" if {"avx2", "fma"} <= f else "AVX2" if "avx2" in f else "SSE"


def openvino_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("openvino") is not None


def int8_twin(model: Path) -> Path:
    """Where ``covidct-export --int8`` writes the INT8 model of ``model``."""
    return Path(model).with_suffix(".int8.onnx")


class RuntimeChoiceError(RuntimeError):
    """The asked-for runtime or precision cannot run this model here; raised before any work."""


# --------------------------------------------------------------------------- backends

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class ModelError(RuntimeError):
    """The model cannot be loaded or used; raised before any work starts."""


def cuda_available() -> bool:
    """True when ONNX Runtime was built with CUDA *and* this machine has an NVIDIA device.

    ``get_available_providers()`` lists CUDA for the onnxruntime-gpu wheel even on a machine
    without a GPU (and the session then falls back to the CPU, noisily), so look for a device
    too; the session's own provider list is still what gets reported.
    """
    import glob

    import onnxruntime as ort

    return CUDA in ort.get_available_providers() and bool(glob.glob("/dev/nvidia[0-9]*"))


def make_session(model_path: str, threads: int, device: str = "auto"):
    """An InferenceSession with ``threads`` intra-op threads; returns (session, provider in use).

    ``device``: "auto" (CUDA when a GPU answers, else CPU), "cuda" (fail if no GPU), "cpu".
    Spinning is off: idle inference threads yield their core to the decode tasks beside them
    instead of burning it while they wait for the next batch.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    providers = [CPU]
    if device in ("auto", "cuda") and cuda_available():
        try:
            ort.preload_dlls()  # CUDA/cuDNN libraries installed from pip (nvidia-* wheels)
        except Exception as e:  # missing libraries: CUDA will fail below and we fall back or raise
            log.debug("preload_dlls: %s", e)
        providers = [(CUDA, {"device_id": 0}), CPU]
    try:  # a path, or the bytes of the file (engine.runtimes.load hashed them)
        session = ort.InferenceSession(model_path if isinstance(model_path, bytes) else str(model_path), opts,
                                       providers=providers)
    except Exception as e:
        name = "the model" if isinstance(model_path, bytes) else model_path
        raise ModelError(f"cannot load {name} with {providers}: {e}") from None
    in_use = session.get_providers()[0]
    if device == "cuda" and in_use != CUDA:
        raise ModelError("--device cuda was asked for but ONNX Runtime fell back to the CPU "
                         "(no GPU, or CUDA/cuDNN libraries missing: pip install 'onnxruntime-gpu[cuda,cudnn]')")
    return session, in_use


class Backend:
    """One loaded model: ``run(uint8 NHWC batch) -> probabilities``; ``metadata`` is the file's own."""

    runtime: str
    device: str  # what the rows' ``provider`` column says
    metadata: dict[str, str]

    def run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class OrtBackend(Backend):
    runtime = ONNXRUNTIME

    def __init__(self, model: str, threads: int, device: str = "cpu"):
        self.session, self.device = make_session(model, threads, device)
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        self._in, self._out = self.session.get_inputs()[0].name, self.session.get_outputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self._out], {self._in: x})[0].reshape(-1)


class OpenVinoBackend(Backend):
    """OpenVINO on the CPU; ``bf16`` sets its inference precision hint (FP32 weights, BF16 maths)."""

    runtime = OPENVINO
    device = "OpenVINO:CPU"

    def __init__(self, model: str, threads: int, precision: str = FP32):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": max(1, int(threads)), "PERFORMANCE_HINT": "LATENCY",
                  "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False,  # Ray's decode tasks share these cores
                  "INFERENCE_PRECISION_HINT": "bf16" if precision == BF16 else "f32"}
        try:
            graph = core.read_model(io.BytesIO(model) if isinstance(model, bytes) else str(model))
            self.compiled = core.compile_model(graph, "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses with long texts
            name = "the model" if isinstance(model, bytes) else model
            raise RuntimeChoiceError(f"OpenVINO cannot compile {name}: {str(e).splitlines()[0][:300]}") from None
        # the ONNX file's metadata_props (the contract among them) under rt_info "framework"
        info = graph.get_rt_info()
        framework = info["framework"] if "framework" in info else {}
        self.metadata = {k: framework[k].astype(str) for k in framework.keys()}
        self.request = self.compiled.create_infer_request()

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.request.infer({0: x})[0]).reshape(-1)


def load(model: str, runtime: str, precision: str, threads: int, device: str = "cpu",
         expected_sha256: str | None = None) -> Backend:
    """The backend for one (runtime, precision); ``model`` is already the file of that precision.

    With ``expected_sha256`` the file is read once, its bytes are hashed and loaded: a file replaced after
    the run hashed it (a re-export to the same path) is refused, never run under the old hash."""
    source: str | bytes = model
    if expected_sha256:
        data = Path(model).read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise ModelChangedError(f"{model} changed since the run started (sha256 {actual[:12]}, the run's "
                                    f"{expected_sha256[:12]}): rerun to screen with the new model")
        source = data
    if runtime == OPENVINO:
        return OpenVinoBackend(source, threads, precision)
    return OrtBackend(source, threads, device)


class ModelChangedError(RuntimeError):
    """The model file is no longer the one the run hashed."""


# --------------------------------------------------------------------------- the choice

@dataclass
class Choice:
    """What a run uses, why, and what was measured; recorded in run.json, the summary and the report."""

    runtime: str
    precision: str
    model: str                      # the file the predictors load (the INT8 twin for int8)
    isa: str
    cpu: str
    cpu_flags: list[str]
    threads: int
    asked: dict = field(default_factory=dict)        # --runtime / --precision as given
    measured: dict = field(default_factory=dict)     # candidate -> images/s (one thread, probe batches)
    parity: dict = field(default_factory=dict)       # candidate -> max |p - ONNX Runtime's p|
    notes: list[str] = field(default_factory=list)   # fallbacks and missing instructions, in words
    source: str = "measured"                         # "measured", "cache" or "forced"

    def to_dict(self) -> dict:
        return asdict(self)


def describe(inf: dict) -> str:
    """Runtime, precision, instruction set and CPU flags of a run (``Choice.to_dict()``), in one line."""
    speed = inf.get("measured", {}).get(f"{inf['runtime']}/{inf['precision']}")
    return (f"{inf['runtime']} {inf['precision'].upper()} on {inf['isa']} [CPU flags: "
            f"{' '.join(inf.get('cpu_flags') or []) or 'none listed'}]"
            + (f"; {speed:.0f} images/s a thread when chosen ({inf.get('source')})" if speed else
               f" ({inf.get('source')})"))


def agreement_line(ag: dict) -> str:
    """A reduced-precision model's measured agreement with FP32 (its contract's ``agreement``), in words."""
    auc = (f", ROC AUC {ag['auc']:.4f} against FP32's {ag['auc_fp32']:.4f}" if ag.get("auc") is not None else "")
    return (f"agreement with FP32 measured at export on {ag['n']} test-split slices: "
            f"{ag['label_agreement']:.1%} of labels equal{auc}")


def _probe(contract, n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, contract.height, contract.width, contract.channels),
                                             dtype=np.uint8)


def speeds(backends: dict, x: np.ndarray, rounds: int, budget_s: float) -> dict:
    """Images/s of each backend on ``x``: interleaved rounds (a busy machine slows all alike), best of each."""
    best = {k: float("inf") for k in backends}
    t_end = time.perf_counter() + budget_s
    for r in range(rounds):
        for k, b in backends.items():
            t = time.perf_counter()
            b.run(x)
            best[k] = min(best[k], time.perf_counter() - t)
        if r >= 1 and time.perf_counter() > t_end:
            break
    return {k: round(len(x) / v, 1) for k, v in best.items()}


def _cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "covidct-batch" / "runtime-choice.json"


def _cache_key(files: list[Path], threads: int, flags: list[str], asked: dict) -> str:
    import onnxruntime
    versions = [onnxruntime.__version__]
    if openvino_installed():
        from importlib.metadata import version
        versions.append(version("openvino"))
    parts = [cpu_name(), " ".join(flags), str(os.cpu_count()), str(threads), json.dumps(asked, sort_keys=True),
             *versions, *(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


class _Cache:
    """The per-machine cache of measured choices; one writer at a time (flock)."""

    def __init__(self, path: Path | None = None):
        self.path = path or _cache_path()

    def __enter__(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path.with_suffix(".lock"), "a")
            fcntl.flock(self._f, fcntl.LOCK_EX)
        except OSError:
            self._f = None
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}
        return self

    def save(self) -> None:
        try:
            from .atomic import write_atomic

            write_atomic(self.path, json.dumps(self.data, indent=1))
        except OSError as e:
            log.debug("runtime choice not cached: %s", e)

    def __exit__(self, *exc):
        if self._f:
            self._f.close()


def choose(model: Path, runtime: str = "auto", precision: str = FP32, threads: int = 1, gpu: bool = False,
           probe_images: int = 8, use_cache: bool = True, contract=None) -> Choice:
    """Decide the runtime and precision of a run (see the module's text); raises RuntimeChoiceError.

    ``contract``: the model's, when the caller has read it already."""
    if runtime not in RUNTIME_CHOICES:
        raise RuntimeChoiceError(f"--runtime must be auto, {ONNXRUNTIME} or {OPENVINO}; got {runtime!r}")
    if precision not in PRECISIONS:
        raise RuntimeChoiceError(f"--precision must be fp32, int8 or bf16; got {precision!r}")
    model = Path(model)
    contract = contract or read_contract(model)
    flags = cpu_flags()
    asked = {"runtime": runtime, "precision": precision}
    if contract.precision == INT8:  # given the INT8 file itself: that is the precision
        precision, fp32_file = INT8, None
    else:
        fp32_file = model
    notes: list[str] = []
    base = dict(cpu=cpu_name(), cpu_flags=flags, threads=threads, asked=asked)

    if runtime == OPENVINO and not openvino_installed():
        raise RuntimeChoiceError("--runtime openvino: OpenVINO is not installed (pip install 'covidct-batch[openvino]')")
    if gpu:  # the CUDA provider: FP32 through ONNX Runtime; reduced precisions are CPU paths here
        if runtime == OPENVINO:
            raise RuntimeChoiceError("--runtime openvino runs on the CPU; this run uses the GPU (give --device cpu)")
        if precision != FP32 and fp32_file is not None:
            notes.append(f"{precision.upper()} is a CPU path here; the GPU runs FP32")
            precision = FP32
        return Choice(ONNXRUNTIME, precision, str(model), "CUDA", notes=notes, source="forced", **base)

    int8_file = int8_twin(model) if fp32_file is not None else model
    if precision == INT8 and not int8_file.is_file():
        raise RuntimeChoiceError(f"--precision int8: no INT8 model {int8_file} beside {model} "
                                 "(write one with covidct-export --int8)")
    if precision == INT8 and not any(f in flags for f in VNNI_FLAGS):
        notes.append(f"this CPU has no VNNI ({'/'.join(VNNI_FLAGS)}): INT8 runs without its fast path"
                     + (", and is kept only where measured faster than FP32" if fp32_file is not None else
                        " (the INT8 file was given: no FP32 to fall back to)"))
    if precision == BF16 and not any(f in flags for f in BF16_FLAGS):
        notes.append(f"this CPU has no BF16 instructions ({'/'.join(BF16_FLAGS)}): running FP32 instead")
        precision = FP32
    if precision == BF16 and not openvino_installed():
        notes.append("BF16 needs OpenVINO (pip install 'covidct-batch[openvino]'): running FP32 instead")
        precision = FP32
    if precision == BF16 and runtime == ONNXRUNTIME:
        notes.append("ONNX Runtime has no BF16 path on the CPU: running FP32 with ONNX Runtime")
        precision = FP32

    runtimes = [runtime] if runtime != "auto" else [ONNXRUNTIME] + ([OPENVINO] if openvino_installed() else [])
    candidates = []  # (runtime, precision): the one asked for, and FP32 to fall back to
    for p in ([precision] if precision == FP32 or fp32_file is None else [precision, FP32]):
        for rt in runtimes:
            if p == BF16 and rt != OPENVINO:
                continue
            candidates.append((rt, p))
    if len(candidates) == 1:
        rt, p = candidates[0]
        return Choice(rt, p, str(int8_file if p == INT8 else model), isa(p, flags), notes=notes, source="forced",
                      **base)

    files = {FP32: model if fp32_file is not None else None, BF16: model, INT8: int8_file}
    key = _cache_key(sorted({files[p] for _, p in candidates}), threads, flags, asked)
    with _Cache() as cache:
        hit = cache.data.get(key) if use_cache else None
        if hit:
            return Choice(**{**hit, "source": "cache"})
        choice = _measure(candidates, files, contract, threads, probe_images, precision, flags, notes, base)
        if use_cache:
            cache.data[key] = choice.to_dict()
            cache.save()
    return choice


def _measure(candidates, files, contract, threads, probe_images, precision, flags, notes, base) -> Choice:
    x = _probe(contract, probe_images)
    backends, outputs, parity = {}, {}, {}
    reference = {}
    for rt, p in candidates:
        name = f"{rt}/{p}"
        try:
            backends[name] = load(str(files[p]), rt, p, threads)
        except Exception as e:  # noqa: BLE001  a runtime that cannot load the model is not a candidate
            notes.append(f"{name} left out: {str(e).splitlines()[0][:200]}")
            continue
        out = backends[name].run(x)
        if rt == ONNXRUNTIME:
            reference[p] = out
        outputs[name] = out
    # parity against ONNX Runtime at the same precision (FP32 for bf16); a candidate that fails is dropped
    for name in list(backends):
        rt, p = name.split("/")
        ref = reference.get(INT8 if p == INT8 else FP32)
        if ref is None:
            continue
        diff = float(np.max(np.abs(outputs[name] - ref)))
        parity[name] = diff
        tol = INT8_PARITY_TOLERANCE if p == INT8 else (0.02 if p == BF16 else PARITY_TOLERANCE)
        if rt != ONNXRUNTIME and diff > tol:
            notes.append(f"{name} left out: its probabilities differ from ONNX Runtime's by {diff:.2g} (> {tol})")
            del backends[name]
    if not backends:
        raise RuntimeChoiceError("no runtime could load this model: " + "; ".join(notes))
    rate = speeds(backends, x, rounds=5, budget_s=2.0)
    by_speed = sorted(rate, key=lambda k: -rate[k])
    fp32 = [k for k in by_speed if k.endswith("/" + FP32)]
    reduced = [k for k in by_speed if not k.endswith("/" + FP32)]
    best_fp32 = fp32[0] if fp32 else None
    if best_fp32 and ONNXRUNTIME + "/" + FP32 in rate and best_fp32 != ONNXRUNTIME + "/" + FP32:
        if rate[best_fp32] < MARGIN * rate[ONNXRUNTIME + "/" + FP32]:
            best_fp32 = ONNXRUNTIME + "/" + FP32  # a tie keeps the default runtime
    pick = best_fp32
    if reduced:
        r = reduced[0]
        if best_fp32 is None or rate[r] >= MARGIN * rate[best_fp32]:
            pick = r
        elif r.endswith("/" + BF16):
            # BF16 asked for on a CPU that has the instructions: the user gets it, with what was measured
            # (a small model's timing cannot tell which wins on a real archive; INT8 differs: its file
            # changes the numbers, so it is kept only where measured faster)
            pick = r
            notes.append(f"BF16 measured {rate[r]:.0f} images/s against FP32's {rate[best_fp32]:.0f} on this "
                         "CPU's probe batch: running BF16 as asked (not faster here)")
        else:
            notes.append(f"{precision.upper()} measured {rate[r]:.0f} images/s against FP32's "
                         f"{rate[best_fp32]:.0f} on this CPU: running FP32 instead")
    rt, p = pick.split("/")
    backends.clear()  # free the candidates before the predictors load
    return Choice(rt, p, str(files[p]), isa(p, flags), measured=rate,
                  parity=parity, notes=notes, source="measured",
                  **base)
