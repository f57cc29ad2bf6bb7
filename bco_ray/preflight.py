"""Checks that run before any work, so a newcomer's first mistakes cost seconds, not the
minutes of ingest and training before the stage that would have failed on them.

Each check raises `UserError` naming the config key to change.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

from bco_ray.config import Config
from bco_ray.errors import UserError

# The stages of `align` each command runs (the pre-flight checks only what those need).
COMMAND_STAGES = {"align": ("assets", "prepare", "score-ref", "train", "eval", "serve"), "prepare": ("prepare",),
                  "score-ref": ("score-ref",), "train": ("train",), "eval": ("eval",), "serve": ("serve",),
                  "tune": ("prepare", "score-ref", "train", "eval")}


def stages_of(cfg: Config, command: str) -> tuple[str, ...]:
    """The stages a command will run (align: up to run.stop_after)."""
    stages = COMMAND_STAGES.get(command, ())
    if command == "align" and cfg.run.stop_after:
        stages = stages[:stages.index(cfg.run.stop_after) + 1]
    return stages


def check_models(cfg: Config, stages: tuple[str, ...]) -> None:
    """Every model the stages load is a bundled alias or a local HF directory."""
    from bco_ray.assets import ALIASES

    roles = []
    if {"assets", "prepare", "score-ref", "train"} & set(stages):
        roles += [("model.policy", cfg.model.policy), ("model.reference", cfg.model.reference)]
    if {"assets", "prepare"} & set(stages) and cfg.udm.enabled:
        roles.append(("model.embedder", cfg.model.embedder))
    if "eval" in stages and cfg.eval.enabled:
        roles += [("model.policy", cfg.model.policy), ("model.reference", cfg.model.reference)]
        if cfg.eval.judge == "feedback":
            roles.append(("model.embedder", cfg.model.embedder))
        if cfg.eval.judge == "reward-model" and cfg.eval.judge_model and "://" not in cfg.eval.judge_model:
            roles.append(("eval.judge_model", cfg.eval.judge_model))
    roles = list(dict.fromkeys(roles))
    for key, name in roles:
        if name is None or name in ALIASES or "://" in name:  # s3:// exports are checked where they are read
            continue
        path = Path(name).expanduser()
        if not path.exists():
            raise UserError(f"{key} {name!r} does not exist",
                            f"give a local HF model directory (with config.json) or a bundled model: "
                            f"{', '.join(ALIASES)} (--{key} NAME)")
        if not (path / "config.json").is_file():
            raise UserError(f"{key} {name!r} is not a HF model directory (no config.json in it)",
                            f"point --{key} at the directory that from_pretrained() reads")


def check_port(host: str, port: int, wait_s: float = 0.0) -> None:
    """The serve port can be bound (Serve's proxy would otherwise fail after the model loaded).

    Bound as the HTTP server binds it, with SO_REUSEADDR: connections of an earlier server
    in TIME_WAIT do not count, only a socket listening there. `wait_s` gives a server that
    is shutting down (an earlier Serve proxy in this cluster) that long to let go."""
    import time

    deadline = time.time() + wait_s
    while True:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                return
            except OSError as e:
                if e.errno == errno.EADDRNOTAVAIL:
                    raise UserError(f"serve.host {host!r} is not an address of this machine",
                                    "use 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
                if e.errno != errno.EADDRINUSE:
                    raise
        if time.time() >= deadline:
            raise UserError(f"port {port} on {host} is already in use (another `bco-ray serve`, or another "
                            f"server)", f"stop it, or pick a free port: --serve.port {port + 1}")
        time.sleep(0.5)


def gpu_requests(cfg: Config, stages: tuple[str, ...]) -> list[str]:
    """The config keys that explicitly ask for GPUs in these stages."""
    asks = []
    if "train" in stages and cfg.train.use_gpu:
        asks.append("train.use_gpu: true")
    if "prepare" in stages and cfg.udm.enabled and (cfg.udm.num_gpus_per_actor or 0) > 0:
        asks.append(f"udm.num_gpus_per_actor: {cfg.udm.num_gpus_per_actor}")
    if "score-ref" in stages and (cfg.score.num_gpus_per_actor or 0) > 0:
        asks.append(f"score.num_gpus_per_actor: {cfg.score.num_gpus_per_actor}")
    if "serve" in stages and (cfg.serve.gpus_per_replica or 0) > 0:
        asks.append(f"serve.gpus_per_replica: {cfg.serve.gpus_per_replica}")
    return asks


def check_gpus(cfg: Config, stages: tuple[str, ...], cluster_resources: dict) -> None:
    """GPUs asked for where the cluster has none: Ray would wait for them forever."""
    asks = gpu_requests(cfg, stages)
    if asks and cluster_resources.get("GPU", 0) <= 0:
        have = ", ".join(f"{k} {cluster_resources[k]:g}" for k in ("CPU", "GPU") if k in cluster_resources)
        raise UserError(f"{' and '.join(asks)} asks for GPUs, but the Ray cluster has none ({have})",
                        "leave those keys at null (GPUs are used when the cluster has them), or join a GPU "
                        "cluster with --ray.address")


def check_served_model(cfg: Config) -> None:
    """`bco-ray serve` on its own: the model to serve is there (in `align`, train makes it)."""
    from bco_ray import storage
    from bco_ray.assets import ALIASES

    uri = cfg.serve.model or cfg.train.export or storage.join(cfg.run.run_dir, "model")
    if storage.is_s3(uri) or uri in ALIASES:
        return
    if not (Path(uri).expanduser() / "config.json").is_file():
        raise UserError(f"no model to serve at {uri}",
                        "train one first (`bco-ray train` or `bco-ray align`), or point --serve.model at a HF model "
                        "directory or s3:// prefix")
    from bco_ray.serve.stage import refuse_rejected

    refuse_rejected(str(Path(uri).expanduser()), uri)


def check_eval(cfg: Config, command: str) -> None:
    """The eval stage's inputs that a typo would otherwise fail minutes later."""
    ec = cfg.eval
    if ec.prompts and not Path(ec.prompts).expanduser().is_file():
        raise UserError(f"eval.prompts {ec.prompts!r} is not a file", 'give a JSONL file, one {"prompt": "..."} per line')
    if ec.judge == "reward-model" and not ec.judge_model:
        raise UserError("eval.judge 'reward-model' needs eval.judge_model",
                        "set --eval.judge_model to a HF sequence-classification directory")
    if ec.judge == "openai" and not (ec.judge_url and ec.judge_model):
        raise UserError("eval.judge 'openai' needs eval.judge_url and eval.judge_model",
                        "e.g. --eval.judge_url http://127.0.0.1:8001/v1 --eval.judge_model my-judge")
    if command == "eval":  # (tune evaluates what its own trials export)
        from bco_ray import storage
        from bco_ray.eval.stage import candidate_uri

        uri = candidate_uri(cfg)
        if not storage.is_s3(uri) and not (Path(uri).expanduser() / "config.json").is_file():
            raise UserError(f"no model to evaluate at {uri}",
                            "train one first (`bco-ray train`), or point --eval.model at a HF model directory")


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_auth(cfg: Config) -> None:
    """No endpoint reachable from the network without API keys, unless the user says so."""
    from bco_ray.serve.app import usable_keys

    sc = cfg.serve
    try:
        keys = usable_keys(sc.api_keys)
    except ValueError as e:
        raise UserError(str(e), "remove the empty entry from serve.api_keys") from None
    if not keys and not is_loopback(sc.host) and not sc.allow_unauthenticated:
        raise UserError(f"serve.host {sc.host} would serve the model to the network with no API key",
                        "set BCO_RAY_API_KEYS=key1,key2 (or serve.api_keys); behind a proxy that authenticates, "
                        "--serve.allow_unauthenticated true")


def check_before_ray(cfg: Config, command: str) -> None:
    stages = stages_of(cfg, command)
    if "prepare" in stages and not (command == "tune" and cfg.train.input):  # tune on given data reads no log
        from bco_ray.data.ingest import check_input

        check_input(cfg)  # input, schema, date filter
    check_models(cfg, stages)
    if "train" in stages:
        from bco_ray.train.stage import interval

        for key in ("eval_every", "checkpoint_every"):  # before the stages ahead of train spend minutes
            interval(getattr(cfg.train, key), 1, f"train.{key}")
    if "eval" in stages and (cfg.eval.enabled or command in ("eval", "tune")):
        check_eval(cfg, command)
    if command == "serve":
        check_served_model(cfg)
    if "serve" in stages:
        check_auth(cfg)
        check_port(cfg.serve.host, cfg.serve.port)


def check_after_ray(cfg: Config, command: str) -> None:
    import ray

    check_gpus(cfg, stages_of(cfg, command), ray.cluster_resources())
