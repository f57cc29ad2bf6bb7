"""Reference scoring throughput: transformers (hf) vs vLLM on the same rows, side by side.

    python bench/refscore.py                                   # CPU: SmolLM2-135M, fp32 and bf16
    python bench/refscore.py --device cuda --dtypes bfloat16 --model /models/qwen2-0.5b --rows 4096

Rows are the demo generator's text (clean rows, `bco_ray.data.demo_data`), chat-templated and
tokenized like `prepare` does (prompt as a user turn, completion + EOS). Both backends are the functions
the Ray actors call (`score_hf`, `VLLMScorer.score`), without Ray, so the same script runs
on a GPU machine that has no Ray. Prints completion tokens/s, the ratio, and the gap
between backends and dtypes (max / mean abs difference of per-row summed log-probs, and
per completion token).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import numpy as np


def load_rows(model_dir: str, n: int, max_length: int):
    import tempfile

    import pyarrow.dataset as pads
    from transformers import AutoTokenizer

    from bco_ray.data.demo_data import write_log

    tok = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as d:
        write_log(d, n, seed=0, shift=0.0, dirty=0.0, days=1, variants=False)
        table = pads.dataset(d, format="parquet").to_table(columns=["prompt", "completion"])
    ids, masks = [], []
    for r in table.to_pylist():
        if not isinstance(r["prompt"], str) or not isinstance(r["completion"], str) or not r["completion"].strip():
            continue
        p = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                    tokenize=True, return_dict=False)
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        x = np.array((list(p) + c)[:max_length], np.int32)
        ids.append(x)
        masks.append(np.r_[np.zeros(len(p), np.int8), np.ones(len(x) - len(p), np.int8)])
        if len(ids) == n:
            break
    return ids, masks, tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="bundled alias or HF directory")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", default="hf,vllm")
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = ap.parse_args()

    import torch

    from bco_ray.assets import load_causal_lm, resolve_model
    from bco_ray.score.refscore import VLLMScorer, score_hf

    path = str(resolve_model(args.model))
    ids, masks, tok = load_rows(path, args.rows, args.max_length)
    tokens = int(sum(int(m[1:].sum()) for m in masks))
    print(f"model {args.model}; {len(ids)} rows, {sum(map(len, ids))} tokens, {tokens} completion tokens; "
          f"device {args.device}, torch threads {torch.get_num_threads()}", flush=True)
    results, scores = [], {}
    for dtype in args.dtypes.split(","):
        for backend in args.backends.split(","):
            t0 = time.perf_counter()
            if backend == "hf":
                model, _ = load_causal_lm(args.model, dtype)
                model.eval().to(args.device)
                pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
                run = lambda m=model, p=pad: score_hf(m, ids, masks, args.batch_tokens, p)  # noqa: E731
            else:
                try:
                    scorer = VLLMScorer(args.model, dtype, None, max_model_len=args.max_length + 1, kl=False,
                                        max_length=args.max_length, enforce_eager=args.device == "cpu")
                except ImportError:
                    print("vllm is not installed here: skipping it", flush=True)
                    continue
                # AsyncLLM's output handler lives on the loop of its first request: keep one loop.
                loop = asyncio.new_event_loop()
                run = lambda s=scorer, lp=loop: lp.run_until_complete(s.score(ids, masks))  # noqa: E731
            startup = time.perf_counter() - t0
            run_ids = ids[: max(1, len(ids) // 8)]
            if backend == "hf":  # warm-up on a slice (allocator, kernels)
                score_hf(model, run_ids, masks[: len(run_ids)], args.batch_tokens, pad)
            t0 = time.perf_counter()
            got = run()
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            scores[(backend, dtype)] = got
            row = {"backend": backend, "dtype": dtype, "startup_s": round(startup, 1), "seconds": round(seconds, 2),
                   "completion_tokens_per_s": round(tokens / seconds, 1),
                   "all_tokens_per_s": round(sum(map(len, ids)) / seconds, 1)}
            results.append(row)
            print(json.dumps(row), flush=True)
            del run
    base = ("hf", "float32") if ("hf", "float32") in scores else next(iter(scores))
    n_tok = np.array([int(m[1:].sum()) for m in masks])
    print(f"\ngaps against {base[0]} {base[1]} (per row sum; per completion token):")
    for key, got in scores.items():
        if key == base:
            continue
        d = np.abs(got - scores[base])
        print(f"  {key[0]:5s} {key[1]:9s} max {d.max():.2e} mean {d.mean():.2e}; "
              f"per token max {(d / n_tok).max():.2e} mean {(d / n_tok).mean():.2e}")
        results.append({"gap_vs": list(base), "backend": key[0], "dtype": key[1], "max_abs": float(d.max()),
                        "mean_abs": float(d.mean()), "per_token_max": float((d / n_tok).max())})
    by = {(r["backend"], r["dtype"]): r for r in results if "seconds" in r}
    for dtype in args.dtypes.split(","):
        if ("hf", dtype) in by and ("vllm", dtype) in by:
            ratio = by[("vllm", dtype)]["completion_tokens_per_s"] / by[("hf", dtype)]["completion_tokens_per_s"]
            print(f"vllm / hf tokens/s at {dtype}: {ratio:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
