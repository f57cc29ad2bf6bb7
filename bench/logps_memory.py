"""Peak memory and time of summed completion log-probs, forward + backward.

    python bench/logps_memory.py                         # CPU, fp32, SmolLM2's vocabulary
    python bench/logps_memory.py --device cuda --dtype bfloat16 --batch 16 --vocab 151936

Variants, same inputs:
  naive    logits.float().log_softmax(-1).gather(...)   (what TRL and most trainers do)
  chunked  bco_ray.train.objectives.sequence_logps(logits, ...) (fp32 logsumexp per chunk)
  fused    sequence_logps_from_hidden(hidden, W, ...)     (the LM head fused: no logits at all;
           its figure includes the head's matmul, which the other two get for free)
Each variant runs in a fresh subprocess. "extra" is the peak above the inputs: on CUDA,
torch.cuda.max_memory_allocated; on CPU, the process's RSS high-water mark (VmHWM, reset
through /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def run_variant(args) -> dict:
    import torch

    from bco_ray.train.objectives import sequence_logps, sequence_logps_from_hidden

    torch.manual_seed(0)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    B, T, V, H = args.batch, args.length, args.vocab, args.hidden
    hidden = (torch.randn(B, T, H, device=dev) / H**0.5).to(dtype).requires_grad_()
    weight = torch.randn(V, H, device=dev).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), device=dev)
    mask = torch.zeros(B, T, dtype=torch.bool, device=dev)
    mask[:, args.prompt:] = True  # the prompt is not scored
    if args.variant != "fused":
        with torch.no_grad():
            logits = (hidden @ weight.t()).requires_grad_()
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_mb("VmRSS:")
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        hidden.grad = weight.grad = None
        if args.variant != "fused":
            logits.grad = None
        if args.variant == "naive":
            lp = logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            out = (lp * mask).sum(-1)
        elif args.variant == "chunked":
            out = sequence_logps(logits, labels, mask, chunk_size=args.chunk)
        else:
            out = sequence_logps_from_hidden(hidden, weight, labels, mask, chunk_size=args.chunk)
        out.sum().backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.repeats
    if cuda:
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        extra = _rss_mb("VmHWM:") - base
    return {"variant": args.variant, "extra_mb": round(extra, 1), "ms": round(seconds * 1e3, 1),
            "value": float(out.sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--prompt", type=int, default=128, help="leading tokens outside the loss mask")
    p.add_argument("--vocab", type=int, default=49152, help="SmolLM2's; Qwen2's is 151936")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variant", choices=["naive", "chunked", "fused"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    shape = f"batch {args.batch} x {args.length} tokens ({args.length - args.prompt} scored), vocab {args.vocab}"
    logits_mb = args.batch * args.length * args.vocab * {"float32": 4}.get(args.dtype, 2) / 2**20
    print(f"# sequence_logps fwd+bwd on {args.device} {args.dtype}: {shape}; the logits alone are {logits_mb:.0f} MB")
    rows = []
    for variant in ("naive", "chunked", "fused"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(res.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"{variant} failed")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    # naive and chunked also need the logits themselves, which the model's head made;
    # fused never holds them: "with logits" is the like-for-like figure.
    for r in rows:
        r["total_mb"] = r["extra_mb"] + (0 if r["variant"] == "fused" else logits_mb)
    naive = rows[0]
    print(f"{'variant':<8} {'extra peak MB':>14} {'with logits MB':>15} {'vs naive':>9} {'ms/iter':>9} "
          f"{'sum(logps)':>14}")
    for r in rows:
        print(f"{r['variant']:<8} {r['extra_mb']:>14.1f} {r['total_mb']:>15.1f} "
              f"{r['total_mb'] / naive['total_mb']:>8.2f}x {r['ms']:>9.1f} {r['value']:>14.3f}")


if __name__ == "__main__":
    main()
