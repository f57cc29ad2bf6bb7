"""Generation quality, as numbers: degeneration, length, KL, intervals, the gate. Pure.

The train stage's eval (implicit-reward accuracy on held-out feedback) says nothing about
what the model writes: a model that answers `1. 1. 1. 1.` to every question can score 0.84
there. These are the measures the eval stage (`bco_ray.eval.stage`) reports for a candidate
beside its reference, on the same prompts with the same sampling seeds (paired), and the
gate that rejects a collapsed model. No Ray, no model: token ids and texts in, floats out.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np

# An answer shorter than this is too short to call repetitive (a one-line answer is fine).
MIN_TOKENS_FOR_REPETITION = 16


def repeated_ngram_share(ids: Sequence[int], n: int = 3) -> float:
    """Share of the answer's token n-grams that already occurred earlier in it: 0 for text
    that never repeats itself, -> 1 for a loop (`1. 1. 1. ...`)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def distinct_n(answers: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams over all n-grams, pooled over answers (Li et al. 2016's distinct-n):
    low when the model says the same thing to everyone."""
    grams = [tuple(a[i:i + n]) for a in answers for i in range(len(a) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def compression_ratio(text: str) -> float:
    """UTF-8 bytes over zlib-compressed bytes: ~1-2 for prose of this length, far above for
    a loop."""
    raw = text.encode("utf-8", "surrogatepass")
    return len(raw) / len(zlib.compress(raw, 9)) if raw else 1.0


def is_degenerate(ids: Sequence[int], text: str, max_repeat: float = 0.5) -> bool:
    """A loop: long enough to judge and more than `max_repeat` of its token trigrams repeats."""
    return len(ids) >= MIN_TOKENS_FOR_REPETITION and repeated_ngram_share(ids, 3) > max_repeat


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a rate (sound at 0 and n, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def bootstrap_mean(x: np.ndarray, seed: int = 0, reps: int = 2000) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of a mean; on paired differences (candidate minus
    reference, per prompt) it is the paired bootstrap."""
    x = np.asarray(x, float)
    if len(x) == 0:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, len(x), (reps, len(x)))
    means = x[idx].mean(1)
    return (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def answer_stats(answers: list[dict], max_tokens: int) -> dict:
    """One model's answers (dicts with token_ids, text, finish_reason) -> per-answer arrays."""
    ids = [a["token_ids"] for a in answers]
    return {"degenerate": np.array([is_degenerate(a["token_ids"], a["text"]) for a in answers], bool),
            "repeat3": np.array([repeated_ngram_share(i, 3) for i in ids]),
            "compression": np.array([compression_ratio(a["text"]) for a in answers]),
            "at_max_tokens": np.array([a["finish_reason"] == "length" and len(a["token_ids"]) >= max_tokens
                                       for a in answers], bool),
            "empty": np.array([not a["text"].strip() for a in answers], bool),
            "tokens": np.array([len(i) for i in ids], float),
            "distinct_1": distinct_n(ids, 1), "distinct_2": distinct_n(ids, 2)}


def _rate(flags: np.ndarray) -> dict:
    lo, hi = wilson(int(flags.sum()), len(flags))
    return {"rate": float(flags.mean()) if len(flags) else float("nan"), "ci95": [lo, hi], "n": int(len(flags))}


def _diff(cand: np.ndarray, ref: np.ndarray, seed: int) -> dict:
    d = np.asarray(cand, float) - np.asarray(ref, float)
    return {"mean": float(d.mean()) if len(d) else float("nan"), "ci95": list(bootstrap_mean(d, seed))}


def compare(cand: list[dict], ref: list[dict], max_tokens: int, seed: int = 0) -> dict:
    """Candidate vs reference answers to the same prompts with the same seeds (paired, in
    order): each rate with its Wilson interval, each difference with its paired-bootstrap one."""
    if len(cand) != len(ref):
        raise ValueError(f"paired answers expected: {len(cand)} candidate vs {len(ref)} reference")
    c, r = answer_stats(cand, max_tokens), answer_stats(ref, max_tokens)
    out: dict = {"n": len(cand)}
    for key in ("degenerate", "at_max_tokens", "empty"):
        out[key] = {"candidate": _rate(c[key]), "reference": _rate(r[key]), "difference": _diff(c[key], r[key], seed)}
    for key in ("tokens", "repeat3", "compression"):
        out[key] = {"candidate": float(c[key].mean()), "reference": float(r[key].mean()),
                    "difference": _diff(c[key], r[key], seed)}
    out["length_ratio"] = float(c["tokens"].mean() / max(r["tokens"].mean(), 1e-9))
    for key in ("distinct_1", "distinct_2"):
        out[key] = {"candidate": c[key], "reference": r[key]}
    return out


def kl_estimate(cand_logps: np.ndarray, ref_logps: np.ndarray, tokens: np.ndarray, seed: int = 0) -> dict:
    """KL(candidate || reference) from the candidate's own samples at temperature 1: the mean
    of log pi(y|x) - log pi_ref(y|x) (sums over each answer's tokens, EOS included), per
    answer and per token. Unbiased for the sequence-level KL; single answers can be negative."""
    d = np.asarray(cand_logps, float) - np.asarray(ref_logps, float)
    t = np.asarray(tokens, float)
    per_token = float(d.sum() / max(t.sum(), 1.0))
    lo, hi = bootstrap_mean(d, seed)
    scale = len(d) / max(t.sum(), 1.0)  # the per-answer interval, in per-token units
    return {"per_answer": float(d.mean()), "per_answer_ci95": [lo, hi], "per_token": per_token,
            "per_token_ci95": [lo * scale, hi * scale], "n": int(len(d))}


def judged(cand_scores: np.ndarray, ref_scores: np.ndarray, seed: int = 0) -> dict:
    """A judge's scores (higher is better) on paired answers: means, the paired difference,
    and the candidate's win rate (ties count half)."""
    c, r = np.asarray(cand_scores, float), np.asarray(ref_scores, float)
    wins = (c > r) + 0.5 * (c == r)
    lo, hi = wilson(int(round(wins.sum())), len(wins))
    return {"candidate": float(c.mean()), "reference": float(r.mean()), "difference": _diff(c, r, seed),
            "win_rate": float(wins.mean()), "win_rate_ci95": [lo, hi], "n": int(len(c))}


def gate(report: dict, limits: dict) -> list[str]:
    """The reasons to reject the candidate (empty: it passes). `limits` holds the eval
    config's max_degenerate_increase, max_length_increase, max_empty_increase and
    max_kl_per_token (None: not checked), compared with the point estimates; each mode
    (greedy, sampled) is checked on its own."""
    reasons = []
    checks = (("degenerate", "max_degenerate_increase", "degenerate (looping) answers"),
              ("at_max_tokens", "max_length_increase", "answers cut at max_tokens"),
              ("empty", "max_empty_increase", "empty answers"))
    for mode in ("greedy", "sampled"):
        m = report.get(mode)
        if not m:
            continue
        for key, limit_key, what in checks:
            limit = limits.get(limit_key)
            if limit is None:
                continue
            c, r = m[key]["candidate"]["rate"], m[key]["reference"]["rate"]
            if c - r > limit:
                reasons.append(f"{mode} {what}: {c:.0%} against the reference's {r:.0%} "
                               f"(eval.{limit_key} {limit:.0%})")
    kl = report.get("kl")
    if kl and limits.get("max_kl_per_token") is not None and kl["per_token"] > limits["max_kl_per_token"]:
        reasons.append(f"KL to the reference {kl['per_token']:.3f} nats/token "
                       f"(eval.max_kl_per_token {limits['max_kl_per_token']})")
    return reasons
