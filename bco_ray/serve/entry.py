"""Ray Serve application builders, for `serve run` and KubeRay's RayService:

    serve run bco_ray.serve.entry:app config=configs/prod.yaml
    # RayService: import_path: bco_ray.serve.entry:app, args: {config: ..., overrides: [...]}
    # a canary (cluster/kuberay/rayservice-canary.yaml):
    #   import_path: bco_ray.serve.entry:canary, args: {config, overrides, promoted, candidate, share}
"""

from __future__ import annotations

from bco_ray.config import load_config


def _config(args: dict):
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    return load_config(args.get("config"), list(overrides))


def app(args: dict):
    from bco_ray.serve.stage import build_app

    return build_app(_config(args))


def canary(args: dict):
    """The promoted model and, when `candidate` is given, the candidate on `share` of the users
    (sticky per user; `salt` picks which users, by default the candidate's URI). Without a
    candidate: the promoted model alone (a rollback, or a promotion with the candidate as
    `promoted`)."""
    from bco_ray.config import ConfigError
    from bco_ray.serve.stage import build_app

    cfg = _config(args)
    promoted = args.get("promoted") or cfg.serve.model
    if not promoted:
        raise ConfigError("the canary application needs args.promoted (or serve.model): the model answering "
                          "the other users")
    candidate, share = args.get("candidate"), float(args.get("share", cfg.canary.share))
    if not candidate:
        return build_app(cfg, [{"role": "promoted", "uri": promoted, "share": 1.0}])
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"args.share {share} is not in [0, 1]")
    return build_app(cfg, [{"role": "candidate", "uri": candidate, "share": share},
                           {"role": "promoted", "uri": promoted, "share": 1.0 - share}],
                     salt=str(args.get("salt") or candidate))
