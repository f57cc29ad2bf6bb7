"""`bco-ray submit`: run the align job on a Ray cluster through the Jobs API.

    bco-ray submit --address http://HEAD:8265 --config configs/prod.yaml --train.num_workers 8

Uploads the project directory as the job's working_dir (without .venv, runs/, .git),
starts `python jobs/align.py --config FILE [overrides]`, prints the job id, streams its
logs and exits with the job's status (0 succeeded, 1 failed or stopped). Token-authenticated
clusters (Ray 2.60's default) work when the token is in $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH
or ~/.ray/auth_token.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from pathlib import Path

EXCLUDES = [".venv", ".git", "runs", "bench/results", "**/__pycache__", "*.safetensors", ".pytest_cache"]


def use_auth_token() -> bool:
    """Send the Ray auth token with the Jobs API calls when one is at hand.

    A client process that never calls ray.init runs in auth mode 'disabled' unless
    RAY_AUTH_MODE says otherwise, and then sends no token: every call to a cluster with
    Ray 2.60's default token auth fails with 'Missing authentication token'. A cluster
    with auth off ignores the header, so sending it is always safe."""
    if os.environ.get("RAY_AUTH_MODE"):
        return os.environ["RAY_AUTH_MODE"] == "token"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or Path(path).is_file():
        os.environ["RAY_AUTH_MODE"] = "token"  # read by Ray's client when it builds its headers
        return True
    return False


def submit(address: str, config: str | None, overrides: list[str], working_dir: str = ".",
           pip: list[str] | None = None, env: dict | None = None, follow: bool = True,
           timeout_s: float | None = None) -> int:
    use_auth_token()
    from ray.job_submission import JobStatus, JobSubmissionClient

    root = Path(working_dir).resolve()
    args = []
    if config:
        cfg = Path(config).resolve()
        try:
            args += ["--config", str(cfg.relative_to(root))]  # the file travels with the working_dir
        except ValueError:
            raise ValueError(f"--config {config} must be inside the working dir {root} to travel with the job") \
                from None
    entrypoint = " ".join(shlex.quote(a) for a in ["python", "jobs/align.py", *args, *overrides])
    runtime_env: dict = {"working_dir": str(root), "excludes": EXCLUDES,
                         "env_vars": {"HF_HUB_OFFLINE": "1", **(env or {})}}
    if pip:
        runtime_env["pip"] = pip
    client = JobSubmissionClient(address)
    deadline = time.time() + 120
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                       metadata={"tool": "bco-ray", "user": os.environ.get("USER", "")})
            break
        except RuntimeError as e:  # a head that just started answers before its job agent is up
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)
    print(f"[bco-ray] submitted job {job_id} to {address}: {entrypoint}", flush=True)
    if not follow:
        return 0

    async def stream():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)
    try:
        asyncio.run(asyncio.wait_for(stream(), timeout_s))
    except TimeoutError:
        print(f"[bco-ray] stopped following after {timeout_s}s; the job goes on", flush=True)
        return 1
    deadline = time.time() + 30
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.time() < deadline:
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    print(f"[bco-ray] job {job_id}: {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1
