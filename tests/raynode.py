"""Ray processes for tests, each in its own interpreter so its RAY_AUTH_* environment is its own.

    python -m tests.raynode local      # the engine's local runtime; prints ADDRESS and SERVICES (the head
                                       # services of Ray's that run), waits for stdin, then ray.shutdown():
                                       # prints SHUTDOWN_S seconds and MONITOR_RC codes
    python -m tests.raynode local-engine-shutdown   # the same, ended by the engine's shutdown_ray()
    python -m tests.raynode ray-default   # the same with Ray's own defaults (ray.init, ray.shutdown)
    python -m tests.raynode cluster    # a two-node ray.cluster_utils.Cluster; prints ADDRESS, waits
    python -m tests.raynode client ADDRESS   # joins ADDRESS; prints NODES n, exits 0, or exits 3
"""

import sys


#: Ray's head services by the script each runs as (a local run does without them: engine.cluster._lean_local_runtime).
SCRIPTS = {"monitor.py": "autoscaler-monitor", "log_monitor.py": "log-monitor", "dashboard.py": "api-server"}


def head_services() -> set[str]:
    """Which of SCRIPTS run among this process's descendants."""
    import os
    from pathlib import Path

    from covidct.engine.reaper import descendants

    found = set()
    for pid in descendants(os.getpid()):
        try:
            argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        names = {a.rsplit(b"/", 1)[-1].decode(errors="replace") for a in argv}
        found |= {name for script, name in SCRIPTS.items() if script in names}
    return found


def main() -> int:
    import ray

    mode = sys.argv[1]
    if mode in ("local", "local-engine-shutdown", "ray-default"):
        import time

        from covidct.engine.cluster import local_monitor_processes
        from covidct.engine.pipeline import ScreenConfig, shutdown_ray, start_ray
        if mode == "ray-default":
            ray.init(address="local", num_cpus=1, include_dashboard=False)
        else:
            start_ray(ScreenConfig(inputs=(".",), model="unused", out="unused", num_cpus=1))
        monitors = local_monitor_processes()
        print("ADDRESS", ray.get_runtime_context().gcs_address, flush=True)
        print("SERVICES", *sorted(head_services()), flush=True)
        sys.stdin.read()
        t = time.perf_counter()
        shutdown_ray() if mode == "local-engine-shutdown" else ray.shutdown()
        print("SHUTDOWN_S", time.perf_counter() - t, "MONITOR_RC", *(m.returncode for m in monitors),
              flush=True)
    elif mode == "cluster":
        from ray.cluster_utils import Cluster
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        print("ADDRESS", cluster.address, flush=True)
        sys.stdin.read()
        cluster.shutdown()
    elif mode == "client":
        try:
            ray.init(address=sys.argv[2], include_dashboard=False)
        except Exception as e:
            print("REFUSED", type(e).__name__, str(e).splitlines()[0][:200], flush=True)
            return 3
        print("NODES", len([n for n in ray.nodes() if n["Alive"]]), flush=True)
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
