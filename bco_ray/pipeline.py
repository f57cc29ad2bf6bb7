"""The whole job, stage after stage, on a Ray cluster: `bco-ray align`.

Each stage is a function (cfg, run_dir) -> summary dict that also runs on its own through
its CLI subcommand. Stages are added here as they are built; the order is the product's:
assets -> prepare -> udm -> score-ref -> train -> serve.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from bco_ray import __version__
from bco_ray.config import Config, to_dict
from bco_ray.raycluster import init_ray


def stage_assets(cfg: Config, run_dir: Path) -> dict:
    """Materialise the configured models on a cluster node (warms that node's cache)."""
    import ray

    @ray.remote(num_cpus=0.5)  # whole CPUs starve Ray Data on small machines
    def materialise(model_cfg: dict) -> dict:
        from bco_ray import assets

        out = {}
        for role in ("policy", "reference", "embedder"):
            name = model_cfg[role] or model_cfg["policy"]
            out[role] = {"name": name, "path": str(assets.resolve_model(name, model_cfg["cache_dir"]))}
        return out

    return ray.get(materialise.remote(to_dict(cfg.model)))


def stage_prepare(cfg: Config, run_dir: Path) -> dict:
    from bco_ray.ingest import prepare

    m = prepare(cfg)
    keys = ("rows_read", "examples", "kept", "quarantined", "deduplicated", "quarantine_reasons",
            "kept_by_split_label", "tokens")
    return {**{k: m[k] for k in keys}, "udm": m["udm"]}


def stage_score_ref(cfg: Config, run_dir: Path) -> dict:
    from bco_ray.refscore_stage import score_reference

    m = score_reference(cfg)
    keys = ("backend", "reference", "dtype", "rows_in", "scored", "quarantined", "completion_tokens",
            "completion_tokens_per_s", "mean_logp_per_token")
    return {**{k: m[k] for k in keys}, "skipped": m.get("skipped", False)}


def stage_train(cfg: Config, run_dir: Path) -> dict:
    from bco_ray.train import train

    card = train(cfg)
    return {"model": card["model"], "steps": card["steps"], "final_metrics": card["final_metrics"],
            "final_eval": card["final_eval"]}


def stage_serve(cfg: Config, run_dir: Path) -> dict:
    """Serve the exported model, answer one chat request over HTTP, stop (the smoke test a
    user would do by hand); `bco-ray serve` keeps it running."""
    import openai

    from bco_ray import serve

    url = serve.start(cfg)
    try:
        key = (list(cfg.serve.api_keys) or ["none"])[0]
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=2)
        question = "How do I reset my password?"
        r = client.chat.completions.create(model=cfg.serve.model_name, max_tokens=48, temperature=0,
                                           messages=[{"role": "user", "content": question}])
        answer = r.choices[0].message.content
        print(f"[bco-ray] {url}/chat/completions answered:\n  Q: {question}\n  A: {answer}", flush=True)
    finally:
        serve.stop()
    return {"url": url, "question": question, "answer": answer, "usage": r.usage.model_dump()}


STAGES = [("assets", stage_assets), ("prepare", stage_prepare), ("score-ref", stage_score_ref),
          ("train", stage_train), ("serve", stage_serve)]


def align(cfg: Config) -> dict:
    run_dir = Path(cfg.run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    init_ray(cfg.ray)
    manifest = {"bco_ray_version": __version__, "python": platform.python_version(),
                "config": to_dict(cfg), "stages": {}}
    for name, fn in STAGES:
        t0 = time.time()
        print(f"[bco-ray] stage {name} ...", flush=True)
        summary = fn(cfg, run_dir)
        manifest["stages"][name] = {"seconds": round(time.time() - t0, 2), **summary}
        print(f"[bco-ray] stage {name} done in {time.time() - t0:.1f}s", flush=True)
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"[bco-ray] run manifest: {run_dir / 'manifest.json'}", flush=True)
    return manifest
