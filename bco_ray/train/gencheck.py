"""The generation check during training: the policy's greedy answers to a few fixed eval-split
prompts at step 0 and at every eval, judged by the eval gate's degeneration limits against
step 0's. It early-stops a collapsing run and keeps a failed eval from being exported as best
(bco_ray.train.loop). No Ray: the sharded decode runs in any torch process group."""

from __future__ import annotations

import os

import torch

from bco_ray.config import Config
from bco_ray.eval import quality
from bco_ray.train import checkpoint


def keep_gathered(policy, device: torch.device, world: int, share: float = 0.25) -> list:
    """FSDP2 gathers each layer's weights again at every forward: a decode of T tokens is T
    all-gathers of the model (over gloo, 2 CPU workers: the demo's generation check 79 s
    against 22 s on one worker). When the whole model, gathered, takes at most `share` of every
    rank's free memory, its modules stay gathered for the decode; returns them, to be set back.
    The ranks agree (all or none), as their collectives must match."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return []
    mods = [m for m in policy.modules() if isinstance(m, FSDPModule)]
    if world < 2 or not mods:
        return []
    need = sum(p.numel() * p.element_size() for p in policy.parameters())  # DTensor: the global size
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    ok = torch.tensor([1 if need <= share * free else 0], device=device)
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if not ok.item():
        return []
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
    return mods


def generation_check(policy, lm, tok, device, prompts: list[list[int]], max_tokens: int, rank: int,
                     world: int, gather_share: float = 0.25) -> list[dict]:
    """The policy's greedy answers to `prompts`, in order, on every rank. Each rank decodes its
    share in lockstep (every forward gathers FSDP shards, so all ranks make the same passes)."""
    from bco_ray.serve.generate import HFEngine, Sampling

    share = -(-len(prompts) // world)
    mine = prompts[rank * share:(rank + 1) * share]
    mine += [prompts[0]] * (share - len(mine))  # padding, after every real prompt once gathered
    engine = HFEngine.wrap(policy, tok, device, config=lm.config, generation_config=lm.generation_config)
    got: list = []
    policy.eval()
    gathered = keep_gathered(policy, device, world, gather_share)
    try:
        with torch.no_grad():
            for _ in engine.decode(mine, [Sampling(max_tokens=max_tokens, temperature=0.0)] * share, got,
                                   lockstep=world > 1):
                pass
    finally:
        for m in gathered:  # FSDP2's defaults again: the root stays gathered after a forward, layers do not
            m.set_reshard_after_forward(m is not policy, recurse=False)
        checkpoint.reshard(policy)
    policy.train()
    answers = [{"token_ids": list(o.token_ids), "text": o.text, "finish_reason": o.finish_reason} for o in got]
    if world > 1:
        parts: list = [None] * world
        torch.distributed.all_gather_object(parts, answers)
        answers = [a for part in parts for a in part]
    return answers[:len(prompts)]


def generation_verdict(answers: list[dict], start: list[dict], cfg: Config) -> dict:
    """The eval gate's degeneration limits (eval.max_*_increase), applied to the policy's greedy
    answers against the starting model's on the same prompts."""
    m = quality.compare(answers, start, cfg.train.gen_check_max_tokens, cfg.run.seed)
    ec = cfg.eval
    reasons = quality.gate({"greedy": m}, {"max_degenerate_increase": ec.max_degenerate_increase,
                                           "max_length_increase": ec.max_length_increase,
                                           "max_empty_increase": ec.max_empty_increase})
    out = {f"gen/{k}": m[k]["candidate"]["rate"] for k in ("degenerate", "at_max_tokens", "empty")}
    out.update({f"gen/{k}_start": m[k]["reference"]["rate"] for k in ("degenerate", "at_max_tokens", "empty")})
    out.update({"gen/tokens": m["tokens"]["candidate"], "gen/distinct_2": m["distinct_2"]["candidate"],
                "gen/passed": not reasons, "gen/reasons": reasons, "gen/prompts": m["n"]})
    return out


def gen_line(step: int, ev: dict) -> str:
    return (f"[train] generation check at step {step} ({ev['gen/prompts']} prompts, greedy): looping "
            f"{ev['gen/degenerate']:.0%} (step 0: {ev['gen/degenerate_start']:.0%}), cut at max tokens "
            f"{ev['gen/at_max_tokens']:.0%} ({ev['gen/at_max_tokens_start']:.0%}), empty {ev['gen/empty']:.0%} "
            f"({ev['gen/empty_start']:.0%}): " + ("passed" if ev["gen/passed"] else "FAILED: " + "; ".join(ev["gen/reasons"])))
