"""Memory of the training workers at load, train, checkpoint and export, and the plan for 7B-70B.

    PYTHONPATH=. python bench/scale.py [--hidden 1536 --layers 20] [--out bench/results/cpu_scale.json]
    PYTHONPATH=. python bench/scale.py --plan-only

1. A synthetic Llama (random weights, saved once as bf16 safetensors like a hub checkpoint)
   is trained by 2 gloo workers (torch.multiprocessing, no Ray), through the product's code:
   `bco_ray.train.loop.build_policy`, `train_step`, `checkpoint.save` / `load`, `export_model`.
   Each worker samples its own RSS every 10 ms; each phase reports its peak.
     streamed   train.meta_init true (meta device, each rank reads its rows), streamed export
     baseline   the code before it, in the same run: every worker loads the whole float32 model
                through transformers (train.meta_init false), the export gathers the full state
                dict on rank 0 and builds a second model beside it to save it
   Figures are per worker, against the full float32 model (4 N bytes); the fixed overhead is
   the worker's RSS before the model (Python, torch, transformers).
2. The memory plan: per GPU and per node, each phase, for 7B, 13B and 70B on 8 and 32 GPUs,
   from the same arithmetic (docs/scaling.md explains each line).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time

import torch
import torch.multiprocessing as mp

GiB = 2**30


class PeakRSS:
    """This process's peak memory per phase, sampled by a thread: resident (RSS, which counts
    the pages of mmap'd safetensors files it has read) and anonymous (RssAnon: what the
    process itself holds). A phase records its peak and what it added to its start."""

    def __init__(self, every_s: float = 0.01):
        self.peak = self.peak_anon = 0
        self.phases: dict = {}
        threading.Thread(target=self._run, args=(every_s,), daemon=True).start()

    @staticmethod
    def read() -> tuple[int, int]:
        with open("/proc/self/status") as f:
            v = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith(("VmRSS", "RssAnon"))}
        return v["VmRSS"], v["RssAnon"]

    @classmethod
    def now(cls) -> int:
        return cls.read()[0]

    def _run(self, every_s):
        while True:
            rss, anon = self.read()
            self.peak, self.peak_anon = max(self.peak, rss), max(self.peak_anon, anon)
            time.sleep(every_s)

    def phase(self, name: str):
        bench = self

        class _Phase:
            def __enter__(self):
                self.start, self.start_anon = bench.read()
                bench.peak, bench.peak_anon = self.start, self.start_anon
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                time.sleep(0.03)
                rss, anon = bench.read()
                peak, peak_anon = max(bench.peak, rss), max(bench.peak_anon, anon)
                bench.phases[name] = {"peak_gb": round(peak / GiB, 3), "peak_anon_gb": round(peak_anon / GiB, 3),
                                      "added_anon_gb": round((peak_anon - self.start_anon) / GiB, 3),
                                      "seconds": round(time.perf_counter() - self.t0, 1)}
        return _Phase()


def make_model(path: str, hidden: int, layers: int, inter: int, vocab: int) -> int:
    """A random Llama saved as bf16 safetensors (once); returns its parameter count."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bco_ray.assets import resolve_model

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(path, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(resolve_model("tiny-llama", None))).save_pretrained(path)
        del model
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def baseline_export(policy, lm, tok, rank: int, out_dir: str) -> None:
    """The export before streaming: the full state dict on rank 0, then a second model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    fresh = AutoModelForCausalLM.from_config(lm.config, dtype=torch.float32)
    fresh.load_state_dict({k.removeprefix("lm."): v for k, v in full.items()}, strict=False)
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


def worker(rank: int, world: int, work: str, model_dir: str, variant: str, steps: int, results) -> None:
    from bco_ray.config import load_config
    from bco_ray.train import checkpoint
    from bco_ray.train.loop import build_policy, export_model
    from bco_ray.train.objectives import RewardShift
    from bco_ray.train.step import collate, train_step

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{work}/init", rank=rank, world_size=world)
    rss = PeakRSS()
    overhead = rss.read()[1]
    cfg = load_config(None, ["--model.policy", model_dir, "--train.meta_init", str(variant == "streamed").lower(),
                             "--train.export_shard_gb", "0.5"])
    device = torch.device("cpu")
    with rss.phase("load"):
        policy, lm, tok, autocast = build_policy(cfg, device, world)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    shift = RewardShift("balanced", 0.99)
    g = torch.Generator().manual_seed(rank)
    rows = [{"input_ids": torch.randint(0, lm.config.vocab_size, (48,), generator=g).tolist(),
             "completion_mask": [0] * 16 + [1] * 32, "label": i % 2 == 0, "ref_logps": -60.0} for i in range(2)]
    with rss.phase("train"):
        for _ in range(steps):
            m = train_step(policy, opt, [collate(rows, 0)], shift, cfg.objective, 1.0, sched, autocast)
    d = os.path.join(work, "checkpoint")  # every rank's files in one directory, as in storage
    with rss.phase("checkpoint_save"):
        checkpoint.save(d, policy, opt, sched, shift, {"step": steps}, rank, world, "fsdp")
    torch.distributed.barrier()
    with rss.phase("checkpoint_load"):
        checkpoint.load(d, policy, opt, sched, shift, rank, world)
    torch.distributed.barrier()
    with rss.phase("export"):
        if variant == "streamed":
            export_model(policy, lm, tok, cfg, rank, os.path.join(work, "export"), device)
        else:
            baseline_export(policy, lm, tok, rank, os.path.join(work, "export"))
        torch.distributed.barrier()
    results[f"{variant}/{rank}"] = {"overhead_gb": round(overhead / GiB, 3), "loss": float(m["loss"]), **rss.phases}
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------- the plan

MODELS = {  # Llama shapes: (params, layers, hidden, vocab)
    "7B": (6.74e9, 32, 4096, 32000),
    "13B": (13.0e9, 40, 5120, 32000),
    "70B": (70.6e9, 80, 8192, 128256),
}


def plan(gpus_per_node: int = 8, activations_gb: float = 8.0) -> list[dict]:
    """GiB per GPU and host GiB per node for each phase, as the code does it ("before": the
    code before streaming, as measured by the baseline above).

    Training state per GPU: fp32 weights + fp32 grads + AdamW's two fp32 moments, sharded
    over W GPUs (16 N / W), plus one decoder layer gathered in bf16 and its prefetch (FSDP2's
    unshard, 2 x 2 N / L) and the activations (a stated allowance, with gradient
    checkpointing). Load: 4 N / W a GPU; the host holds one bf16 slice in flight per rank
    (the largest: the embeddings' rows, 2 V H / W); before: every rank 4 N on host and GPU.
    Checkpoint: a rank's rows go to the host one file (1 GiB) at a time; before: all 16 N / W.
    Export: rank 0 holds one shard file (4 GiB) + one gathered fp32 tensor; before: the full
    state dict and a second model (8 N). Score / serve with vLLM: bf16 weights 2 N / TP."""
    out = []
    for name, (n, layers, hidden, vocab) in MODELS.items():
        for world in (8, 32):
            layer = 2 * (n - 2 * vocab * hidden) / layers / GiB
            train = 16 * n / world / GiB + 2 * layer + activations_gb
            tp = next(t for t in (1, 2, 4, 8) if 2 * n / t / GiB < 0.6 * 80)  # bf16 weights under 60 % of 80 GB
            out.append({
                "model": name, "gpus": world, "nodes": world // gpus_per_node,
                "load_gpu_gb_before": round(4 * n / GiB, 1), "load_gpu_gb": round(4 * n / world / GiB, 1),
                "load_host_gb_per_node_before": round(4 * n * gpus_per_node / GiB, 1),
                "load_host_gb_per_node": round(gpus_per_node * 2 * vocab * hidden / world / GiB, 2),
                "train_gpu_gb": round(train, 1), "fits_80gb": train < 78,
                "checkpoint_host_gb_per_node_before": round(16 * n / world * gpus_per_node / GiB, 1),
                "checkpoint_host_gb_per_node": round(gpus_per_node * (1 + 4 * vocab * hidden / world / GiB), 1),
                "export_rank0_host_gb_before": round(8 * n / GiB, 1),
                "export_rank0_host_gb": round(4 + 4 * vocab * hidden / GiB, 1),
                "vllm_tp": tp, "vllm_weights_gb_per_gpu": round(2 * n / tp / GiB, 1),
            })
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--inter", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--variants", default="baseline,streamed")
    ap.add_argument("--model-dir", default="/tmp/bco-scale-model")
    ap.add_argument("--plan-only", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    report: dict = {"plan": plan()}
    if not args.plan_only:
        model_dir = f"{args.model_dir}-{args.hidden}x{args.layers}"
        n = make_model(model_dir, args.hidden, args.layers, args.inter, args.vocab)
        report["model"] = {"params": n, "fp32_gb": round(4 * n / GiB, 3), "dir": model_dir}
        print(f"synthetic Llama: {n / 1e9:.2f}B parameters, full fp32 model {4 * n / GiB:.2f} GiB; 2 gloo workers")
        results = mp.Manager().dict()
        for variant in args.variants.split(","):
            with tempfile.TemporaryDirectory() as d:
                mp.spawn(worker, args=(2, d, model_dir, variant, args.steps, results), nprocs=2)
        report["workers"] = dict(results)
        full = 4 * n / GiB
        variants = args.variants.split(",")
        print(f"\n{'phase':16s}" + "".join(f"{v + ' r' + str(r):>24s}" for v in variants for r in (0, 1)))
        for ph in ("load", "train", "checkpoint_save", "checkpoint_load", "export"):
            cells = []
            for v in variants:
                for r in (0, 1):
                    w = results[f"{v}/{r}"][ph]
                    cells.append(f"{w['peak_anon_gb']:5.2f} GB +{w['added_anon_gb'] / full:4.2f}x")
            print(f"{ph:16s}" + "".join(f"{c:>24s}" for c in cells))
        print(f"(per worker: peak anonymous memory, and +Nx = what the phase added to the worker's memory at its "
              f"start / the full fp32 model, {full:.2f} GB; the worker held "
              f"{min(w['overhead_gb'] for w in results.values()):.2f} GB before the model)")
    print("\nmemory plan (GiB; docs/scaling.md):")
    for row in report["plan"]:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
