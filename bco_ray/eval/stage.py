"""`bco-ray eval`: what the trained model writes, beside what its reference writes; the gate.

    bco-ray eval --config configs/demo.yaml                     # <run_dir>/model vs the policy
    bco-ray eval --eval.model s3://bucket/models/v7 --eval.prompts prompts.jsonl

The candidate and the reference answer the same held-out prompts (the eval split's
distinct prompts, or a prompt file): one greedy answer each, and `eval.samples` answers at
temperature 1 with the same seed for both models (paired). Reported, each with a 95 %
interval (`bco_ray.eval.quality`): looping answers, answers cut at max_tokens, empty answers,
length, distinct-n, KL(candidate || reference) on the candidate's own samples, and a judge's
score (`bco_ray.eval.judge`). A candidate past a gate (eval.max_*) is rejected: eval.json beside
the export says so (serve refuses it), and the stage fails naming the metric.

The work is one Ray task (one GPU when the cluster has any); `run_eval` under it needs no Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import os
import time
from pathlib import Path

import numpy as np

from bco_ray import console, storage
from bco_ray.config import Config, from_dict, to_dict
from bco_ray.errors import UserError
from bco_ray.eval import quality
from bco_ray.raycluster import torch_threads

SIDE_BY_SIDE = 8  # prompts whose answers the report shows in full


def _rank(seed: int, text: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{text}".encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "big")


def _prepared_dir(cfg: Config) -> str:
    return cfg.eval.input or cfg.ingest.output or storage.join(cfg.run.run_dir, "prepared")


def _scan(cfg: Config, split: str, columns: list[str]):
    """Record batches of the prepared data's `split` (bounded memory: one batch at a time)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, path = storage.filesystem(_prepared_dir(cfg), cfg.storage)
    data = storage.join(path, "data")
    if not storage.exists(fs, data):
        raise UserError(f"no prepared data at {_prepared_dir(cfg)}/data to take eval prompts from",
                        "run `bco-ray prepare` first, or give a prompt file with --eval.prompts FILE")
    ds = pads.dataset(data, filesystem=fs, format="parquet", partitioning="hive")
    yield from ds.to_batches(columns=columns, filter=pc.field("split") == split, batch_size=8192)


def eval_prompts(cfg: Config) -> tuple[list[dict], str]:
    """Up to eval.num_prompts distinct prompts ({prompt, prompt_messages}) and where they came
    from. A seeded choice (the smallest hashes), so reruns and other models get the same ones."""
    ec = cfg.eval
    if ec.prompts:
        rows = []
        for n, line in enumerate(Path(ec.prompts).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{ec.prompts} line {n} is not JSON ({e.msg})",
                                'write one {"prompt": "..."} or {"messages": [...]} object per line') from None
            if isinstance(obj, dict) and isinstance(obj.get("messages"), list) and obj["messages"]:
                text = next((m.get("content", "") for m in reversed(obj["messages"]) if m.get("role") == "user"), "")
                rows.append({"prompt": str(text), "prompt_messages": json.dumps(obj["messages"])})
            elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                rows.append({"prompt": obj["prompt"], "prompt_messages": None})
            else:
                raise UserError(f"{ec.prompts} line {n} has neither a 'prompt' string nor a 'messages' list",
                                'write one {"prompt": "..."} or {"messages": [...]} object per line')
        return rows[:ec.num_prompts], ec.prompts
    for split in ("eval", "train"):  # a log too small for an eval split still gets a gate
        heap: list[tuple[int, str, dict]] = []  # the num_prompts smallest ranks, negated (a max-heap)
        seen: set[str] = set()
        for b in _scan(cfg, split, ["prompt", "prompt_messages"]):
            for p, m in zip(b.column("prompt").to_pylist(), b.column("prompt_messages").to_pylist(), strict=True):
                key = m or p
                if key in seen:
                    continue
                r = _rank(cfg.run.seed, key)
                if len(heap) < ec.num_prompts:
                    heapq.heappush(heap, (-r, key, {"prompt": p, "prompt_messages": m}))
                    seen.add(key)
                elif -heap[0][0] > r:
                    _, old, _ = heapq.heapreplace(heap, (-r, key, {"prompt": p, "prompt_messages": m}))
                    seen.discard(old)
                    seen.add(key)
        if heap:
            return [row for _, _, row in sorted(heap, key=lambda t: -t[0])], f"the {split} split of {_prepared_dir(cfg)}"
    raise UserError(f"the prepared data at {_prepared_dir(cfg)} has no prompts", "prepare a log with kept rows first")


def judge_rows(cfg: Config, split: str, per_label: int) -> tuple[list[str], np.ndarray]:
    """Completions and labels of `split` for the feedback judge: a seeded sample per label."""
    heaps: dict[bool, list] = {True: [], False: []}
    for b in _scan(cfg, split, ["row_id", "completion", "label"]):
        for rid, c, lab in zip(b.column("row_id").to_pylist(), b.column("completion").to_pylist(),
                               b.column("label").to_pylist(), strict=True):
            h, r = heaps[bool(lab)], _rank(cfg.run.seed, rid)
            if len(h) < per_label:
                heapq.heappush(h, (-r, c))
            elif -h[0][0] > r:
                heapq.heapreplace(h, (-r, c))
    texts = [c for lab in (True, False) for _, c in heaps[lab]]
    return texts, np.array([True] * len(heaps[True]) + [False] * len(heaps[False]))


# ---------------------------------------------------------------------------- the work (no Ray)

def _answers(engine, prompt_ids: list[list[int]], max_tokens: int, samples: int, seed: int,
             batch: int) -> tuple[list[dict], list[dict]]:
    """(greedy, sampled): one greedy answer per prompt, and `samples` per prompt at temperature
    1, answer j of prompt i seeded with a function of (seed, i, j) only, so both models get the
    same seeds. Greedy and sampled rows share batches: a decode step costs about the same for
    1 row as for 48 on a CPU (it reads every weight once), so fewer, fuller batches are faster."""
    from bco_ray.serve.generate import Sampling

    jobs = [(i, None) for i in range(len(prompt_ids))] + \
        [(i, j) for i in range(len(prompt_ids)) for j in range(samples)]
    greedy, sampled = [], []
    for s in range(0, len(jobs), batch):
        chunk = jobs[s:s + batch]
        params = [Sampling(max_tokens=max_tokens, temperature=0.0) if j is None else
                  Sampling(max_tokens=max_tokens, temperature=1.0, seed=seed * 1_000_003 + i * 1009 + j)
                  for i, j in chunk]
        got: list = []
        for _ in engine.generate_iter([prompt_ids[i] for i, _ in chunk], params, outputs=got):
            pass
        for (i, j), o in zip(chunk, got, strict=True):
            (greedy if j is None else sampled).append(
                {"prompt": i, "token_ids": list(o.token_ids), "text": o.text, "finish_reason": o.finish_reason})
    return greedy, sampled


def _score(model, prompt_ids: list[list[int]], answers: list[dict], eos: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-prob of each sampled answer (its EOS too, when it stopped) under `model`."""
    from bco_ray.score.refscore import score_hf

    ids, masks = [], []
    for a in answers:
        completion = a["token_ids"] + ([eos] if a["finish_reason"] == "stop" else [])
        p = prompt_ids[a["prompt"]]
        ids.append(np.array(p + completion))
        masks.append(np.array([0] * len(p) + [1] * len(completion)))
    return score_hf(model, ids, masks, 8192, pad), np.array([m.sum() for m in masks], float)


def _judge(cfg: Config, embedder_dir: str | None):
    ec = cfg.eval
    if ec.judge == "none":
        return None
    if ec.judge == "feedback":
        from bco_ray.eval.judge import FeedbackJudge

        return FeedbackJudge(embedder_dir, judge_rows(cfg, "train", ec.judge_sample_size),
                             judge_rows(cfg, "eval", ec.judge_sample_size // 4), cfg.udm.max_embed_length)
    if ec.judge == "reward-model":
        from bco_ray.assets import local_model_dir
        from bco_ray.eval.judge import RewardModelJudge

        if not ec.judge_model:
            raise UserError("eval.judge 'reward-model' needs eval.judge_model", "set it to a HF sequence-classification directory")
        return RewardModelJudge(local_model_dir(ec.judge_model, cfg), cfg.model.trust_remote_code)
    from bco_ray.eval.judge import OpenAIJudge

    if not (ec.judge_url and ec.judge_model):
        raise UserError("eval.judge 'openai' needs eval.judge_url and eval.judge_model",
                        "e.g. --eval.judge_url http://127.0.0.1:8001/v1 --eval.judge_model my-judge")
    return OpenAIJudge(ec.judge_url, ec.judge_model, ec.judge_prompt, ec.judge_api_key_env)


def _judged(judge, texts: list[str], cand: list[dict], ref: list[dict], seed: int) -> dict:
    prompts = [texts[a["prompt"]] for a in cand]
    both = judge.score(prompts + prompts, [a["text"] for a in cand] + [a["text"] for a in ref])
    c, r = both[:len(cand)], both[len(cand):]
    ok = np.isfinite(c) & np.isfinite(r)
    for a, s in zip(cand, c, strict=True):
        a["score"] = float(s)
    for a, s in zip(ref, r, strict=True):
        a["score"] = float(s)
    return {**quality.judged(c[ok], r[ok], seed), "unscored": int((~ok).sum())}


def run_eval(cfg: Config, candidate_dir: str, reference_dir: str, prompts: list[dict],
             embedder_dir: str | None = None, device: str | None = None) -> dict:
    """Generate, score and judge; the report dict (with every answer under 'answers')."""
    import gc

    import torch

    from bco_ray.data.tokenization import FeedbackTokenizer
    from bco_ray.serve.generate import HFEngine

    ec, seed = cfg.eval, cfg.run.seed
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    t0 = time.time()
    timings = {}
    out: dict = {"answers": {}}
    logps = {}
    for role, path in (("candidate", candidate_dir), ("reference", reference_dir)):
        engine = HFEngine(path, dtype, device=device, trust_remote_code=cfg.model.trust_remote_code)
        if role == "candidate":
            enc = FeedbackTokenizer(engine.tok, 1 << 30, (1 << 30) - 1, cfg.ingest.chat_template)
            prompt_ids = [enc.prompt_ids(p["prompt"], p["prompt_messages"]) for p in prompts]
            eos, pad = engine.tok.eos_token_id, engine.pad
        greedy, sampled = _answers(engine, prompt_ids, ec.max_tokens, ec.samples, seed, ec.batch_size)
        out["answers"][role] = {"greedy": greedy, "sampled": sampled}
        if sampled:  # the candidate's samples, under each model: the KL estimate
            cand_sampled = out["answers"]["candidate"]["sampled"]
            logps[role], tokens = _score(engine.model, prompt_ids, cand_sampled, eos, pad)
        timings[role] = round(time.time() - t0, 1)
        del engine
        gc.collect()
    ans = out["answers"]
    out["greedy"] = quality.compare(ans["candidate"]["greedy"], ans["reference"]["greedy"], ec.max_tokens, seed)
    if ec.samples:
        out["sampled"] = quality.compare(ans["candidate"]["sampled"], ans["reference"]["sampled"], ec.max_tokens, seed)
        out["kl"] = quality.kl_estimate(logps["candidate"], logps["reference"], tokens, seed)
    judge = _judge(cfg, embedder_dir)
    if judge is not None:
        texts = [p["prompt"] for p in prompts]
        out["judge"] = {"info": judge.info, "greedy": _judged(judge, texts, ans["candidate"]["greedy"],
                                                             ans["reference"]["greedy"], seed)}
        if ec.samples:
            out["judge"]["sampled"] = _judged(judge, texts, ans["candidate"]["sampled"], ans["reference"]["sampled"],
                                              seed)
    timings["total"] = round(time.time() - t0, 1)
    out.update(prompts=len(prompts), device=device, dtype=dtype, seconds=timings)
    return out


def _task(cfg_dict: dict, prompts: list[dict], num_threads: float) -> dict:
    import torch

    from bco_ray.assets import local_model_dir, resolve_model

    cfg = from_dict(cfg_dict)
    torch.set_num_threads(torch_threads(num_threads))
    cand = local_model_dir(candidate_uri(cfg), cfg)
    ref = str(resolve_model(cfg.model.reference or cfg.model.policy, cfg.model.cache_dir))
    emb = str(resolve_model(cfg.model.embedder, cfg.model.cache_dir)) if cfg.eval.judge == "feedback" else None
    return run_eval(cfg, cand, ref, prompts, emb)


# ---------------------------------------------------------------------------- the stage

def candidate_uri(cfg: Config) -> str:
    return cfg.eval.model or cfg.train.export or storage.join(cfg.run.run_dir, "model")


def output_dir(cfg: Config) -> Path:
    return Path(cfg.eval.output or storage.join(cfg.run.run_dir, "eval"))


def limits(cfg: Config) -> dict:
    ec = cfg.eval
    return {"max_degenerate_increase": ec.max_degenerate_increase, "max_length_increase": ec.max_length_increase,
            "max_empty_increase": ec.max_empty_increase, "max_kl_per_token": ec.max_kl_per_token}


def side_by_side(report: dict, prompts: list[dict], k: int = SIDE_BY_SIDE) -> list[dict]:
    ans = report["answers"]
    return [{"prompt": prompts[i]["prompt"], "reference": ans["reference"]["greedy"][i]["text"],
             "candidate": ans["candidate"]["greedy"][i]["text"]} for i in range(min(k, len(prompts)))]


def evaluate(cfg: Config) -> dict:
    """The stage: prompts, the Ray task, the gate, eval.json / samples.jsonl, the verdict beside
    the export. Raises a UserError (exit 1) when the candidate is rejected and eval.enforce."""
    import ray

    ec = cfg.eval
    cand_uri = candidate_uri(cfg)
    fs, cand_path = storage.filesystem(cand_uri, cfg.storage)
    if not storage.exists(fs, storage.join(cand_path, "config.json")):
        raise UserError(f"no model to evaluate at {cand_uri}", "run `bco-ray train` first, or set eval.model")
    prompts, source = eval_prompts(cfg)
    console.say(f"[eval] {len(prompts)} prompts from {source}: greedy + {ec.samples} sampled answer(s) each, "
                f"candidate and reference, up to {ec.max_tokens} tokens; judge: {ec.judge}")
    console.status("generating answers (candidate, then reference)")
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    # DEFAULT: outside any placement group this driver runs in (a `bco-ray tune` trial holds
    # one of a sliver of a CPU, which would otherwise capture the task and never fit it).
    task = ray.remote(num_cpus=ec.num_cpus, num_gpus=gpus, max_retries=0, scheduling_strategy="DEFAULT")(_task)
    # Local paths as the driver sees them: the task may run in another working directory.
    here = {"model": cand_uri, "input": _prepared_dir(cfg)}
    here = {k: v if storage.is_s3(v) else os.path.abspath(v) for k, v in here.items()}
    task_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(ec, **here))
    report = ray.get(task.remote(to_dict(task_cfg), prompts, ec.num_cpus))
    reasons = quality.gate(report, limits(cfg))
    passed = not reasons
    verdict = {"passed": passed, "enforced": ec.enforce, "reasons": reasons, "model": cand_uri,
               "limits": limits(cfg), "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    answers = report.pop("answers")
    with (out / "samples.jsonl").open("w") as f:
        for role, modes in answers.items():
            for mode, rows in modes.items():
                for a in rows:
                    f.write(json.dumps({"model": role, "mode": mode, "prompt": prompts[a["prompt"]]["prompt"],
                                        **{k: v for k, v in a.items() if k != "prompt"}}, ensure_ascii=False) + "\n")
    summary = {**verdict, "prompts_from": source, "metrics": report,
               "side_by_side": side_by_side({"answers": answers}, prompts)}
    (out / "eval.json").write_text(json.dumps(summary, indent=1))
    storage.write_bytes(fs, storage.join(cand_path, "eval.json"), json.dumps(verdict, indent=1).encode())
    for line in summary_lines(summary):
        console.say(line)
    if not passed and ec.enforce:
        raise UserError(f"the model at {cand_uri} failed the eval gate: " + "; ".join(reasons),
                        "it is marked rejected (serve refuses it); see the answers side by side in the report and "
                        f"{out / 'samples.jsonl'}, then train with a lower train.lr, fewer steps or a larger "
                        "objective.beta (or loosen eval.max_*)", exit_code=1)
    return summary


def _rate(m: dict, key: str) -> str:
    c, r = m[key]["candidate"], m[key]["reference"]
    return f"{c['rate']:.0%} [{c['ci95'][0]:.0%}, {c['ci95'][1]:.0%}] vs {r['rate']:.0%}"


def summary_lines(summary: dict) -> list[str]:
    m = summary["metrics"]
    lines = []
    for mode in ("greedy", "sampled"):
        if mode in m:
            g = m[mode]
            lines.append(f"[eval] {mode}: looping {_rate(g, 'degenerate')}, cut at max_tokens "
                         f"{_rate(g, 'at_max_tokens')}, empty {_rate(g, 'empty')}, length x{g['length_ratio']:.2f} "
                         f"(candidate vs reference)")
    if kl := m.get("kl"):
        lines.append(f"[eval] KL to the reference: {kl['per_token']:.4f} nats/token, {kl['per_answer']:.3f} "
                     f"[{kl['per_answer_ci95'][0]:.3f}, {kl['per_answer_ci95'][1]:.3f}] nats/answer")
    if j := m.get("judge"):
        auc = j["info"].get("heldout_auc")
        for mode in ("greedy", "sampled"):
            if mode in j:
                s = j[mode]
                lines.append(f"[eval] judge ({j['info']['kind']}{f', held-out AUC {auc:.2f}' if auc else ''}) "
                             f"{mode}: {s['candidate']:.3f} vs {s['reference']:.3f}, candidate wins "
                             f"{s['win_rate']:.0%} [{s['win_rate_ci95'][0]:.0%}, {s['win_rate_ci95'][1]:.0%}]")
    lines.append("[eval] gate: passed" if summary["passed"] else
                 "[eval] gate: REJECTED: " + "; ".join(summary["reasons"]))
    return lines
