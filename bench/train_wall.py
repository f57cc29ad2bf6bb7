"""End to end on one log: bco-ray's prepare + score-ref + train vs TRL 1.13's BCOTrainer, and
where bco-ray's train stage spends its wall time.

    python bench/train_wall.py                          # the demo config and log, 2 CPUs: ~12 min
    python bench/train_wall.py --steps 76 --layouts config     # one epoch of the demo's log: ~14 min
    python bench/train_wall.py --config my.yaml --steps 40 --out runs/bench-wall --train.lr 1e-5
    python bench/train_wall.py --steps 76 --layouts config --trl-from /tmp/bench-train-wall/train_wall.json

bco-ray runs its stages with the config as a user would (`prepare`, `score-ref`, then `train`
in each layout below, every one from the same scored data); TRL 1.13's BCOTrainer (the
`bench` extra, bench/trl_bco.py) trains on the same prepared train split with the same steps,
global batch, lr, warm-up, schedule and precision, with its reference model run on the fly.
TRL does no eval, no generation check and no checkpoint; bco-ray's train stage does all three
by default, so the table gives its phases (the run card's `phase_seconds`) and a layout with
the generation check off. Prints a table and writes `<out>/train_wall.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {  # key: (name, overrides on top of the config)
    "config": ("the config's layout", []),
    "fsdp2": ("2 FSDP workers x 1 thread (gloo)", ["--train.num_workers", "2", "--train.cpus_per_worker", "0.5",
                                                   "--train.micro_batch_size", "{half}", "--train.grad_accum", "1"]),
    "nogen": ("the config's layout, generation check off", ["--train.gen_check_prompts", "0"]),
    "every10": ("the config's layout, eval and checkpoint every 10 steps", ["--train.eval_every", "10",
                                                                           "--train.checkpoint_every", "10"]),
}


def trl(cfg, data: str, out: Path, seed: int) -> dict:
    tc = cfg.train
    job = {"data": data, "out": str(out), "policy": cfg.model.policy, "steps": tc.max_steps,
           "batch": tc.micro_batch_size * tc.grad_accum * tc.num_workers, "lr": tc.lr, "beta": cfg.objective.beta,
           "max_length": cfg.ingest.max_length, "bf16": tc.mixed_precision == "bf16", "schedule": tc.schedule,
           "seed": seed, "threads": max(1, int(tc.cpus_per_worker * tc.num_workers))}
    t0 = time.time()
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "trl_bco.py"), json.dumps(job)], capture_output=True,
                       text=True)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        raise RuntimeError(f"TRL's BCOTrainer failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return {"wall": round(time.time() - t0, 1), **json.loads(line[0][7:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--steps", type=int, help="optimizer steps (default: the config's train.max_steps)")
    ap.add_argument("--out", default="/tmp/bench-train-wall")
    ap.add_argument("--layouts", default="config,fsdp2,nogen", help="comma-separated subset of: " + ", ".join(LAYOUTS))
    ap.add_argument("--trl-from", help="an earlier train_wall.json of the same machine, config and steps: its TRL run "
                                       "is reused (TRL's code did not change; 8-15 min saved)")
    args, overrides = ap.parse_known_args()  # the rest: dotted config overrides, e.g. --train.lr 1e-5

    from bco_ray.config import load_config
    from bco_ray.pipeline import stage_prepare, stage_score_ref
    from bco_ray.raycluster import init_ray
    from bco_ray.train.stage import train

    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    base = [*overrides, "--run.run_dir", str(out / "data"), "--train.tracking_uri", "none"]
    if args.steps:
        base += ["--train.max_steps", str(args.steps)]
    cfg = load_config(args.config, base)
    init_ray(cfg.ray)
    res: dict = {"config": args.config, "steps": cfg.train.max_steps, "rows": None, "stages": {}, "train": {}}
    for name, fn in (("prepare", stage_prepare), ("score-ref", stage_score_ref)):
        t0 = time.time()
        m = fn(cfg, out / "data")
        res["stages"][name] = round(time.time() - t0, 1)
        if name == "prepare":
            res["rows"] = m["kept_by_split_label"]
        print(f"[wall] {name}: {res['stages'][name]} s", flush=True)
    for name, extra in (LAYOUTS[k.strip()] for k in args.layouts.split(",")):
        extra = [x.replace("{half}", str(max(1, cfg.train.micro_batch_size * cfg.train.grad_accum
                                              * cfg.train.num_workers // 2))) for x in extra]
        c = load_config(args.config, base + extra + ["--train.name", f"wall-{len(res['train'])}",
                                                     "--train.export", str(out / f"model-{len(res['train'])}")])
        card = train(c)  # the whole run card (the pipeline's stage result is its summary)
        steps = [h["seconds"] for h in card["history"]]
        res["train"][name] = {"wall": card["seconds"], "phases": card["phase_seconds"], "steps": len(steps),
                              "median_step": round(sorted(steps)[len(steps) // 2], 2)}
        print(f"[wall] train, {name}: {json.dumps(res['train'][name])}", flush=True)
        shutil.rmtree(card["model"], ignore_errors=True)
        shutil.rmtree(out / "data" / "train", ignore_errors=True)  # checkpoints: GBs each
    if args.trl_from:
        before = json.loads(Path(args.trl_from).read_text())
        if before["steps"] != res["steps"] or before["rows"] != res["rows"]:
            raise SystemExit(f"--trl-from {args.trl_from}: another budget or split ({before['steps']} steps, "
                             f"{before['rows']} rows)")
        res["trl"] = {**before["trl"], "reused_from": args.trl_from}
    else:
        res["trl"] = trl(cfg, str(out / "data" / "prepared" / "data"), out / "trl-model", cfg.run.seed)
    shutil.rmtree(out / "trl-model", ignore_errors=True)
    print(f"[wall] TRL 1.13 BCOTrainer: {json.dumps(res['trl'])}", flush=True)
    (out / "train_wall.json").write_text(json.dumps(res, indent=1))
    print(table(res))


def table(res: dict) -> str:
    shared = res["stages"]["prepare"] + res["stages"]["score-ref"]
    lines = [f"{res['steps']} optimizer steps; prepare {res['stages']['prepare']:.0f} s + score-ref "
             f"{res['stages']['score-ref']:.0f} s = {shared:.0f} s, once per log", "",
             "| run | train stage (s) | end to end (s) | median step (s) | where the train stage's time went (s) |",
             "|---|---|---|---|---|"]
    for name, r in res["train"].items():
        phases = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["phases"].items(), key=lambda kv: -kv[1]) if v >= 0.5)
        lines.append(f"| bco-ray, {name} | {r['wall']:.0f} | {r['wall'] + shared:.0f} | {r['median_step']:.2f} | "
                     f"{phases} |")
    t = res["trl"]
    lines.append(f"| TRL 1.13 BCOTrainer (reference on the fly) | {t['wall']:.0f} | {t['wall']:.0f} | "
                 f"{t['wall'] / max(t['steps'], 1):.2f} (wall / steps, loading included) | no eval, no checkpoint |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
