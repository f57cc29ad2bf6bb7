"""The whole job, stage after stage, on a Ray cluster: `bco-ray align`.

Each stage is a function (cfg, run_dir) -> summary dict that also runs on its own through
its CLI subcommand. Stages are added here as they are built; the order is the product's:
assets -> prepare -> udm -> score-ref -> train -> serve.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from pathlib import Path

from bco_ray import __version__
from bco_ray.config import Config, to_dict
from bco_ray.raycluster import init_ray
from bco_ray.report import write_report


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


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def stage_key(name: str, cfg: Config, keys: dict) -> str | None:
    """What a stage's output depends on (its config, its inputs' keys); None: always run."""
    c = to_dict(cfg)
    if name == "prepare":
        from bco_ray import storage

        fs, path = storage.filesystem(cfg.ingest.input, cfg.storage)
        return _hash([c["ingest"], c["udm"], cfg.model.policy, cfg.model.embedder, cfg.run.seed,
                      storage.listing(fs, path)])
    if name == "score-ref":
        return _hash([keys.get("prepare"), c["score"], cfg.model.reference or cfg.model.policy, cfg.model.dtype,
                      cfg.objective.loss == "kto"])
    if name == "train":
        return _hash([keys.get("score-ref"), c["train"], c["objective"], cfg.model.policy, cfg.run.seed])
    return None


def _output_exists(name: str, cfg: Config, run_dir: Path) -> bool:
    from bco_ray import storage

    where = {"prepare": (cfg.ingest.output or str(run_dir / "prepared"), "manifest.json"),
             "score-ref": (cfg.score.output or str(run_dir / "scored"), "manifest.json"),
             "train": (cfg.train.export or str(run_dir / "model"), "run_card.json", "config.json")}[name]
    fs, path = storage.filesystem(where[0], cfg.storage)
    return all(storage.exists(fs, storage.join(path, f)) for f in where[1:])


def align(cfg: Config) -> dict:
    """Every stage in order. A stage whose key matches the last run's and whose output exists
    is skipped, so a failed run restarts where it stopped (train also resumes mid-way from
    its checkpoint). Writes <run_dir>/manifest.json after every stage and a report at the end."""
    run_dir = Path(cfg.run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "manifest.json"
    previous = json.loads(path.read_text()).get("stages", {}) if path.exists() else {}
    init_ray(cfg.ray)
    # Stages not reached yet keep their previous entries (a crash before them must not make
    # the next run redo them; their keys are checked again anyway).
    manifest = {"bco_ray_version": __version__, "python": platform.python_version(),
                "config": to_dict(cfg), "stages": dict(previous)}
    keys: dict = {}
    for name, fn in STAGES:
        t0 = time.time()
        key = keys[name] = stage_key(name, cfg, keys)
        before = previous.get(name, {})
        if key is not None and before.get("key") == key and _output_exists(name, cfg, run_dir):
            manifest["stages"][name] = {**before, "skipped": True}
            path.write_text(json.dumps(manifest, indent=2))
            print(f"[bco-ray] stage {name}: unchanged since the last run, skipped", flush=True)
            continue
        print(f"[bco-ray] stage {name} ...", flush=True)
        stage_cfg = cfg
        if name == "train":
            # Ray Train resumes any run of the same name; tie the name to the inputs and
            # config, so a rerun resumes only the same training, never a stale one.
            stage_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, name=f"{cfg.train.name}-{key[:8]}"))
        summary = fn(stage_cfg, run_dir)
        manifest["stages"][name] = {"key": key, "seconds": round(time.time() - t0, 2), **summary}
        path.write_text(json.dumps(manifest, indent=2))
        print(f"[bco-ray] stage {name} done in {time.time() - t0:.1f}s", flush=True)
    path.write_text(json.dumps(manifest, indent=2))
    card = None
    if "train" in manifest["stages"]:
        from bco_ray import storage

        fs, export = storage.filesystem(manifest["stages"]["train"]["model"], cfg.storage)
        card = json.loads(storage.read_bytes(fs, storage.join(export, "run_card.json")))
    report = write_report(run_dir, manifest, card)
    print(f"[bco-ray] run manifest: {path}\n[bco-ray] report: {report}", flush=True)
    return manifest
