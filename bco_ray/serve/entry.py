"""Ray Serve application builder, for `serve run` and KubeRay's RayService:

    serve run bco_ray.serve.entry:app config=configs/prod.yaml
    # RayService: import_path: bco_ray.serve.entry:app, args: {config: ..., overrides: [...]}
"""

from __future__ import annotations

from bco_ray.config import load_config


def app(args: dict):
    from bco_ray.serve.stage import build_app

    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    return build_app(load_config(args.get("config"), list(overrides)))
