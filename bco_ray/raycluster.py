"""Joining or starting Ray the same way from the CLI, jobs and tests.

Traps this avoids (measured on the project's machines, see docs/operations.md):
- Ray binds the host's external address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set
  before `import ray`; with it, a local cluster stays on 127.0.0.1.
- Unix socket paths are capped at 107 bytes: the temp dir must be short.
- A temp dir reused after `ray stop` makes ray.init try to join the dead cluster: use a
  fresh one per run.
- Ray's log monitor globs the logs directory ten times a second while it holds under 1,000
  files (every worker leaves two): an idle local cluster with 334 log files spent 3.8 s of
  CPU a minute in it, 2.1 s with RAY_LOG_MONITOR_MANY_FILES_THRESHOLD=0, which globs every
  0.5 s instead (a new worker's output reaches the console up to 0.4 s later).
"""

from __future__ import annotations

import logging
import os

from bco_ray.config import RayConfig

# Ray Train's PlacementGroupCleaner polls the State API, which a local cluster started
# without the dashboard does not serve: it then logs the same warning every few seconds for
# the whole run. Its job (freeing a dead controller's placement group) needs no State API
# warning to be seen, so that one logger is lowered in our local clusters' workers.
_NOISY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker_loggers() -> None:
    """Ray worker_process_setup_hook of local clusters (see _NOISY_LOGGERS)."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def torch_threads(cpus: float) -> int:
    """Torch threads for a task holding `cpus` CPUs: its whole CPUs (at least one), capped by
    OMP_NUM_THREADS where it is set. Ray sets that variable to a worker's whole CPUs unless
    the cluster's environment already holds one, so the cap only bites where someone chose
    fewer threads for the cluster. That choice matters where processes share cores: an
    OpenMP team of 2 on 2 busy cores stalls on every small op (an eval pass beside two busy
    processes took 60 CPU-s with 2 threads, 30 with 1, and 30 % less wall: docs/benchmarks.md)."""
    n = max(1, int(cpus))
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(n, int(cap)) if cap.isdigit() and int(cap) > 0 else n


_LOCAL_SESSION: str | None = None  # the session dir of the local cluster this process started


def local_session_dir() -> str | None:
    """Ray's session directory when this process started the cluster (None when it joined one)."""
    return _LOCAL_SESSION


def loopback_env() -> None:
    """Set the variables that keep a local cluster on 127.0.0.1 (before `import ray`)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def joins_cluster(cfg: RayConfig) -> bool:
    """Whether init_ray joins a running cluster (rather than starting a local one)."""
    return bool(cfg.address or os.environ.get("RAY_ADDRESS"))


def init_ray(cfg: RayConfig):
    """Join `cfg.address`, or start a local loopback cluster. Returns the ray module.

    Under the CLI's console (bco_ray.console, without --verbose) the workers' output stays
    in Ray's log files instead of the console."""
    from bco_ray import console

    loopback_env()
    if cfg.auth == "disabled":
        os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    if ray.is_initialized():
        return ray
    if joins_cluster(cfg):
        # Inside `ray job submit` the job supervisor sets RAY_ADDRESS: join that cluster.
        ray.init(address=cfg.address or "auto", log_to_driver=not console.quiet())
        console.quiet_ray_data()
        return ray
    os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")  # read by the log monitor ray.init starts
    temp_dir = cfg.temp_dir or f"/tmp/bco-ray-{os.getpid()}"
    if len(temp_dir) > 40:
        raise ValueError(f"ray.temp_dir {temp_dir!r} is too long: Ray's socket paths under it must stay "
                         "under 107 bytes; use a short path such as /tmp/bco-ray")
    ray.init(num_cpus=cfg.num_cpus, _temp_dir=temp_dir, include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=not console.quiet(),
             runtime_env={"worker_process_setup_hook": "bco_ray.raycluster.quiet_worker_loggers"})
    global _LOCAL_SESSION
    _LOCAL_SESSION = ray._private.worker._global_node.get_session_dir_path()  # noqa: SLF001
    console.quiet_ray_data()
    return ray
