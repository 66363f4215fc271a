"""Ray for a run: start a local runtime or join a cluster (with its token checked), plan the workers, shut down.

Every way of naming a cluster (``--address HOST:PORT``, ``auto``, ``ray://``) gets the same check that it
requires authentication; a local runtime is never started without it. ``plan_workers`` decides how many
predictors run where (one single-threaded predictor per CPU, fused decode+predict on CPU nodes; decode
tasks feeding one predictor per GPU otherwise).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .exits import RunError

if TYPE_CHECKING:
    from .pipeline import ScreenConfig

log = logging.getLogger("covidct.engine.pipeline")

#: Images per batch a predictor decodes and infers (--batch-size).
DEFAULT_BATCH_SIZE = 32


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
        with _lean_local_runtime(log_monitor=cfg.worker_logs):
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


@contextlib.contextmanager
def _lean_local_runtime(log_monitor: bool):
    """While ``ray.init`` starts a local runtime: without the head's autoscaler monitor (a fixed-size runtime
    has nothing to scale), its API server (the dashboard's head, whose jobs, state and metrics APIs a run never
    calls) and, unless ``--verbose`` asks for the workers' logs on the console, its log monitor (which only
    forwards those logs to the driver). Three Python processes of about 80 MB each that also start while Ray
    does, on the cores the run needs: measured on a 2-core Xeon (2026-12-07), 823 -> 578 MB for a runtime with
    two actors, ray.init 2.4-3.3 s -> 1.7-1.8 s, ray.shutdown 1.1-1.3 s -> 0.3 s. GCS, raylet, its two agents
    and the workers are Ray's own, started by Ray. Ray keeps these switches in RayParams and Node, which
    ray.init does not expose: where a Ray version lays them out otherwise, Ray starts its defaults."""
    try:
        from ray._private import node as ray_node
        from ray._private import parameter
        params_init = parameter.RayParams.__init__
        api_server = ray_node.Node.start_api_server
    except (ImportError, AttributeError):
        log.debug("Ray's RayParams/Node are laid out otherwise: its default head services start")
        yield
        return

    def lean_params(self, *args, **kwargs):
        params_init(self, *args, **kwargs)
        if hasattr(self, "no_monitor") and hasattr(self, "include_log_monitor"):
            self.no_monitor = True
            self.include_log_monitor = bool(log_monitor)

    parameter.RayParams.__init__ = lean_params
    ray_node.Node.start_api_server = lambda self, **kwargs: None
    try:
        yield
    finally:
        parameter.RayParams.__init__ = params_init
        ray_node.Node.start_api_server = api_server


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


def shutdown_ray() -> None:
    """``ray.shutdown()`` with SIGTERM held off: it resets the C-level handler, and a SIGTERM in that second
    would kill the driver with 143, its lock file left and no summary. One that arrives is raised after as
    Ctrl-C (exit 130; every part is already whole)."""
    import ray

    main = threading.current_thread() is threading.main_thread()
    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: got.append(s)) if main else None
    try:
        with _monitor_ended_in_its_turn():
            ray.shutdown()
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous if callable(previous) or previous in (signal.SIG_DFL,
                                                                                          signal.SIG_IGN)
                          else signal.SIG_DFL)
    if got and callable(previous):
        previous(signal.SIGTERM, None)


def local_monitor_processes() -> list:
    """The autoscaler monitor process(es) (``subprocess.Popen``) of the local runtime this driver started; none
    for a joined cluster, or for a Ray whose internals are laid out otherwise."""
    import ray

    try:
        from ray._private import ray_constants
        node = ray._private.worker._global_node
        infos = node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, []) if node is not None else []
    except AttributeError:  # another Ray layout: its own shutdown ends it, a second slower
        return []
    return [info.process for info in infos]


@contextlib.contextmanager
def _monitor_ended_in_its_turn():
    """While ``ray.shutdown`` runs: a local runtime's autoscaler monitor (a Python process this driver started;
    a fixed-size local runtime has nothing to scale) is ended with SIGKILL at its turn, after the raylet and
    GCS. Ray sends it SIGTERM and waits a second, which it never answers (Ray then sends SIGKILL): a second at
    the end of every run. Ended before the raylet and GCS instead, the GCS itself sometimes took that second to
    stop (measured: 1 shutdown in 8). It holds no state a run needs. Joined clusters have no such process of
    this driver's; another Ray layout keeps Ray's own shutdown, a second slower."""
    import ray

    try:
        from ray._private import ray_constants
        node = ray._private.worker._global_node
        kill = node._kill_process_impl if node is not None else None
    except AttributeError:
        kill = None
    if kill is None:
        yield
        return

    def in_its_turn(process_type, *args, **kwargs):
        if process_type == ray_constants.PROCESS_TYPE_MONITOR:
            for proc in local_monitor_processes():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=5)
        return kill(process_type, *args, **kwargs)

    node._kill_process_impl = in_its_turn
    try:
        yield
    finally:
        node._kill_process_impl = kill
