"""GPU check and throughput of the BCO training step, without Ray (one script, one lease).

    PYTHONPATH=. python bench/gpu_step.py [--quick] [--out results.json]

1. Kernels: bf16 `sequence_logps` and the fused head against an fp64 reference (rel. error).
2. Train step on a Qwen2-0.5B-shaped model (24 layers, hidden 896, GPT-2 vocabulary, 0.40B
   parameters, random init, bf16), precomputed reference log-probs, seq 512 with a 128-token
   prompt, AdamW, side by side in one process:
     naive     full logits, fp32 log_softmax, bco_loss            (the plain-PyTorch baseline)
     fused     bco_ray.train.step.train_step: fused chunked LM head, prompt rows skipped
     compiled  the same with torch.compile on every decoder layer and on the head's chunk math
   tokens/s counts every real token (prompt + completion); model FLOPs = 6 N per token.
3. FSDP2: the same step with `fully_shard` (1 rank, NCCL, bf16 params / fp32 reductions,
   fp32 master weights), checked finite and timed.
The figures to beat (platform.md, same shape, one H100): TRL 1.13 BCOTrainer 19.4k tok/s
(defaults) and 45.0k (precomputed reference); plain PyTorch naive 77.4k (batch 16).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time

import torch

from bco_ray.config import ObjectiveConfig
from bco_ray.train.objectives import (
    RewardShift,
    bco_loss,
    sequence_logps,
    sequence_logps_from_hidden,
)
from bco_ray.train.step import PolicyLogps, train_step

PEAK_TFLOPS = 989.0  # H100 SXM dense bf16


def rel_err(x, ref):
    return float((x.double() - ref).norm() / ref.norm())


def check_kernels(dev) -> dict:
    torch.manual_seed(1)
    B, T, V, H = 4, 256, 50257, 896
    hidden = torch.randn(B, T, H, device=dev, dtype=torch.bfloat16) / 4
    weight = torch.randn(V, H, device=dev, dtype=torch.bfloat16) / 8
    labels = torch.randint(0, V, (B, T), device=dev)
    mask = torch.rand(B, T, device=dev) > 0.3
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = (h64 @ w64.t()).log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1).mul(mask).sum(-1)
    ref.sum().backward()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused = sequence_logps_from_hidden(h, w, labels, mask)
    fused.sum().backward()
    logits = (hidden @ weight.t()).requires_grad_()
    chunked = sequence_logps(logits, labels, mask)
    return {"chunked_rel_err": rel_err(chunked.detach(), ref.detach()),
            "fused_rel_err": rel_err(fused.detach(), ref.detach()),
            "fused_grad_hidden_rel_err": rel_err(h.grad, h64.grad),
            "fused_grad_weight_rel_err": rel_err(w.grad, w64.grad),
            "finite": bool(torch.isfinite(fused).all() and torch.isfinite(h.grad).all())}


LAYERS = 24


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def make_model(dev, dtype=torch.bfloat16):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=50257, hidden_size=896, intermediate_size=4864, num_hidden_layers=LAYERS,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(dev):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    return model


def make_batch(B, T, P, dev, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, 50257, (B, T), generator=g)
    comp = torch.zeros(B, T, dtype=torch.long)
    comp[:, P:] = 1
    return {"input_ids": ids.to(dev), "attention_mask": torch.ones_like(ids).to(dev),
            "completion_mask": comp.to(dev), "label": (torch.arange(B) % 2 == 0).to(dev),
            "ref_logps": (-2.0 * (T - P) + torch.randn(B, generator=g)).to(dev)}


def naive_step(model, opt, mb, shift, beta=0.1):
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits[:, :-1]
    lp = logits.float().log_softmax(-1).gather(-1, mb["input_ids"][:, 1:, None]).squeeze(-1)
    logps = (lp * mb["completion_mask"][:, 1:]).sum(-1)
    loss, rewards = bco_loss(logps, mb["ref_logps"], mb["label"], shift.value, beta)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    shift.update(rewards, mb["label"])
    shift.step()
    return float(loss.detach())


def measure(name, step_fn, batches, n_params, warmup, steps) -> dict:
    dev = batches[0]["input_ids"].device
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_compile = time.perf_counter()
    for i in range(warmup):
        step_fn(batches[i % len(batches)])
    _sync(dev)
    t_compile = time.perf_counter() - t_compile
    losses = []
    t0 = time.perf_counter()
    for i in range(steps):
        losses.append(step_fn(batches[i % len(batches)]))
    _sync(dev)
    dt = (time.perf_counter() - t0) / steps
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[:1])
    tps = tokens / dt
    res = {"variant": name, "tokens_per_s": round(tps), "step_ms": round(dt * 1e3, 1),
           "tflops": round(6 * n_params * tps / 1e12, 1),
           "mfu_pct": round(100 * 6 * n_params * tps / 1e12 / PEAK_TFLOPS, 1),
           "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 1) if dev.type == "cuda" else None,
           "warmup_s": round(t_compile, 1), "loss_first": losses[0], "loss_last": losses[-1],
           "finite": all(math.isfinite(x) for x in losses)}
    print(json.dumps(res), flush=True)
    return res


def run_variant(kind, B, dev, args) -> dict:
    model = make_model(dev)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=dev.type == "cuda")
    shift = RewardShift()
    batches = [make_batch(B, args.seq, args.prompt, dev, s) for s in range(2)]
    obj = ObjectiveConfig()
    if kind == "naive":
        def fn(mb):
            return naive_step(model, opt, mb, shift)
    else:
        policy = PolicyLogps(model, chunk_size=args.chunk, compiled_head=kind == "compiled")
        if kind == "compiled":
            for layer in model.model.layers:
                layer.compile()

        def fn(mb):
            return train_step(policy, opt, [mb], shift, obj)["loss"]
    try:
        return measure(f"{kind} b{B}", fn, batches, n_params, args.warmup, args.steps)
    except torch.OutOfMemoryError:
        print(json.dumps({"variant": f"{kind} b{B}", "oom": True}), flush=True)
        return {"variant": f"{kind} b{B}", "oom": True}


def free_memory(dev) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def run_fsdp(B, dev, args) -> dict:
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        model = make_model(dev, torch.float32)  # fp32 master weights
        policy = PolicyLogps(model, chunk_size=args.chunk, compiled_head=True)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
            layer.compile()
        fully_shard(policy, mp_policy=mp)
        n_params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=dev.type == "cuda")
        shift = RewardShift()
        batches = [make_batch(B, args.seq, args.prompt, dev, s) for s in range(2)]

        def fn(mb):
            return train_step(policy, opt, [mb], shift, ObjectiveConfig())["loss"]
        res = measure(f"fsdp2+compiled b{B} (fp32 master)", fn, batches, n_params, args.warmup, args.steps)
        res["delta_after"] = shift.value
        return res
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="kernels + one small variant (smoke test)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=24, help="fewer for a CPU smoke test")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_step.json"))
    args = p.parse_args()
    global LAYERS
    LAYERS = args.layers
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"# {name} torch {torch.__version__}", flush=True)
    results = {"device": name, "torch": torch.__version__}
    results["kernels"] = check_kernels(dev)
    print(json.dumps(results["kernels"]), flush=True)
    plan = [("naive", 16), ("compiled", 16), ("naive", 32), ("compiled", 32), ("compiled", 64), ("fused", 32)]
    if args.quick:
        plan = [("naive", 4), ("fused", 4), ("compiled", 4)]
    results["steps"] = []
    for kind, B in plan:
        results["steps"].append(run_variant(kind, B, dev, args))
        free_memory(dev)  # run_variant's model and optimizer are unreachable once it returns
    results["fsdp2"] = run_fsdp(4 if args.quick else 32, dev, args)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print("\n| variant | tokens/s | MFU % | peak GB | step ms |")
    print("|---|---|---|---|---|")
    for r in results["steps"] + [results["fsdp2"]]:
        if r.get("oom"):
            print(f"| {r['variant']} | OOM | | | |")
        else:
            print(f"| {r['variant']} | {r['tokens_per_s']} | {r['mfu_pct']} | {r['peak_gb']} | {r['step_ms']} |")


if __name__ == "__main__":
    main()
