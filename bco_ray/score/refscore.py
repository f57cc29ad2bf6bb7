"""Reference log-probs: the frozen reference model scores every completion once.

Two backends compute the same number, the summed log-prob of a row's completion tokens
(`completion_mask`) given everything before them:

- `HFScorer`: a transformers forward through `completion_logps`, the very function the
  policy uses in training (so at step 0 policy and reference agree to rounding), on
  length-sorted sub-batches under a padded-token budget.
- `VLLMScorer`: a vLLM AsyncLLM engine asked for prompt log-probs of the exact token ids
  (`TokensPrompt`, `prompt_logprobs=0`, one dummy output token), several batches in flight.

Both are Ray Data callable classes (one model per actor) and both reduce to the pure
functions `score_hf` / `sum_prompt_logprobs`, which run without Ray.
The Ray plumbing (reading, quarantine, manifest, skip-if-done) is in `stage.py`.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import numpy as np
import pyarrow as pa

TOO_LONG = "too_long_for_reference"
NON_FINITE = "non_finite_reference_logp"


def quarantine_rows(table: pa.Table, reason: str, extra: dict[str, list] | None = None) -> pa.Table:
    """Rows of the prepared data as quarantine rows: id, source, day, reason, the raw row (JSON)."""
    import json

    extra = extra or {}
    cols = {"prompt": table.column("prompt").to_pylist(), "completion": table.column("completion").to_pylist(),
            "label": [bool(x) for x in table.column("label").to_pylist()],
            "tokens": [len(x) for x in table.column("input_ids").to_pylist()], **extra}
    raw = [json.dumps(dict(zip(cols, vals, strict=True)), ensure_ascii=False) for vals in zip(*cols.values(), strict=True)]
    return pa.table({"row_id": table.column("row_id"), "source": table.column("source"), "day": table.column("day"),
                     "reason": pa.array([reason] * table.num_rows, pa.string()), "raw": pa.array(raw, pa.string())})


class QuarantineSink:
    """Where a scorer puts the rows it cannot score (non-finite log-probs): one parquet file per
    batch, named by its row ids, so a retried batch rewrites the same file instead of counting
    its rows twice."""

    def __init__(self, fs, folder: str):
        self.fs, self.folder = fs, folder

    def __call__(self, rows: pa.Table) -> None:
        import hashlib

        from bco_ray import storage

        key = hashlib.sha256("\n".join(map(str, rows.column("row_id").to_pylist())).encode()).hexdigest()[:16]
        storage.write_parquet_atomic(self.fs, self.folder, f"non_finite-{key}.parquet", rows)


# ---------------------------------------------------------------------------- token lists

def _lists(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = arr.values.to_numpy(zero_copy_only=False)
    offsets = arr.offsets.to_numpy()
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(arr))]


def mismatched_pairs(ids: list[np.ndarray], prompt_tokens: np.ndarray, max_length: int
                     ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """KTO's KL rows: row i's prompt with row (i+1) mod n's completion, cut to max_length.

    A deterministic partner keeps reruns identical; with n == 1 the row is paired with
    itself (an unbiased but useless estimate, as in TRL)."""
    n = len(ids)
    out_ids, out_mask = [], []
    for i in range(n):
        j = (i + 1) % n
        prompt, completion = ids[i][:prompt_tokens[i]], ids[j][prompt_tokens[j]:]
        completion = completion[: max(1, max_length - len(prompt))]
        out_ids.append(np.concatenate([prompt, completion]).astype(np.int32))
        out_mask.append(np.concatenate([np.zeros(len(prompt), np.int8), np.ones(len(completion), np.int8)]))
    return out_ids, out_mask


def length_buckets(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Indices grouped, longest first, so that rows x longest row <= batch_tokens (>= 1 row)."""
    order = np.argsort(-lengths, kind="stable")
    groups, start = [], 0
    while start < len(order):
        longest = int(lengths[order[start]])
        take = max(1, batch_tokens // max(longest, 1))
        groups.append(order[start:start + take])
        start += take
    return groups


# ---------------------------------------------------------------------------- hf

def score_hf(model, ids: list[np.ndarray], masks: list[np.ndarray], batch_tokens: int,
             pad_token_id: int, chunk_size: int = 1024) -> np.ndarray:
    """Summed completion log-probs (float64) of each row under `model`, no gradients."""
    import torch

    from bco_ray.score.logprobs import completion_logps

    device = next(model.parameters()).device
    out = np.zeros(len(ids), np.float64)
    lengths = np.array([len(x) for x in ids])
    with torch.inference_mode():
        for group in length_buckets(lengths, batch_tokens):
            t = int(lengths[group].max())
            input_ids = torch.full((len(group), t), pad_token_id, dtype=torch.long)
            attn = torch.zeros((len(group), t), dtype=torch.long)
            comp = torch.zeros((len(group), t), dtype=torch.long)
            for r, i in enumerate(group):
                n = len(ids[i])
                input_ids[r, :n] = torch.from_numpy(ids[i].astype(np.int64))
                attn[r, :n] = 1
                comp[r, :n] = torch.from_numpy(masks[i].astype(np.int64))
            logps = completion_logps(model, input_ids.to(device), attn.to(device), comp.to(device), chunk_size)
            out[group] = logps.double().cpu().numpy()
    return out


def score_inputs(table: pa.Table, kl: bool, max_length: int) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """The sequences to score for `table`: its rows, then (kl) their mismatched KL pairs, as
    (token ids, completion masks, number of rows)."""
    ids, masks = _lists(table.column("input_ids")), _lists(table.column("completion_mask"))
    n = len(ids)
    if kl:
        kl_ids, kl_masks = mismatched_pairs(ids, table.column("prompt_tokens").to_numpy(), max_length)
        ids, masks = ids + kl_ids, masks + kl_masks
    return ids, masks, n


def attach_scores(table: pa.Table, ids: list[np.ndarray], masks: list[np.ndarray], logps: np.ndarray, kl: bool,
                  quarantine=None) -> pa.Table:
    """`table` plus ref_logps / ref_tokens (and the KL columns) from the log-probs of
    `score_inputs`' sequences. Rows with a non-finite log-prob (their own or their KL row's)
    go to `quarantine(rows)` and are left out; without a quarantine they are an error."""
    n = table.num_rows
    ok = np.isfinite(logps[:n]) & (np.isfinite(logps[n:]) if kl else True)
    if not ok.all():
        bad = pa.array(~ok)
        if quarantine is None:
            raise FloatingPointError(f"the reference model gave a non-finite log-prob (row_id "
                                     f"{table.column('row_id')[int(np.flatnonzero(~ok)[0])]}): check its weights and dtype")
        quarantine(quarantine_rows(table.filter(bad), NON_FINITE,
                                   {"ref_logps": [str(x) for x in logps[:n][~ok]]}))
    table = table.append_column("ref_logps", pa.array(logps[:n], pa.float64()))
    table = table.append_column("ref_tokens", pa.array([int(m[1:].sum()) for m in masks[:n]], pa.int32()))
    if kl:
        table = table.append_column("kl_input_ids", pa.array(ids[n:], pa.list_(pa.int32())))
        table = table.append_column("kl_completion_mask", pa.array(masks[n:], pa.list_(pa.int8())))
        table = table.append_column("kl_ref_logps", pa.array(logps[n:], pa.float64()))
    return table if ok.all() else table.filter(pa.array(ok))


def _with_scores(table: pa.Table, score, kl: bool, max_length: int, quarantine=None) -> pa.Table:
    """`table` scored by `score(ids, masks)` (see attach_scores)."""
    ids, masks, _ = score_inputs(table, kl, max_length)
    return attach_scores(table, ids, masks, score(ids, masks), kl, quarantine)


class HFScorer:
    """Ray Data actor: a transformers reference model (safetensors only)."""

    def __init__(self, model: str, dtype: str, cache_dir: str | None, batch_tokens: int, chunk_size: int,
                 kl: bool, max_length: int, trust_remote_code: bool = False, num_threads: float = 1,
                 quarantine: QuarantineSink | None = None):
        import torch

        from bco_ray.assets import load_causal_lm
        from bco_ray.raycluster import torch_threads

        torch.set_num_threads(torch_threads(num_threads))  # one actor per core; oversubscription is slower
        if torch.cuda.device_count() > 1:  # the actor's GPUs (score.num_gpus_per_actor): layers spread over them
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from bco_ray.assets import resolve_model

            path = resolve_model(model, cache_dir)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), device_map="auto",
                                                              use_safetensors=True, trust_remote_code=trust_remote_code)
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        else:
            self.model, tok = load_causal_lm(model, dtype, cache_dir, trust_remote_code)
            self.model.to("cuda" if torch.cuda.is_available() else "cpu")
        self.model.eval()
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.batch_tokens, self.chunk_size, self.kl, self.max_length = batch_tokens, chunk_size, kl, max_length
        self.quarantine = quarantine

    def __call__(self, table: pa.Table) -> pa.Table:
        return _with_scores(table, lambda i, m: score_hf(self.model, i, m, self.batch_tokens, self.pad,
                                                         self.chunk_size), self.kl, self.max_length, self.quarantine)


# ---------------------------------------------------------------------------- vllm

def sum_prompt_logprobs(prompt_logprobs: list, ids: np.ndarray, mask: np.ndarray) -> float:
    """Sum of vLLM's prompt log-probs at the masked positions. Entry t holds the log-prob
    of token t given tokens < t (entry 0 is None); it is keyed by the actual token id."""
    total = 0.0
    for t in np.flatnonzero(mask):
        if t == 0:
            continue  # nothing predicts the first token; completion_logps skips it too
        total += prompt_logprobs[t][int(ids[t])].logprob
    return total


def vllm_cpu_environment(kvcache_gib: int) -> dict[str, str]:
    """What vLLM's CPU build needs (measured; see docs/reference-scoring.md)."""
    return {"VLLM_CPU_KVCACHE_SPACE": str(kvcache_gib), "VLLM_HOST_IP": "127.0.0.1",
            # The engine core in this process: no extra process per actor, nothing to reap.
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def vllm_stat_loggers(enabled: bool) -> list | None:
    """vLLM's engine metrics (vllm:* : running and waiting requests, KV-cache use, prompt and
    generation tokens, latencies) recorded as Ray metrics, so the cluster's Prometheus scrape
    and the Ray dashboard show them beside Ray's own, as ray.data.llm and ray.serve.llm do."""
    if not enabled:
        return None
    from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

    return [RayPrometheusStatLogger]


class VLLMScorer:
    """Ray Data actor: vLLM's AsyncLLM on exact token ids. `__call__` is a coroutine, so an
    actor works on score.vllm_batches_in_flight batches at once: the engine schedules the next
    batch's prompts while this one's log-probs are summed and its block leaves, rather than
    idling between batches as a blocking `LLM.generate` does. Its engine core runs in a child
    process (vLLM's design for AsyncLLM), which exits with the actor."""

    def __init__(self, model: str, dtype: str, cache_dir: str | None, max_model_len: int, kl: bool,
                 max_length: int, gpu_memory_utilization: float = 0.85, enforce_eager: bool = False,
                 cpu_kvcache_gib: int = 1, trust_remote_code: bool = False, seed: int = 0,
                 quarantine: QuarantineSink | None = None, tensor_parallel_size: int = 1, metrics: bool = True):
        import torch

        from bco_ray.assets import resolve_model
        from bco_ray.placement import vllm_parallel_args

        # With tensor parallelism this actor sees no GPU: vLLM's workers in its placement group do.
        if not torch.cuda.is_available() and tensor_parallel_size == 1:
            for k, v in vllm_cpu_environment(cpu_kvcache_gib).items():
                os.environ.setdefault(k, v)
        from vllm import AsyncEngineArgs, SamplingParams
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM

        path = str(resolve_model(model, cache_dir))
        args = AsyncEngineArgs(model=path, tokenizer=path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                               enforce_eager=enforce_eager, gpu_memory_utilization=gpu_memory_utilization,
                               trust_remote_code=trust_remote_code, disable_log_stats=True,
                               # a cached prefix has no prompt log-probs to return
                               enable_prefix_caching=False, **vllm_parallel_args(tensor_parallel_size))
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=vllm_stat_loggers(metrics))
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False,
                                     output_kind=RequestOutputKind.FINAL_ONLY)
        self.kl, self.max_length, self.quarantine = kl, max_length, quarantine

    async def _one(self, ids: np.ndarray):
        from vllm.inputs import TokensPrompt

        final = None
        async for out in self.llm.generate(TokensPrompt(prompt_token_ids=ids.tolist()), self.params, uuid.uuid4().hex):
            final = out
        return final

    async def score(self, ids: list[np.ndarray], masks: list[np.ndarray]) -> np.ndarray:
        outs = await asyncio.gather(*(self._one(x) for x in ids))
        return np.array([sum_prompt_logprobs(o.prompt_logprobs, x, m) for o, x, m in zip(outs, ids, masks, strict=True)],
                        np.float64)

    async def __call__(self, table: pa.Table) -> pa.Table:
        ids, masks, _ = score_inputs(table, self.kl, self.max_length)
        return attach_scores(table, ids, masks, await self.score(ids, masks), self.kl, self.quarantine)
