"""Training throughput and memory: bco-ray's BCO step vs TRL 1.13's BCOTrainer, side by side.

    # TRL 1.13 (the last release with BCO) is in the dev environment (`bench` extra, scripts/setup.sh):
    python bench/train.py                                              # CPU, SmolLM2-135M
    PYTHONPATH=. python bench/train.py --device cuda --model /models/qwen2-0.5b --batch 16

Same model, same rows (the demo generator's text, chat-templated), same batch size and
number of optimizer steps for every variant; each variant runs in a fresh subprocess so
its peak memory is its own:

  trl             BCOTrainer defaults (reference model run on the fly, gradient checkpointing)
  trl-precompute  BCOTrainer with precompute_ref_log_probs=True
  ours            bco_ray.train.step.train_step, reference log-probs precomputed (score-ref)
  ours-gc         the same with gradient checkpointing (the memory comparison)

tokens/s counts real (unpadded) prompt + completion tokens of the timed steps; the
first `--warmup` steps are not timed. Peak memory: CUDA max allocated, or the process's
RSS high-water mark on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def rows(n: int, seed: int = 0) -> list[dict]:
    import pyarrow.dataset as pads

    from bco_ray.data.demo_data import write_log

    with tempfile.TemporaryDirectory() as d:
        write_log(d, n, seed=seed, shift=0.0, dirty=0.0, days=1, variants=False)
        t = pads.dataset(d, format="parquet").to_table(columns=["prompt", "completion", "feedback"])
    out = [{"prompt": r["prompt"], "completion": r["completion"], "label": r["feedback"] in ("up", "thumbs_up", "1")}
           for r in t.to_pylist()][:n]
    for i, r in enumerate(out):  # balanced labels, whatever the generator's spelling
        r["label"] = i % 2 == 0
    return out


def _peak_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def tokenized(tok, data: list[dict], max_length: int):
    ids, masks = [], []
    for r in data:
        p = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                    tokenize=True, return_dict=False)
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        x = (list(p) + c)[:max_length]
        ids.append(x)
        masks.append([0] * len(p) + [1] * (len(x) - len(p)))
    return ids, masks


def run_ours(args, gc: bool) -> dict:
    import numpy as np
    import torch

    from bco_ray.assets import load_causal_lm
    from bco_ray.config import ObjectiveConfig
    from bco_ray.score.refscore import score_hf
    from bco_ray.train.objectives import RewardShift
    from bco_ray.train.step import PolicyLogps, collate, train_step

    torch.manual_seed(0)
    dev = torch.device(args.device)
    model, tok = load_causal_lm(args.model, "float32")
    data = rows(args.batch * (args.steps + args.warmup))
    ids, masks = tokenized(tok, data, args.max_length)
    model.to(dev).eval()
    t0 = time.perf_counter()
    ref = score_hf(model, [np.array(x) for x in ids], [np.array(m) for m in masks], 16384,
                   tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    ref_s = time.perf_counter() - t0
    model.train()
    model.config.use_cache = False
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = PolicyLogps(model, chunk_size=1024, compiled_head=args.compile)
    if args.compile:
        for layer in model.get_decoder().layers:
            layer.compile()
    opt = torch.optim.AdamW(policy.parameters(), lr=5e-7, fused=dev.type in ("cuda", "cpu"))  # as the train stage
    shift = RewardShift()
    autocast = torch.bfloat16 if args.bf16 else None
    examples = [{"input_ids": x, "completion_mask": m, "label": r["label"], "ref_logps": float(lp)}
                for x, m, r, lp in zip(ids, masks, data, ref, strict=True)]
    tokens, t_timed = 0, 0.0
    for s in range(args.warmup + args.steps):
        batch = examples[s * args.batch:(s + 1) * args.batch]
        mb = collate(batch, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        t0 = time.perf_counter()
        train_step(policy, opt, [mb], shift, ObjectiveConfig(), autocast_dtype=autocast)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if s >= args.warmup:
            t_timed += time.perf_counter() - t0
            tokens += sum(len(b["input_ids"]) for b in batch)
    return {"tokens": tokens, "seconds": t_timed, "reference_pass_s": round(ref_s, 2)}


def run_trl(args, precompute: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.bco import BCOConfig, BCOTrainer

    from bco_ray.assets import load_causal_lm

    torch.manual_seed(0)
    model, tok = load_causal_lm(args.model, "float32")
    ref_model = None if precompute else load_causal_lm(args.model, "float32")[0]
    data = rows(args.batch * (args.steps + args.warmup))
    ids, _ = tokenized(tok, data, args.max_length)
    templated = [{"prompt": tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                                    add_generation_prompt=True),
                  "completion": r["completion"], "label": r["label"]} for r in data]
    lengths = [len(x) for x in ids]

    class Timer(TrainerCallback):
        def __init__(self):
            self.t, self.seconds, self.tokens, self.step = 0.0, 0.0, 0, 0

        def on_step_begin(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            if self.step >= args.warmup:
                self.seconds += time.perf_counter() - self.t
                self.tokens += sum(lengths[self.step * args.batch:(self.step + 1) * args.batch])
            self.step += 1

    timer = Timer()
    with tempfile.TemporaryDirectory() as out:
        cfg = BCOConfig(output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
                        learning_rate=5e-7, max_length=args.max_length, precompute_ref_log_probs=precompute,
                        report_to="none", logging_steps=10_000, save_strategy="no", use_cpu=args.device == "cpu",
                        bf16=args.bf16, dataloader_drop_last=True, seed=0)
        trainer = BCOTrainer(model=model, ref_model=ref_model, args=cfg, train_dataset=Dataset.from_list(templated),
                             processing_class=tok, callbacks=[timer])
        trainer.train()
    return {"tokens": timer.tokens, "seconds": timer.seconds}


def child(args) -> None:
    fn = {"ours": lambda: run_ours(args, False), "ours-gc": lambda: run_ours(args, True),
          "trl": lambda: run_trl(args, False), "trl-precompute": lambda: run_trl(args, True)}[args.variant]
    r = fn()
    r.update(variant=args.variant, tokens_per_s=r["tokens"] / max(r["seconds"], 1e-9),
             peak_mb=_peak_mb(args.device))
    print("RESULT " + json.dumps(r), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--compile", action="store_true", help="ours: torch.compile the decoder layers and head")
    ap.add_argument("--variants", default="trl,trl-precompute,ours,ours-gc")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.variant:
        return child(args)
    results = []
    passthrough, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if a in ("--variants", "--out"):
            skip = True
            continue
        if not a.startswith(("--variants=", "--out=")):
            passthrough.append(a)
    for v in args.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", v] + passthrough
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            print(f"{v}: failed\n{p.stderr[-3000:]}", flush=True)
            continue
        r = json.loads(line[0][7:])
        r["wall_s"] = round(time.time() - t0, 1)
        results.append(r)
        print(f"{v:15s} {r['tokens_per_s']:9.1f} tok/s   peak {r['peak_mb']:8.0f} MB   "
              f"({r['tokens']} tokens in {r['seconds']:.1f} s; wall {r['wall_s']} s)", flush=True)
    by = {r["variant"]: r for r in results}
    for ours in ("ours", "ours-gc"):
        for base in ("trl", "trl-precompute"):
            if ours in by and base in by:
                print(f"{ours} / {base}: {by[ours]['tokens_per_s'] / by[base]['tokens_per_s']:.2f}x tokens/s, "
                      f"{by[ours]['peak_mb'] / by[base]['peak_mb']:.2f}x peak memory")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
