"""One optimizer step of BCO (or KTO / DPO) over the micro-batches of an accumulation window.

No Ray here: Ray Train's loop calls `train_step` on every worker, and so do the GPU
benchmark and the tests. A micro-batch is a dict of tensors:

    input_ids, attention_mask, completion_mask   (B, T)   completion_mask: scored tokens
    label                                        (B,)     bool, thumbs-up = True
    ref_logps                                    (B,)     precomputed reference log-probs
    weight                                       (B,)     UDM density ratio (optional)
    pair_id                                      (B,)     DPO only: pairs a chosen and a rejected row
    kl_input_ids, kl_attention_mask, kl_completion_mask, kl_ref_logps   KTO only: mismatched pairs

Exactness under accumulation and data parallelism: every micro-batch's loss is a SUM,
scaled by world_size / (rows in the whole global batch), so after DDP/FSDP average the
gradients across ranks the update is that of the mean over the global batch, whatever
the micro-batch sizes and however rows are split across ranks.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from bco_ray.config import ObjectiveConfig
from bco_ray.score.logprobs import DEFAULT_CHUNK, completion_logps
from bco_ray.train.objectives import (
    RewardShift,
    _all_reduce_sum,
    bco_loss,
    dpo_loss,
    kto_kl_estimate,
    kto_loss,
)


class PolicyLogps(nn.Module):
    """A causal LM seen as `(input_ids, attention_mask, completion_mask) -> summed logps`.

    Shard this module as the FSDP root (layers first), so the LM head's weight is
    gathered while the fused head uses it; compile `self.lm.get_decoder()`, not this.
    """

    def __init__(self, lm: nn.Module, chunk_size: int = DEFAULT_CHUNK, fused_head: bool = True,
                 compiled_head: bool = False):
        super().__init__()
        self.lm, self.chunk_size = lm, chunk_size
        self.fused_head, self.compiled_head = fused_head, compiled_head

    def forward(self, input_ids, attention_mask, completion_mask=None, position_ids=None, seq_ids=None,
                n_seqs=None, **lm_kwargs):
        if completion_mask is None:
            # A plain LM call (decoding, with its KV cache): through this module, so that the
            # FSDP root's hooks gather the weights it shards (embeddings, norm, head).
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **lm_kwargs)
        return completion_logps(self.lm, input_ids, attention_mask, completion_mask,
                                self.chunk_size, self.fused_head, self.compiled_head, position_ids, seq_ids, n_seqs)


def _pad(seqs: list, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max((len(x) for x in seqs), default=0)
    out = torch.full((len(seqs), length), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, x in enumerate(seqs):
        out[i, :len(x)] = torch.as_tensor(x, dtype=torch.long)
        attn[i, :len(x)] = 1
    return out, attn


def collate(examples: list[dict], pad_token_id: int, packed: bool = False) -> dict:
    """Right-padded tensors from examples with `input_ids` and `completion_mask` lists and
    scalar `label`, `ref_logps`; optional `weight`, `pair_id` (any id; None: unpaired) and
    KTO's `kl_input_ids`, `kl_completion_mask`, `kl_ref_logps`.

    packed: the rows back to back in one row of exactly their tokens, with `position_ids`
    restarting at 0 for each and `seq_ids` numbering them (no padding computed; the KL
    inputs of KTO stay padded)."""
    if packed and examples:
        lengths = [len(e["input_ids"]) for e in examples]
        cat = [t for e in examples for t in e["input_ids"]]
        ids = torch.tensor([cat], dtype=torch.long)
        attn = torch.ones_like(ids)
        comp = torch.tensor([[m for e in examples for m in e["completion_mask"]]], dtype=torch.long)
        pos = torch.cat([torch.arange(n) for n in lengths])[None]
        seq = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    else:
        ids, attn = _pad([e["input_ids"] for e in examples], pad_token_id)
        comp, _ = _pad([e["completion_mask"] for e in examples], 0)
    out = {"input_ids": ids, "attention_mask": attn, "completion_mask": comp,
           "label": torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool),
           "ref_logps": torch.tensor([float(e["ref_logps"]) for e in examples], dtype=torch.float64)}
    first = examples[0] if examples else {}
    if "weight" in first:
        out["weight"] = torch.tensor([float(e["weight"]) for e in examples], dtype=torch.float32)
    if "pair_id" in first:
        # Only equality matters inside a micro-batch: any hashable id (prepared data uses
        # strings) becomes a small integer.
        codes: dict = {}
        out["pair_id"] = torch.tensor([-1 if e["pair_id"] is None else codes.setdefault(e["pair_id"], len(codes))
                                       for e in examples], dtype=torch.long)
    if "kl_input_ids" in first:
        out["kl_input_ids"], out["kl_attention_mask"] = _pad([e["kl_input_ids"] for e in examples], pad_token_id)
        out["kl_completion_mask"], _ = _pad([e["kl_completion_mask"] for e in examples], 0)
        out["kl_ref_logps"] = torch.tensor([float(e["kl_ref_logps"]) for e in examples], dtype=torch.float64)
    if packed and examples:
        out["position_ids"], out["seq_ids"] = pos, seq
    return out


def logps_of(policy: nn.Module, mb: dict) -> torch.Tensor:
    """The policy's summed completion log-prob of each row of a padded or packed micro-batch."""
    if "position_ids" in mb:
        return policy(mb["input_ids"], None, mb["completion_mask"], position_ids=mb["position_ids"],
                      seq_ids=mb["seq_ids"], n_seqs=int(mb["label"].numel()))
    return policy(mb["input_ids"], mb["attention_mask"], mb["completion_mask"])


def _world(group=None) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _grad_sync(module: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch (FSDP2 or DDP)."""
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if not enabled and hasattr(module, "no_sync"):  # DDP
        return module.no_sync()
    return contextlib.nullcontext()


def _rows(mb: dict, loss: str) -> int:
    n = int(mb["label"].numel())
    return n // 2 if loss == "dpo" else n


def microbatch_loss(policy: nn.Module, mb: dict, obj: ObjectiveConfig, delta: float, group=None):
    """(summed loss, rewards, labels) of one micro-batch; rewards per row (DPO: per pair)."""
    logps = logps_of(policy, mb)
    label = mb["label"].to(torch.bool)
    if obj.loss == "bco":
        loss, rewards = bco_loss(logps, mb["ref_logps"], label, delta, obj.beta,
                                 mb.get("weight") if obj.udm_weights else None, reduction="sum")
        return loss, rewards, label
    if obj.loss == "kto":
        with torch.no_grad():
            kl_logps = policy(mb["kl_input_ids"], mb["kl_attention_mask"], mb["kl_completion_mask"])
        scored = mb["kl_completion_mask"].bool().any(-1)  # a dummy row scores nothing: not in z
        kl = kto_kl_estimate(kl_logps[scored], mb["kl_ref_logps"][scored], group)
        loss, rewards = kto_loss(logps, mb["ref_logps"], label, kl, obj.beta, obj.kto_desirable_weight,
                                 obj.kto_undesirable_weight, reduction="sum")
        return loss, rewards, label
    # DPO: order chosen and rejected rows by pair id so that index i is one pair.
    pid = mb["pair_id"]
    c_idx, r_idx = label.nonzero().squeeze(-1), (~label).nonzero().squeeze(-1)
    c_idx, r_idx = c_idx[pid[c_idx].argsort()], r_idx[pid[r_idx].argsort()]
    if not torch.equal(pid[c_idx], pid[r_idx]):
        raise ValueError("a DPO micro-batch must hold both rows of every pair")
    ref = mb["ref_logps"]
    loss, chosen, rejected = dpo_loss(logps[c_idx], logps[r_idx], ref[c_idx], ref[r_idx], obj.beta,
                                      reduction="sum")
    return loss, torch.cat([chosen, rejected]), torch.cat([label[c_idx], label[r_idx]])


def _dummy_batch(obj: ObjectiveConfig, device: torch.device) -> dict:
    """A batch with the keys `obj.loss` needs: one row (a pair for DPO), nothing scored."""
    n = 2 if obj.loss == "dpo" else 1
    ids = torch.zeros((n, 2), dtype=torch.long, device=device)
    mb = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.zeros_like(ids),
          "label": torch.arange(n, device=device) == 0 if n == 2 else torch.zeros(1, dtype=torch.bool, device=device),
          "ref_logps": torch.zeros(n, device=device), "pair_id": torch.zeros(n, dtype=torch.long, device=device)}
    if obj.loss == "kto":
        mb.update(kl_input_ids=ids, kl_attention_mask=torch.ones_like(ids), kl_completion_mask=torch.zeros_like(ids),
                  kl_ref_logps=torch.zeros(n, device=device))
    return mb


def train_step(policy: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[dict],
               shift: RewardShift, obj: ObjectiveConfig, max_grad_norm: float | None = 1.0,
               scheduler=None, autocast_dtype: torch.dtype | None = None, group=None) -> dict:
    """Forward/backward every micro-batch, clip, step, then commit the reward shift once.

    Every rank must call this with the same number of micro-batches (any sizes, zero rows
    included). Returns metrics averaged over the global batch (identical on every rank).

    A non-finite loss, reward or gradient norm on any rank skips the update on every rank
    (`skipped` is True): the gradients are dropped, the optimizer and the reward shift keep
    their state, and only the scheduler moves on, so the learning rate stays tied to the
    step count. The caller decides how many skips in a row end the run.
    """
    world = _world(group)
    delta = 0.0 if obj.delta_mode == "zero" else shift.value  # fixed for the whole window
    local_rows = sum(_rows(mb, obj.loss) for mb in micro_batches)
    global_rows = float(_all_reduce_sum(torch.tensor([float(local_rows)], dtype=torch.float64), group)[0])
    scale = world / max(global_rows, 1.0)
    device = next(policy.parameters()).device
    # [loss, n_up, sum r_up, n_down, sum r_down, correct, tokens, non-finite micro-batches]
    acc = torch.zeros(8, dtype=torch.float64)
    for i, mb in enumerate(micro_batches):
        mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
        with _grad_sync(policy, i == len(micro_batches) - 1):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                # An empty shard runs the very same forwards, collectives and backward on a
                # dummy batch with zero weight: FSDP's gathers, DDP's buffer broadcasts and
                # gradient all-reduce, and KTO's KL all-reduce stay in lockstep across ranks.
                empty = mb["label"].numel() == 0
                if empty:
                    mb = _dummy_batch(obj, device)
                loss_sum, rewards, label = microbatch_loss(policy, mb, obj, delta, group)
            (loss_sum * (0.0 if empty else scale)).backward()
        if empty:
            continue
        r = rewards.detach().double().cpu()
        if not (bool(torch.isfinite(loss_sum.detach())) and bool(torch.isfinite(r).all())):
            acc[7] += 1  # kept out of the metrics and the reward shift; the update is skipped below
            continue
        if obj.loss != "dpo":
            shift.update(rewards, label)
        up = label.cpu()
        correct = ((r - delta > 0) == up).sum() if obj.loss != "dpo" else (r[up] > r[~up]).sum()
        acc += torch.stack([loss_sum.detach().double().cpu(), up.sum().double(), r[up].sum(),
                            (~up).sum().double(), r[~up].sum(), correct.double(),
                            mb["attention_mask"].sum().double().cpu(), torch.zeros((), dtype=torch.float64)])
    # The global norm (FSDP2 and DDP reduce it across ranks), so every rank sees the same value.
    grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm or float("inf")))
    acc[7] += 0.0 if math.isfinite(grad_norm) else 1.0
    loss, n_up, s_up, n_dn, s_dn, correct, tokens, nonfinite = _all_reduce_sum(acc, group).tolist()
    skipped = nonfinite > 0  # the same sum on every rank: all skip or none does
    if skipped:
        shift.discard()
    else:
        optimizer.step()
        if obj.loss != "dpo":
            shift.step()  # one all-reduce; every micro-batch above saw the same delta
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    chosen, rejected = s_up / max(n_up, 1), s_dn / max(n_dn, 1)
    return {
        "loss": loss / max(global_rows, 1.0),
        "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margin": chosen - rejected,
        "delta": delta, "reward_accuracy": correct / max(global_rows, 1.0),
        "grad_norm": grad_norm, "rows": global_rows, "tokens": tokens, "skipped": skipped,
        "lr": optimizer.param_groups[0]["lr"],
        # mean log(pi / pi_ref) over the batch's completions: how far the policy moved on
        # the feedback data (a KL proxy; the true KL needs samples from the policy)
        "logratio": (s_up + s_dn) / max(n_up + n_dn, 1) / obj.beta,
    }


@torch.no_grad()
def evaluate(policy: nn.Module, micro_batches: list[dict], shift: RewardShift, obj: ObjectiveConfig,
             autocast_dtype: torch.dtype | None = None, group=None) -> dict:
    """Loss, rewards and reward accuracy on held-out micro-batches; delta is read, never updated.

    Every rank passes the same number of micro-batches (empty ones run a dummy batch)."""
    delta = 0.0 if obj.delta_mode == "zero" else shift.value
    device = next(policy.parameters()).device
    acc = torch.zeros(7, dtype=torch.float64)  # [loss, n_up, s_up, n_down, s_down, correct, rows]
    for mb in micro_batches:
        mb = {k: v.to(device) for k, v in mb.items()}
        empty = mb["label"].numel() == 0
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss_sum, rewards, label = microbatch_loss(policy, _dummy_batch(obj, device) if empty else mb,
                                                       obj, delta, group)
        if empty:
            continue
        r, up = rewards.double().cpu(), label.cpu()
        correct = ((r - delta > 0) == up).sum() if obj.loss != "dpo" else (r[up] > r[~up]).sum()
        acc += torch.stack([loss_sum.double().cpu(), up.sum().double(), r[up].sum(), (~up).sum().double(),
                            r[~up].sum(), correct.double(), torch.tensor(float(_rows(mb, obj.loss)))])
    loss, n_up, s_up, n_dn, s_dn, correct, rows = _all_reduce_sum(acc, group).tolist()
    chosen, rejected = s_up / max(n_up, 1), s_dn / max(n_dn, 1)
    return {"eval/loss": loss / max(rows, 1), "eval/rewards/chosen": chosen, "eval/rewards/rejected": rejected,
            "eval/rewards/margin": chosen - rejected, "eval/reward_accuracy": correct / max(rows, 1),
            "eval/logratio": (s_up + s_dn) / max(n_up + n_dn, 1) / obj.beta, "eval/rows": rows, "eval/delta": delta}
