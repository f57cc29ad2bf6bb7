"""The BCO objective, its reward shift, and the KTO / DPO baselines. Pure tensor math.

Notation (docs/concepts.md derives it): for a completion y of prompt x,

    r(x, y)  = beta * (log pi_theta(y|x) - log pi_ref(y|x))      log-probs SUMMED over tokens
    thumbs-up:    l+ = -log sigmoid(r - delta)
    thumbs-down:  l- = -log sigmoid(-(r - delta)) * w(x)          w = UDM density ratio, else 1

delta is a constant (no gradient) that tracks 1/2 (E_up[r] + E_down[r]), where the loss is
the tightest upper bound of the DPO loss; `RewardShift` keeps it.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from bco_ray.score.logprobs import completion_logps, sequence_logps, sequence_logps_from_hidden

__all__ = [
    "as_bool_labels", "bco_loss", "dpo_loss", "kto_kl_estimate", "kto_loss", "RewardShift",
    "sequence_logps", "sequence_logps_from_hidden", "completion_logps",
]

Reduction = Literal["mean", "sum"]


def as_bool_labels(labels, device: torch.device | str | None = None) -> torch.Tensor:
    """Labels as a bool tensor. Accepts bools, 0/1 numbers, numpy or torch arrays of them.

    Anything else (2, -1, 0.5, "up", None) is a ValueError: ingest maps label vocabularies;
    the objective refuses to guess (an `is True` check once turned 0/1 labels into NaNs).
    """
    if isinstance(labels, torch.Tensor):
        t = labels.detach()
    else:
        arr = np.asarray(labels)
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise ValueError(f"labels must be booleans or 0/1 numbers, got dtype {arr.dtype}")
        t = torch.from_numpy(arr.astype(np.float64) if arr.dtype.kind == "f" else arr.astype(np.int64))
    if t.dtype != torch.bool:
        bad = ~((t == 0) | (t == 1))
        if bool(bad.any()):
            raise ValueError(f"labels must be booleans or 0/1, got values {t[bad].unique()[:5].tolist()}")
        t = t != 0
    return t.to(device) if device is not None else t


def _reduce(losses: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "sum":
        return losses.sum()
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    # An empty shard (uneven data across workers) contributes 0, not NaN.
    return losses.mean() if losses.numel() else losses.sum()


def _check_pair(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.dim() != 1 or a.shape != b.shape:
        raise ValueError(f"{names} must be 1-D and of equal length, got {tuple(a.shape)}, {tuple(b.shape)}")


def _logratio(policy_logps, reference_logps) -> torch.Tensor:
    """log pi - log pi_ref in at least fp32; in float64 when the sums are float64 (they are
    large, ~-1e3, and nearly equal: the difference is where the precision goes)."""
    policy_logps, reference_logps = torch.as_tensor(policy_logps), torch.as_tensor(reference_logps)
    dtype = torch.promote_types(torch.promote_types(policy_logps.dtype, reference_logps.dtype), torch.float32)
    return policy_logps.to(dtype) - reference_logps.to(dtype, copy=False).to(policy_logps.device)


def bco_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, labels, delta,
             beta: float = 0.1, weights=None, reduction: Reduction = "mean"):
    """BCO loss of a batch and the implicit rewards (detached).

    policy_logps, reference_logps: (B,) summed completion log-probs. labels: thumbs-up is
    True/1. delta: the reward shift (float or tensor; never differentiated). weights: UDM
    density ratios, applied to thumbs-down rows only. reduction: "mean" over the batch, or
    "sum" so a trainer can divide by the global batch size under gradient accumulation.
    Returns (loss, rewards).
    """
    _check_pair(policy_logps, reference_logps, "policy_logps and reference_logps")
    up = as_bool_labels(labels, policy_logps.device)
    if up.shape != policy_logps.shape:
        raise ValueError(f"labels {tuple(up.shape)} do not match logps {tuple(policy_logps.shape)}")
    rewards = beta * _logratio(policy_logps, reference_logps)
    delta = torch.as_tensor(delta, dtype=rewards.dtype, device=rewards.device).detach()
    margin = rewards - delta
    losses = -F.logsigmoid(torch.where(up, margin, -margin))
    if weights is not None:
        w = torch.as_tensor(weights, dtype=rewards.dtype, device=rewards.device).detach()
        if w.shape != losses.shape:
            raise ValueError(f"weights {tuple(w.shape)} do not match logps {tuple(losses.shape)}")
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("weights must be finite and non-negative")
        losses = losses * torch.where(up, torch.ones_like(w), w)
    return _reduce(losses, reduction), rewards.detach()


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
             beta: float = 0.1, reduction: Reduction = "mean"):
    """DPO: -log sigmoid(beta * [(lp_w - lr_w) - (lp_l - lr_l)]) on paired rows.

    Returns (loss, chosen_rewards, rejected_rewards), rewards detached.
    """
    _check_pair(policy_chosen_logps, policy_rejected_logps, "chosen and rejected logps")
    chosen = beta * _logratio(policy_chosen_logps, reference_chosen_logps)
    rejected = beta * _logratio(policy_rejected_logps, reference_rejected_logps)
    losses = -F.logsigmoid(chosen - rejected)
    return _reduce(losses, reduction), chosen.detach(), rejected.detach()


def _all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over the ranks of `group` when torch.distributed runs with >1 rank; else as is."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return t
    if dist.get_backend(group) == "nccl":
        buf = t.to(torch.device("cuda", torch.cuda.current_device()))
    else:
        buf = t.cpu().clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.to(t.device)


def kto_kl_estimate(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor,
                    group=None) -> torch.Tensor:
    """KTO's reference point z: mean policy/reference log-ratio on MISMATCHED (prompt,
    completion) pairs, over all ranks, detached and clamped at 0 (TRL's form)."""
    ratio = (policy_kl_logps.detach().double() - reference_kl_logps.detach().double())
    tot = _all_reduce_sum(torch.stack([ratio.sum(), torch.tensor(float(ratio.numel()), dtype=torch.float64,
                                                                   device=ratio.device)]), group)
    kl = tot[0] / tot[1] if float(tot[1]) > 0 else tot[0] * 0
    return kl.clamp(min=0).float()


def kto_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, labels, kl,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             reduction: Reduction = "mean"):
    """KTO (TRL's form). kl: from `kto_kl_estimate`. Returns (loss, rewards)."""
    _check_pair(policy_logps, reference_logps, "policy_logps and reference_logps")
    up = as_bool_labels(labels, policy_logps.device)
    logratio = _logratio(policy_logps, reference_logps)
    kl = torch.as_tensor(kl, dtype=logratio.dtype, device=logratio.device).detach()
    losses = torch.where(
        up,
        desirable_weight * (1 - torch.sigmoid(beta * (logratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratio))),
    )
    return _reduce(losses, reduction), (beta * logratio).detach()


class RewardShift:
    """The running reward shift delta.

    mode="balanced" (default): delta = (mean_up + mean_down) / 2, the minimiser of the BCO
    bound on DPO whatever the label ratio. mode="pooled": the mean of all rewards (TRL's
    behaviour; equals the former only with balanced labels). decay=None keeps cumulative
    means; decay in (0, 1) keeps exponential moving averages for drifting data.

    Protocol: `update(rewards, labels)` after each micro-batch's forward; `step()` once per
    optimizer step (`discard()` instead on a skipped one), on every rank (it all-reduces sums
    and counts, so a rank with no row of a label is fine and the value is the same for any
    number of ranks). `value` changes only in `step()`, so every micro-batch of an
    accumulation window sees the same delta. Never update in evaluation.
    """

    LABELS = ("desirable", "undesirable", "pooled")

    def __init__(self, mode: Literal["balanced", "pooled"] = "balanced", decay: float | None = None,
                 group=None):
        if mode not in ("balanced", "pooled"):
            raise ValueError(f"mode must be 'balanced' or 'pooled', got {mode!r}")
        if decay is not None and not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1) or None, got {decay}")
        self.mode, self.decay, self.group = mode, decay, group
        self.steps = 0
        self.means = {k: 0.0 for k in self.LABELS}
        self.counts = {k: 0 for k in self.LABELS}
        # Pending local sums/counts since the last step: [sum_up, n_up, sum_down, n_down].
        self._pending = torch.zeros(4, dtype=torch.float64)

    def update(self, rewards: torch.Tensor, labels) -> None:
        r = rewards.detach().to("cpu", torch.float64).reshape(-1)
        up = as_bool_labels(labels, "cpu").reshape(-1)
        if up.shape != r.shape:
            raise ValueError(f"labels {tuple(up.shape)} do not match rewards {tuple(r.shape)}")
        if not bool(torch.isfinite(r).all()):
            raise ValueError("non-finite reward passed to RewardShift.update")
        self._pending += torch.stack([r[up].sum(), up.sum().double(), r[~up].sum(), (~up).sum().double()])

    def discard(self) -> None:
        """Drop this step's pending rewards (a skipped step); local, no collective."""
        self._pending.zero_()

    def _merge(self, key: str, batch_sum: float, batch_n: float) -> None:
        if batch_n <= 0:
            return
        batch_mean = batch_sum / batch_n
        if self.counts[key] == 0:
            self.means[key] = batch_mean
        elif self.decay is None:  # Chan's merge of two means: stable for long runs.
            self.means[key] += (batch_mean - self.means[key]) * batch_n / (self.counts[key] + batch_n)
        else:
            self.means[key] = self.decay * self.means[key] + (1 - self.decay) * batch_mean
        self.counts[key] += int(round(batch_n))

    def step(self) -> float:
        """Commit this optimizer step's rewards (all ranks together); returns the new delta."""
        s_up, n_up, s_dn, n_dn = _all_reduce_sum(self._pending, self.group).tolist()
        self._pending.zero_()
        self._merge("desirable", s_up, n_up)
        self._merge("undesirable", s_dn, n_dn)
        self._merge("pooled", s_up + s_dn, n_up + n_dn)
        self.steps += 1
        return self.value

    @property
    def value(self) -> float:
        if self.mode == "pooled":
            return self.means["pooled"]
        seen = [self.means[k] for k in ("desirable", "undesirable") if self.counts[k] > 0]
        # Until both labels have been seen the class-balanced mean is undefined; the mean
        # of what has been seen is the best estimate (it equals the pooled mean then).
        return sum(seen) / len(seen) if seen else 0.0

    def state_dict(self) -> dict:
        """JSON-serialisable state (plain floats/ints), checkpointed with the model."""
        return {"version": 1, "mode": self.mode, "decay": self.decay, "steps": self.steps,
                "means": dict(self.means), "counts": dict(self.counts),
                "pending": self._pending.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unknown RewardShift state version {state.get('version')!r}")
        if state["mode"] != self.mode or state["decay"] != self.decay:
            raise ValueError(f"checkpoint has mode={state['mode']!r} decay={state['decay']!r}, this run "
                             f"mode={self.mode!r} decay={self.decay!r}: resuming would change delta")
        for k in self.LABELS:
            m = float(state["means"][k])
            if not math.isfinite(m):
                raise ValueError(f"non-finite mean for {k} in RewardShift state")
            self.means[k], self.counts[k] = m, int(state["counts"][k])
        self.steps = int(state["steps"])
        self._pending = torch.tensor(state["pending"], dtype=torch.float64)

    def __repr__(self) -> str:
        return (f"RewardShift(mode={self.mode!r}, decay={self.decay}, value={self.value:.6g}, "
                f"steps={self.steps}, counts={self.counts})")
