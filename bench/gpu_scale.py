"""GPU check of the large-model path on one GPU, without Ray (one script, one lease).

    PYTHONPATH=. python bench/gpu_scale.py [--out results.json] [--hidden 2048 --layers 16]

On a ~1B synthetic Llama (random weights saved as bf16 safetensors, a word-level
tokenizer built offline), through the product's code (bco_ray.train.loop / weights /
checkpoint / step):
1. load: transformers' from_pretrained in fp32 then .to(GPU) (the old path) against meta
   init + FSDP2 (bf16 params, fp32 reductions) + each rank's rows streamed from the files;
   GPU peak and host peak RSS of each, and the loaded weights checked against the files.
2. checkpoint: save, perturb, load: the weights come back; seconds and bytes.
3. export: streamed bf16 shards + index; loaded back by from_pretrained and compared.
4. train: the BCO step on variable-length rows (64-1024 tokens), padded and packed, eager;
   tokens/s counts real tokens only.
5. cpu_offload: one step with FSDP2's CPUOffloadPolicy, GPU peak against the plain step.
6. train, compiled (train.compile: every decoder layer and the head's chunk math), last
   because its warm-up is the longest.
A mesh of one GPU shards nothing, so per-GPU memory here is the whole model's; what one
GPU shows is that the path runs in bf16 on CUDA and what it costs (bench/scale.py
measures the sharding on 2 CPU workers).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback

import torch

from bench.scale import PeakRSS

GiB = 2**30
REPORT: dict = {}


def save(args) -> None:
    if args.out:
        with open(args.out, "w") as f:
            json.dump(REPORT, f, indent=1)


def section(name, args):
    def wrap(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                REPORT[name] = fn(*a, **k)
                REPORT[name]["seconds"] = round(time.perf_counter() - t0, 1)
            except Exception as e:  # noqa: BLE001 - record and go on to the next check
                REPORT[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            print(name, json.dumps({k: v for k, v in REPORT[name].items() if k != "trace"})[:1500], flush=True)
            save(args)
            return REPORT[name]
        return run
    return wrap


def make_model(path: str, args, dev) -> int:
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                         num_key_value_heads=max(1, args.hidden // 512), max_position_embeddings=4096,
                         tie_word_embeddings=False, pad_token_id=1, eos_token_id=2, bos_token_id=0)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    del model
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)
    return n


def rows(n: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(64, 1025, (1,), generator=g))
        p = max(8, length // 4)
        out.append({"input_ids": torch.randint(4, vocab, (length,), generator=g).tolist(),
                    "completion_mask": [0] * p + [1] * (length - p), "label": i % 2 == 0,
                    "ref_logps": -2.0 * (length - p)})
    return out


def gpu_peak_gb(dev) -> float:
    return round(torch.cuda.max_memory_allocated(dev) / GiB, 2) if dev.type == "cuda" else 0.0


def reset(dev) -> None:
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--inter", type=int, default=5504)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--only-new", action="store_true", help="skip the compiled padded/packed pair (SDPA)")
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    REPORT["device"] = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    REPORT["torch"] = torch.__version__
    try:
        import flash_attn  # noqa: F401

        REPORT["flash_attn"] = True
    except ImportError:
        REPORT["flash_attn"] = False
    with tempfile.NamedTemporaryFile() as f:
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                             init_method=f"file://{f.name}", rank=0, world_size=1)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    work = tempfile.mkdtemp(prefix="gpu-scale-")
    model_dir = os.path.join(work, "model")
    rss = PeakRSS()

    t0 = time.perf_counter()
    n = make_model(model_dir, args, dev)
    REPORT["model"] = {"params": n, "fp32_gb": round(4 * n / GiB, 2), "make_s": round(time.perf_counter() - t0, 1)}
    print("model", REPORT["model"], flush=True)

    from bco_ray.config import load_config
    from bco_ray.train import checkpoint, weights
    from bco_ray.train.loop import build_policy, export_model
    from bco_ray.train.objectives import RewardShift
    from bco_ray.train.step import collate, train_step

    def config(*extra):
        return load_config(None, ["--model.policy", model_dir, "--train.mixed_precision", "bf16",
                                  "--train.export_shard_gb", "0.5", *extra])

    @section("load_old", args)
    def load_old():
        from transformers import AutoModelForCausalLM

        reset(dev)
        with rss.phase("load"):
            lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev)
        out = {"gpu_peak_gb": gpu_peak_gb(dev), "host_peak_gb": rss.phases["load"]["peak_gb"],
               "host_peak_anon_gb": rss.phases["load"]["peak_anon_gb"]}
        del lm
        return out

    load_old()
    state: dict = {}

    @section("load_streamed", args)
    def load_streamed():
        reset(dev)
        with rss.phase("load"):
            # world=2 asks for the FSDP2 path; fully_shard shards over the one-GPU group.
            policy, lm, tok, autocast = build_policy(config(), dev, 2)
        from safetensors import safe_open

        with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
            same = all(torch.equal(weights.local(p).detach().cpu(), f.get_tensor(k).float())
                       for k, p in list(lm.named_parameters())[:6] + list(lm.named_parameters())[-2:])
        state.update(policy=policy, lm=lm, tok=tok, autocast=autocast)
        return {"gpu_peak_gb": gpu_peak_gb(dev), "host_peak_gb": rss.phases["load"]["peak_gb"],
                "host_peak_anon_gb": rss.phases["load"]["peak_anon_gb"], "weights_equal_files": same, "fsdp2": hasattr(policy, "reshard")}

    load_streamed()

    def measure(policy, autocast, packed: bool, compiled: bool = False) -> dict:
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=dev.type == "cuda")
        shift = RewardShift("balanced", 0.99)
        obj = config().objective
        batches = [collate(rows(args.micro, args.vocab, s), 1, packed) for s in range(args.steps + 3)]
        losses, t_warm = [], time.perf_counter()
        for b in batches[:3]:
            losses.append(train_step(policy, opt, [b], shift, obj, 1.0, None, autocast)["loss"])
        torch.cuda.synchronize() if dev.type == "cuda" else None
        warm = time.perf_counter() - t_warm
        reset(dev)
        t0 = time.perf_counter()
        tokens = 0
        for b in batches[3:]:
            m = train_step(policy, opt, [b], shift, obj, 1.0, None, autocast)
            losses.append(m["loss"])
            tokens += int(m["tokens"])
        torch.cuda.synchronize() if dev.type == "cuda" else None
        dt = time.perf_counter() - t0
        padded = sum(int(b["input_ids"].numel()) for b in batches[3:])
        return {"tokens_per_s": round(tokens / dt), "step_ms": round(1000 * dt / args.steps, 1),
                "real_tokens_share": round(tokens / padded, 3), "warmup_s": round(warm, 1),
                "gpu_peak_gb": gpu_peak_gb(dev), "finite": all(map(lambda x: x == x and abs(x) < 1e9, losses))}

    @section("train_eager", args)
    def train_eager():
        return {("packed" if packed else "padded"): measure(state["policy"], state["autocast"], packed, False)
                for packed in (False, True)}

    @section("train_compiled", args)
    def train_compiled():
        policy, lm, tok, autocast = build_policy(config("--train.compile", "true"), dev, 2)
        return {("packed" if packed else "padded"): measure(policy, autocast, packed, True) for packed in (False, True)}

    @section("train_flex", args)
    def train_flex():
        # Packed rows under flex_attention: a block mask that skips the blocks between rows.
        out = {}
        for compiled in (False, True):
            policy, lm, tok, autocast = build_policy(config("--train.attn_implementation", "flex_attention",
                                                            "--train.compile", str(compiled).lower()), dev, 2)
            out[f"{'compiled' if compiled else 'eager'} packed"] = measure(policy, autocast, True, compiled)
            del policy, lm
            reset(dev)
        return out

    @section("checkpoint", args)
    def ckpt():
        policy = state["policy"]
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        shift = RewardShift("balanced", 0.99)
        train_step(policy, opt, [collate(rows(2, args.vocab, 99), 1)], shift, config().objective, 1.0, sched,
                   state["autocast"])
        d = os.path.join(work, "ckpt")
        name, p = next(iter(state["lm"].named_parameters()))
        before = weights.local(p).detach().clone()
        with rss.phase("save"):
            checkpoint.save(d, policy, opt, sched, shift, {"step": 1}, 0, 1, "fsdp")
        with torch.no_grad():
            weights.local(p).add_(1.0)
        with rss.phase("load"):
            checkpoint.load(d, policy, opt, sched, shift, 0, 1)
        size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        return {"restored": bool(torch.equal(weights.local(p).detach(), before)), "bytes_gb": round(size / GiB, 2),
                "save_s": rss.phases["save"]["seconds"], "load_s": rss.phases["load"]["seconds"],
                "host_added_save_gb": rss.phases["save"]["added_anon_gb"],
                "host_added_load_gb": rss.phases["load"]["added_anon_gb"]}

    ckpt()

    @section("export", args)
    def export():
        from transformers import AutoModelForCausalLM

        out = os.path.join(work, "export")
        with rss.phase("export"):
            export_model(state["policy"], state["lm"], state["tok"], config(), 0, out, dev)
        files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
        back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
        sd = back.state_dict()
        same = all(torch.equal(sd[k], weights.local(p).detach().to(torch.bfloat16).cpu())
                   for k, p in state["lm"].named_parameters())
        return {"files": len(files), "index": os.path.exists(os.path.join(out, "model.safetensors.index.json")),
                "dtype": str(back.dtype), "bytes_gb": round(sum(os.path.getsize(os.path.join(out, f)) for f in files) / GiB, 2),
                "host_added_gb": rss.phases["export"]["added_anon_gb"], "equal_to_trained_bf16": same}

    export()
    train_eager()
    state.clear()

    @section("cpu_offload", args)
    def offload():
        reset(dev)
        policy, lm, tok, autocast = build_policy(config("--train.cpu_offload", "true"), dev, 2)
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
        t0 = time.perf_counter()
        m = train_step(policy, opt, [collate(rows(args.micro, args.vocab, 7), 1, True)], RewardShift("balanced", 0.99),
                       config().objective, 1.0, None, autocast)
        torch.cuda.synchronize() if dev.type == "cuda" else None
        return {"gpu_peak_gb": gpu_peak_gb(dev), "step_s": round(time.perf_counter() - t0, 2),
                "finite": m["loss"] == m["loss"], "params_on": str(weights.local(next(policy.parameters())).device)}

    offload()
    reset(dev)
    if args.only_new:
        train_flex()
    else:
        train_compiled()
        reset(dev)
        train_flex()
    torch.distributed.destroy_process_group()
    save(args)


if __name__ == "__main__":
    main()
