"""`bco-ray tune`: which lr, beta and number of steps align this model on this feedback?

    bco-ray tune --config configs/demo.yaml                          # the grid in tune.*
    bco-ray tune --config configs/demo.yaml --tune.lr "[1e-6, 5e-6]" --tune.steps "[20, 60]"

A grid on Ray Tune. Each trial trains on the scored data (the train stage, Ray Train inside
the trial) and runs the eval stage on what it exported, so a trial is scored on what the
model writes, not on its training loss: the judge's score against the reference on the
same prompts and seeds, the KL it spent, and the gate's verdict (looping, cut, empty
answers). The best trial is the highest judged score among the trials that passed the gate
within the KL budget (tune.max_kl_per_token). Writes <run_dir>/tune/results.{json,md} (every
trial, best first) and best.yaml (the overrides that reproduce it), and keeps the best
trial's model.

The trials share one scored dataset (train.input, or <run_dir>/scored, made by `prepare` and
`score-ref` first when it is missing): only training and evaluation repeat.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import time
from pathlib import Path

from bco_ray import console, storage
from bco_ray.config import Config, from_dict, to_dict
from bco_ray.errors import UserError


def grid(cfg: Config) -> list[dict]:
    """Every (lr, beta, steps) of the tune section, in order."""
    tc = cfg.tune
    steps = tc.steps or (cfg.train.max_steps,)
    return [{"lr": lr, "beta": beta, "steps": s} for lr, beta, s in itertools.product(tc.lr, tc.beta, steps)]


def trial_name(params: dict) -> str:
    steps = "epochs" if params["steps"] is None else f"{params['steps']}steps"
    return f"lr{params['lr']:.0e}-beta{params['beta']:g}-{steps}".replace("+", "")


def trial_config(cfg: Config, params: dict, trial_dir: str) -> Config:
    """The pipeline's config for one trial: its hyperparameters, its own directories, the
    shared inputs (absolute: Tune runs trials in their own working directories)."""
    run_dir = cfg.run.run_dir
    scored = cfg.train.input or cfg.score.output or storage.join(run_dir, "scored")
    prepared = cfg.eval.input or cfg.ingest.output or storage.join(run_dir, "prepared")
    absolute = (lambda p: p if storage.is_s3(p) else os.path.abspath(p))  # noqa: E731
    train = dataclasses.replace(cfg.train, lr=params["lr"], max_steps=params["steps"], input=absolute(scored),
                                name=trial_name(params), storage=storage.join(trial_dir, "train"),
                                export=storage.join(trial_dir, "model"),
                                tracking_uri=cfg.train.tracking_uri or "file:" + os.path.join(trial_dir, "mlruns"))
    # The trial records the gate's verdict; it does not fail on it (a rejected trial is a result).
    ev = dataclasses.replace(cfg.eval, model=None, input=absolute(prepared), output=os.path.join(trial_dir, "eval"),
                             enforce=False)
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_dir=trial_dir), train=train, eval=ev,
                               objective=dataclasses.replace(cfg.objective, beta=params["beta"]))


def score(summary: dict, card: dict, cfg: Config) -> dict:
    """One trial's numbers from its eval summary and run card; `objective` is what the sweep
    maximises, `feasible` whether the trial may win (gate passed, KL within budget)."""
    m = summary["metrics"]
    mode = "sampled" if "sampled" in m.get("judge", {}) else "greedy"
    judged = m.get("judge", {}).get(mode)
    kl = m.get("kl", {}).get("per_token")
    budget = cfg.tune.max_kl_per_token if cfg.tune.max_kl_per_token is not None else cfg.eval.max_kl_per_token
    within = kl is None or budget is None or kl <= budget
    if judged is None:
        objective = float("nan")
    else:
        objective = judged["difference"]["mean"] if cfg.tune.objective == "judge" else judged["win_rate"]
    g = m["greedy"]
    return {"objective": objective, "feasible": bool(summary["passed"] and within and math.isfinite(objective)),
            "passed": summary["passed"], "reasons": summary["reasons"] + ([] if within else [
                f"KL {kl:.3f} nats/token over tune.max_kl_per_token {budget}"]),
            "judge_mode": mode, "judge_candidate": judged and judged["candidate"],
            "judge_reference": judged and judged["reference"], "judge_difference_ci95": judged and judged["difference"]["ci95"],
            "win_rate": judged and judged["win_rate"], "win_rate_ci95": judged and judged["win_rate_ci95"],
            "kl_per_token": kl, "kl_per_answer": m.get("kl", {}).get("per_answer"),
            "looping": g["degenerate"]["candidate"]["rate"], "looping_reference": g["degenerate"]["reference"]["rate"],
            "cut": g["at_max_tokens"]["candidate"]["rate"], "length_ratio": g["length_ratio"],
            "steps": card["steps"], "exported_step": card["exported_step"], "stopped_early": card["stopped_early"],
            "eval_loss": card["final_eval"].get("eval/loss"),
            "eval_reward_accuracy": card["final_eval"].get("eval/reward_accuracy")}


def run_trial(params: dict, base: dict, out_dir: str) -> dict:
    """One trial, no Tune needed: train, evaluate, drop the checkpoints (the export stays)."""
    from bco_ray.eval.stage import evaluate
    from bco_ray.train.stage import train

    name = trial_name(params)
    trial_dir = os.path.join(out_dir, "trials", name)
    cfg = trial_config(from_dict(base), params, trial_dir)
    t0 = time.time()
    card = train(cfg)
    summary = evaluate(cfg)
    shutil.rmtree(os.path.join(trial_dir, "train"), ignore_errors=True)  # AdamW state: 3x the model
    return {"trial": name, **params, **score(summary, card, cfg), "model": cfg.train.export,
            "seconds": round(time.time() - t0, 1)}


def _tune_trial(params: dict, base: dict) -> None:
    """A Tune trial: the trial's own work runs in a task outside the trial's placement group,
    since Ray Data and Ray Train schedule inside the group of whoever calls them, and this one
    holds no CPU (see `sweep`)."""
    import ray
    import ray.tune

    body = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy="DEFAULT")(run_trial)
    point = {k: params[k] for k in ("lr", "beta", "steps")}
    ray.tune.report(ray.get(body.remote(point, base, params["out"])))


def _progress_callback(total: int):
    """One console line per finished trial (the trials' own logs stay in Ray's log files)."""
    from ray.tune import Callback

    class Progress(Callback):
        done = 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            Progress.done += 1
            verdict = "feasible" if result.get("feasible") else "rejected: " + "; ".join(result.get("reasons") or [])
            console.say(f"[tune] trial {Progress.done}/{total} {result.get('trial')}: judged "
                        f"{_fmt(result.get('objective'), '+.4f')}, KL {_fmt(result.get('kl_per_token'), '.4f')} "
                        f"nats/token, looping {_fmt(result.get('looping'), '.0%')}, {result.get('seconds')} s; {verdict}")

        def on_trial_error(self, iteration, trials, trial, **info):
            Progress.done += 1
            console.say(f"[tune] trial {Progress.done}/{total} {trial.config.get('lr')}/{trial.config.get('beta')}: "
                        "failed (its error is in results.json)")

    return Progress()


def concurrency(cfg: Config) -> int:
    """Trials at once: what the cluster's GPUs hold, one at a time on CPUs (a trial's workers
    take the cores)."""
    import ray

    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    gpus = int(ray.cluster_resources().get("GPU", 0))
    return max(1, gpus // cfg.train.num_workers) if gpus else 1


def rank(results: list[dict]) -> list[dict]:
    """Feasible trials first, by objective (highest first); then the rest by objective."""
    def key(r):
        obj = r.get("objective")
        return (not r.get("feasible"), -(obj if obj is not None and math.isfinite(obj) else -math.inf))
    return sorted(results, key=key)


def sweep(cfg: Config) -> dict:
    """The grid on Ray Tune (Ray already initialised); results.json / results.md / best.yaml."""
    import ray.tune

    if cfg.eval.judge == "none":
        raise UserError("bco-ray tune ranks trials by the eval stage's judge, and eval.judge is 'none'",
                        "set eval.judge to feedback, reward-model or openai")
    scored = cfg.train.input or cfg.score.output or storage.join(cfg.run.run_dir, "scored")
    fs, path = storage.filesystem(scored, cfg.storage)
    if not storage.exists(fs, storage.join(path, "manifest.json")):
        if cfg.train.input:
            raise UserError(f"no scored data at train.input {scored} for the trials to train on",
                            "point train.input at the output of `bco-ray score-ref`, or leave it unset")
        from bco_ray.pipeline import stage_prepare, stage_score_ref

        console.say(f"[tune] no scored data at {scored} yet: preparing and scoring {cfg.ingest.input} first")
        for name, fn in (("prepare", stage_prepare), ("score-ref", stage_score_ref)):
            console.stage(name)
            fn(cfg, Path(cfg.run.run_dir))
            console.end_stage(f"[tune] {name} done")
    out = Path(cfg.tune.output or storage.join(cfg.run.run_dir, "tune")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    points = grid(cfg)
    at_once = concurrency(cfg)
    console.say(f"[tune] {len(points)} trials (lr {list(cfg.tune.lr)} x beta {list(cfg.tune.beta)} x steps "
                f"{list(cfg.tune.steps) or [cfg.train.max_steps]}), {at_once} at a time; each trains, then runs the "
                f"eval stage (judge: {cfg.eval.judge})")
    t0 = time.time()
    space = {"lr": ray.tune.grid_search(list(cfg.tune.lr)), "beta": ray.tune.grid_search(list(cfg.tune.beta)),
             "steps": ray.tune.grid_search(list(cfg.tune.steps) or [cfg.train.max_steps]),
             "out": str(out)}
    # A trial only drives its Ray Train run and its eval task, which reserve the cores and GPUs
    # themselves: any CPU the trial held would be missing from them (a train worker of 2 CPUs
    # never fits beside 0.001 on a 2-CPU machine). Tune refuses an empty request, so the trial
    # reserves a little memory instead.
    tuner = ray.tune.Tuner(
        # The config goes by object store, not in the param space: Tune writes that to every
        # trial's params.json, and the config may hold secrets.
        ray.tune.with_resources(ray.tune.with_parameters(_tune_trial, base=to_dict(cfg)), {"memory": 64 * 2**20}),
        param_space=space,
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=at_once),
        run_config=ray.tune.RunConfig(name="tune", storage_path=str(out / "ray-tune"), verbose=0,
                                      callbacks=[_progress_callback(len(points))]),
    )
    grid_results = tuner.fit()
    results, failed = [], []
    for r in grid_results:
        if r.error is not None:
            failed.append({"config": {k: r.config[k] for k in ("lr", "beta", "steps")}, "error": str(r.error)[:500]})
        elif r.metrics:
            results.append({k: v for k, v in r.metrics.items() if k in TRIAL_KEYS})
    results = rank(results)
    best = results[0] if results and results[0]["feasible"] else None
    summary = {"trials": results, "failed": failed, "best": best, "objective": cfg.tune.objective,
               "max_kl_per_token": cfg.tune.max_kl_per_token if cfg.tune.max_kl_per_token is not None
               else cfg.eval.max_kl_per_token, "seconds": round(time.time() - t0, 1),
               "data": os.path.abspath(scored) if not storage.is_s3(scored) else scored}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(results_markdown(summary))
    if results:
        (out / "results.png").write_bytes(plot(summary))
    if best:
        (out / "best.yaml").write_text(best_yaml(best))
    if not cfg.tune.keep_models:
        for r in results:
            if r is not best:
                shutil.rmtree(r["model"], ignore_errors=True)
    for line in summary_lines(summary, out):
        console.say(line)
    return summary


TRIAL_KEYS = ("trial", "lr", "beta", "steps", "objective", "feasible", "passed", "reasons", "judge_mode",
              "judge_candidate", "judge_reference", "judge_difference_ci95", "win_rate", "win_rate_ci95",
              "kl_per_token", "kl_per_answer", "looping", "looping_reference", "cut", "length_ratio",
              "exported_step", "stopped_early", "eval_loss", "eval_reward_accuracy", "model", "seconds")


def best_yaml(best: dict) -> str:
    return (f"# The best trial of `bco-ray tune` ({best['trial']}): judged {best['judge_difference_ci95']} better "
            f"than the reference (95 % CI), KL {best['kl_per_token']:.4f} nats/token.\n"
            f"# Use: bco-ray align --config YOUR.yaml --train.lr {best['lr']} --objective.beta {best['beta']}"
            + (f" --train.max_steps {best['steps']}" if best["steps"] is not None else "") + "\n"
            f"train:\n  lr: {best['lr']}\n" + (f"  max_steps: {best['steps']}\n" if best["steps"] is not None else "")
            + f"objective:\n  beta: {best['beta']}\n")


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def results_markdown(summary: dict) -> str:
    lines = ["| trial | lr | beta | steps (exported) | judge: candidate - reference [95 % CI] | win rate | "
             "KL nats/token | looping (ref) | cut | eval loss | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["trials"]:
        ci = r.get("judge_difference_ci95") or [None, None]
        verdict = "**best**" if r is summary["best"] or r == summary["best"] else (
            "feasible" if r["feasible"] else "rejected: " + "; ".join(r["reasons"]))
        lines.append(f"| {r['trial']} | {r['lr']:g} | {r['beta']:g} | {r['steps']} ({r['exported_step']}"
                     f"{', stopped early' if r.get('stopped_early') else ''}) | {_fmt(r['objective'], '+.4f')} "
                     f"[{_fmt(ci[0], '+.4f')}, {_fmt(ci[1], '+.4f')}] | {_fmt(r['win_rate'], '.0%')} | "
                     f"{_fmt(r['kl_per_token'], '.4f')} | {_fmt(r['looping'], '.0%')} ({_fmt(r['looping_reference'], '.0%')}) | "
                     f"{_fmt(r['cut'], '.0%')} | {_fmt(r['eval_loss'], '.4f')} | {verdict} |")
    for f in summary["failed"]:
        lines.append(f"| failed: {f['config']} | | | | | | | | | | {f['error'][:200]} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict) -> bytes:
    """Judged gain against the KL spent, one point per trial (hollow: rejected or over budget)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in summary["trials"]:
        if r["kl_per_token"] is None or not math.isfinite(r["objective"]):
            continue
        ci = r.get("judge_difference_ci95") or [r["objective"]] * 2
        err = [[r["objective"] - ci[0]], [ci[1] - r["objective"]]] if summary["objective"] == "judge" else None
        ax.errorbar(r["kl_per_token"], r["objective"], yerr=err, fmt="o", capsize=3,
                    mfc=None if r["feasible"] else "none", color="#3a7" if r["feasible"] else "#c44")
        ax.annotate(f"lr {r['lr']:g}, b {r['beta']:g}, {r['steps']} st", (r["kl_per_token"], r["objective"]),
                    fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axhline(0, color="#999", lw=0.8)
    ax.set_xscale("symlog", linthresh=1e-3)  # KLs span decades (and a tiny one can be negative)
    if summary["max_kl_per_token"] is not None:
        ax.axvline(summary["max_kl_per_token"], color="#c44", lw=0.8, ls="--")
    ax.set_xlabel("KL(candidate || reference), nats per token")
    ax.set_ylabel("judge: candidate - reference" if summary["objective"] == "judge" else "win rate")
    ax.set_title("bco-ray tune: judged gain vs KL spent (hollow: rejected)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def summary_lines(summary: dict, out: Path) -> list[str]:
    best = summary["best"]
    lines = [f"[tune] {len(summary['trials'])} trials done, {len(summary['failed'])} failed, in "
             f"{summary['seconds']:.0f} s; table: {out / 'results.md'}"]
    if best:
        lines.append(f"[tune] best: lr {best['lr']:g}, beta {best['beta']:g}, steps {best['steps']}: judged "
                     f"{best['objective']:+.4f} vs the reference, KL {_fmt(best['kl_per_token'], '.4f')} nats/token; "
                     f"model {best['model']}; overrides in {out / 'best.yaml'}")
    else:
        lines.append("[tune] no trial passed the gate within the KL budget: lower the learning rates or the steps")
    return lines
