"""Joining or starting Ray the same way from the CLI, jobs and tests.

Traps this avoids (measured on the project's machines, see docs/operations.md):
- Ray binds the host's external address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is set
  before `import ray`; with it, a local cluster stays on 127.0.0.1.
- Unix socket paths are capped at 107 bytes: the temp dir must be short.
- A temp dir reused after `ray stop` makes ray.init try to join the dead cluster: use a
  fresh one per run.
"""

from __future__ import annotations

import os

from bco_ray.config import RayConfig


def loopback_env() -> None:
    """Set the variables that keep a local cluster on 127.0.0.1 (before `import ray`)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def init_ray(cfg: RayConfig):
    """Join `cfg.address`, or start a local loopback cluster. Returns the ray module."""
    loopback_env()
    if cfg.auth == "disabled":
        os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    if ray.is_initialized():
        return ray
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        # Inside `ray job submit` the job supervisor sets RAY_ADDRESS: join that cluster.
        ray.init(address=cfg.address or "auto", log_to_driver=True)
        return ray
    temp_dir = cfg.temp_dir or f"/tmp/bco-ray-{os.getpid()}"
    if len(temp_dir) > 40:
        raise ValueError(f"ray.temp_dir {temp_dir!r} is too long: Ray's socket paths under it must stay "
                         "under 107 bytes; use a short path such as /tmp/bco-ray")
    ray.init(num_cpus=cfg.num_cpus, _temp_dir=temp_dir, include_dashboard=False,
             _node_ip_address="127.0.0.1")
    return ray
