"""The whole job, stage after stage, on a Ray cluster: `bco-ray align`.

Each stage is a function (cfg, run_dir) -> summary dict that also runs on its own through
its CLI subcommand. Stages are added here as they are built; the order is the product's:
assets -> prepare -> udm -> score-ref -> train -> eval -> serve.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from pathlib import Path

from bco_ray import __version__, console, registry
from bco_ray.config import Config, redacted, to_dict
from bco_ray.errors import first_line
from bco_ray.preflight import stages_of
from bco_ray.raycluster import init_ray
from bco_ray.report import write_report
from bco_ray.storage import credentials_to_environment


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
    from bco_ray.data.ingest import prepare

    m = prepare(cfg)
    keys = ("rows_read", "examples", "kept", "quarantined", "deduplicated", "quarantine_reasons",
            "kept_by_split_label", "tokens")
    return {**{k: m[k] for k in keys}, "udm": m["udm"]}


def stage_score_ref(cfg: Config, run_dir: Path) -> dict:
    from bco_ray.score.stage import score_reference

    m = score_reference(cfg)
    keys = ("backend", "reference", "dtype", "rows_in", "scored", "quarantined", "completion_tokens",
            "completion_tokens_per_s", "mean_logp_per_token")
    return {**{k: m[k] for k in keys}, "skipped": m.get("skipped", False)}


def stage_train(cfg: Config, run_dir: Path) -> dict:
    from bco_ray.train.stage import train

    card = train(cfg)
    return {"model": card["model"], "steps": card["steps"], "exported_step": card["exported_step"],
            "stopped_early": card["stopped_early"], "final_metrics": card["final_metrics"],
            "final_eval": card["final_eval"], "phase_seconds": card["phase_seconds"]}


def stage_eval(cfg: Config, run_dir: Path) -> dict:
    """The trained model vs the reference on held-out prompts; a rejected model stops the run
    here, before it is served."""
    from bco_ray.eval.stage import evaluate

    s = evaluate(cfg)
    return {k: s[k] for k in ("passed", "enforced", "reasons", "model", "prompts_from", "metrics", "side_by_side")}


def stage_serve(cfg: Config, run_dir: Path) -> dict:
    """Serve the exported model, answer one chat request over HTTP, stop (the smoke test a
    user would do by hand); `bco-ray serve` keeps it running."""
    import openai

    from bco_ray.serve import stage as serve

    if serve.running():
        # Serve runs one HTTP proxy per cluster: the smoke test would replace the application
        # users are talking to, then shut Serve down.
        console.say("[bco-ray] stage serve: this cluster already serves an application; not touched "
                    "(`bco-ray canary start` puts the new model in front of a share of its users)")
        return {"skipped_because": "a Serve application is running on this cluster"}
    url = serve.start(cfg)
    try:
        from bco_ray.serve.app import usable_keys

        key = (usable_keys(cfg.serve.api_keys) or ["none"])[0]  # $BCO_RAY_API_KEYS counts too
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=2)
        question = "How do I reset my password?"
        r = client.chat.completions.create(model=cfg.serve.model_name, max_tokens=48, temperature=0,
                                           messages=[{"role": "user", "content": question}])
        answer = r.choices[0].message.content
        console.say(f"[bco-ray] {url}/chat/completions answered:\n  Q: {question}\n  A: {answer}")
    finally:
        serve.stop()
    return {"url": url, "question": question, "answer": answer, "usage": r.usage.model_dump()}


STAGES = [("assets", stage_assets), ("prepare", stage_prepare), ("score-ref", stage_score_ref),
          ("train", stage_train), ("eval", stage_eval), ("serve", stage_serve)]


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
    if name == "eval":
        return _hash([keys.get("train"), c["eval"], cfg.model.reference or cfg.model.policy, cfg.model.embedder,
                      cfg.model.dtype, cfg.run.seed])
    return None


def _output_exists(name: str, cfg: Config, run_dir: Path) -> bool:
    from bco_ray import storage

    where = {"prepare": (cfg.ingest.output or str(run_dir / "prepared"), "manifest.json"),
             "score-ref": (cfg.score.output or str(run_dir / "scored"), "manifest.json"),
             "train": (cfg.train.export or str(run_dir / "model"), "run_card.json", "config.json"),
             "eval": (cfg.eval.model or cfg.train.export or str(run_dir / "model"), "eval.json")}[name]
    fs, path = storage.filesystem(where[0], cfg.storage)
    return all(storage.exists(fs, storage.join(path, f)) for f in where[1:])


def _card(manifest: dict, cfg: Config) -> dict | None:
    """The exported model's run card, when this run has one."""
    if "train" not in manifest["stages"]:
        return None
    from bco_ray import storage

    fs, export = storage.filesystem(manifest["stages"]["train"]["model"], cfg.storage)
    try:
        return json.loads(storage.read_bytes(fs, storage.join(export, "run_card.json")))
    except (FileNotFoundError, OSError):
        return None


def ray_description(cfg: Config) -> str:
    """Which cluster, and whether Ray's token auth is on (the CI log must show it)."""
    import os

    import ray

    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        auth = "on" if is_token_auth_enabled() else "off"
    except ImportError:  # a Ray without token auth
        auth = "not supported by this Ray"
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    where = f"joined {address}" if address else "local cluster on 127.0.0.1"
    res = ray.cluster_resources()
    return f"Ray {ray.__version__}: {where}, {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs, token auth {auth}"


def summary_lines(manifest: dict, report: Path) -> list[str]:
    """The short table a person reads at the end of `align`."""
    st = manifest["stages"]
    rows: list[tuple[str, str]] = []
    if p := st.get("prepare"):
        rows.append(("rows", f"{p['rows_read']} read, {p['kept']} kept, {p['quarantined']} quarantined, "
                             f"{p['deduplicated']} deduplicated"))
        udm = p.get("udm") or {}
        rows.append(("UDM", (f"held-out AUC {udm['heldout_auc']:.3f}, weights "
                             f"{'applied' if udm.get('applied', True) else 'not applied (no prompt shift shown)'}")
                     if udm.get("heldout_auc") is not None else ("on" if udm.get("enabled") else "off")))
    if t := st.get("train"):
        ev, fm = t.get("final_eval") or {}, t.get("final_metrics") or {}
        rows.append(("training", f"{t['steps']} steps, final loss {fm.get('loss', float('nan')):.4f}; eval loss "
                                 f"{ev.get('eval/loss', float('nan')):.4f}, reward accuracy "
                                 f"{ev.get('eval/reward_accuracy', float('nan')):.3f}, margin "
                                 f"{ev.get('eval/rewards/margin', float('nan')):+.4f}"
                                 + (f"; stopped early at step {t['stopped_early']['step']} (generation check)"
                                    if t.get("stopped_early") else "")))
        rows.append(("model", f"{t['model']} (step {t.get('exported_step')})"))
    if (e := st.get("eval")) and "metrics" in e:
        g = e["metrics"]["greedy"]
        kl = e["metrics"].get("kl")
        rows.append(("eval", f"{'passed' if e['passed'] else 'REJECTED'}; greedy looping "
                             f"{g['degenerate']['candidate']['rate']:.0%} (reference "
                             f"{g['degenerate']['reference']['rate']:.0%})"
                             + (f", KL {kl['per_token']:.4f} nats/token" if kl else "")))
    if (s := st.get("serve")) and "skipped_because" in s:
        rows.append(("served", f"not started: {s['skipped_because']}"))
    elif s:
        rows.append(("served", f"{s['url']}: Q: {s['question']}"))
        rows.append(("answer", " ".join(str(s["answer"]).split())[:200]))
    if (lp := manifest.get("loop")) and lp.get("recorded"):
        rows.append(("loop", f"days {lp['days'][0] or '(all)'} to {lp['days'][1]} read; watermark {lp['watermark']} "
                             f"in {lp['registry']}"))
    rows += [("report", str(report)), ("total time", f"{manifest.get('seconds', 0):.0f} s")]
    width = max(len(k) for k, _ in rows)
    return ["[bco-ray] summary"] + [f"  {k.ljust(width)}  {v}" for k, v in rows]


def align(cfg: Config) -> dict:
    """Every stage in order. A stage whose key matches the last run's and whose output exists
    is skipped, so a failed run restarts where it stopped (train also resumes mid-way from
    its checkpoint). Writes <run_dir>/manifest.json after every stage and a report at the end."""
    run_dir = Path(cfg.run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "manifest.json"
    previous = json.loads(path.read_text()).get("stages", {}) if path.exists() else {}
    cfg = credentials_to_environment(cfg)
    cfg, loop = registry.plan(cfg)  # align --since: the new days, from the promoted model
    if loop and loop["nothing_new"]:
        console.say(f"[bco-ray] no new day of feedback: the last run read up to {loop['after']} and the days to "
                    f"read end {loop['days'][1]} (loop.until {cfg.loop.until}); nothing to do")
        return {"loop": loop, "stages": {}}
    init_ray(cfg.ray)
    # Stages not reached yet keep their previous entries (a crash before them must not make
    # the next run redo them; their keys are checked again anyway).
    manifest = {"bco_ray_version": __version__, "python": platform.python_version(),
                "config": redacted(cfg), "stages": dict(previous), **({"loop": loop} if loop else {})}
    if loop:
        console.say(f"[bco-ray] loop: days {loop['days'][0] or 'from the first'} to {loop['days'][1]}, starting from "
                    f"{loop['started_from']}, reference {loop['reference']}")
    keys: dict = {}
    console.say(f"[bco-ray] {ray_description(cfg)}")
    t_start = time.time()
    run = stages_of(cfg, "align")  # up to run.stop_after
    for name, fn in [(n, f) for n, f in STAGES if n in run]:
        t0 = time.time()
        key = keys[name] = stage_key(name, cfg, keys)
        before = previous.get(name, {})
        if key is not None and before.get("key") == key and _output_exists(name, cfg, run_dir):
            manifest["stages"][name] = {**before, "skipped": True}
            path.write_text(json.dumps(manifest, indent=2))
            console.say(f"[bco-ray] stage {name}: unchanged since the last run, skipped")
            continue
        if name == "eval" and not cfg.eval.enabled:
            manifest["stages"][name] = {"disabled": True}
            console.say("[bco-ray] stage eval: off (eval.enabled false); the model is served unchecked")
            continue
        console.stage(name)
        stage_cfg = cfg
        if name == "train":
            # Ray Train resumes any run of the same name; tie the name to the inputs and
            # config, so a rerun resumes only the same training, never a stale one.
            stage_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, name=f"{cfg.train.name}-{key[:8]}"))
        try:
            summary = fn(stage_cfg, run_dir)
        except BaseException as e:
            # The report is written on failure too, naming the stage and its error.
            manifest["failed"] = {"stage": name, "error": f"{type(e).__name__}: {first_line(e)}",
                                  "seconds": round(time.time() - t0, 2)}
            path.write_text(json.dumps(manifest, indent=2))
            write_report(run_dir, manifest, _card(manifest, cfg))
            console.say(f"[bco-ray] stage {name} failed after {time.time() - t0:.1f}s; report: "
                        f"{run_dir / 'report' / 'report.md'}")
            raise
        manifest["stages"][name] = {"key": key, "seconds": round(time.time() - t0, 2), **summary}
        path.write_text(json.dumps(manifest, indent=2))
        console.end_stage(f"[bco-ray] stage {name} done in {time.time() - t0:.1f}s")
    manifest["seconds"] = round(time.time() - t_start, 1)
    if loop:  # the watermark moves only now: a failed or rejected run's days are read again next time
        manifest["loop"]["recorded"] = registry.record_run(cfg, loop, manifest)
    path.write_text(json.dumps(manifest, indent=2))
    report = write_report(run_dir, manifest, _card(manifest, cfg))
    for line in summary_lines(manifest, report):
        console.say(line)
    return manifest
