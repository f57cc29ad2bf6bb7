"""The training step: exact under gradient accumulation and under data parallelism."""

import json
import math
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from distributed import gloo_group

from bco_ray.assets import load_causal_lm
from bco_ray.config import ObjectiveConfig, TrainConfig
from bco_ray.train.loop import count_skips, optimizer
from bco_ray.train.objectives import RewardShift, bco_loss
from bco_ray.train.step import PolicyLogps, collate, train_step

LABELS = [False, False, False, True, False, True, True, False]


def examples(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, c = 3 + i % 3, 2 + (i * 5) % 4
        ids = torch.randint(10, 2000, (p + c,), generator=g).tolist()
        out.append({"input_ids": ids, "completion_mask": [0] * p + [1] * c, "label": LABELS[i % 8],
                    "ref_logps": -30.0 + i, "weight": 1.0 + 0.25 * i, "pair_id": i % (n // 2)})
    return out


def fresh_policy():
    torch.manual_seed(0)
    model, _ = load_causal_lm("tiny-llama")
    model.train()
    return PolicyLogps(model, chunk_size=7)


def run_step(splits, obj=None, steps=2):
    policy = fresh_policy()
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    shift = RewardShift()
    ex = examples()
    metrics = []
    for _ in range(steps):
        mbs = [collate(ex[a:b], pad_token_id=0) for a, b in splits]
        metrics.append(train_step(policy, opt, mbs, shift, obj or ObjectiveConfig(), max_grad_norm=None))
    return policy, shift, metrics


def params(policy):
    return torch.cat([p.detach().flatten() for p in policy.parameters()])


def test_accumulation_equals_one_big_batch():
    one, shift1, m1 = run_step([(0, 8)])
    acc, shift4, m4 = run_step([(0, 3), (3, 4), (4, 8), (8, 8)])  # uneven, one empty
    assert torch.allclose(params(one), params(acc), atol=1e-6, rtol=0)
    assert shift1.value == pytest.approx(shift4.value, rel=1e-6)  # fp32 padding noise only
    assert m1[1]["loss"] == pytest.approx(m4[1]["loss"], rel=1e-5)
    assert m1[1]["delta"] == pytest.approx(m4[1]["delta"], rel=1e-6) and m1[1]["delta"] != 0.0  # step 2 used step 1's delta


@pytest.mark.parametrize("fused", [True, False])
def test_packed_rows_give_the_padded_log_probs_and_gradients(fused):
    """Rows of different lengths back to back in one padding-free row (position ids
    restarting, attention kept inside each row) score as the padded batch does: log-probs
    within 1e-5 and the same gradients, through the fused head and the full-logits path."""
    from bco_ray.train.step import logps_of

    ex = examples()
    grads, out = [], []
    for packed in (False, True):
        policy = fresh_policy()
        policy.fused_head = fused
        mb = collate(ex, pad_token_id=0, packed=packed)
        assert (mb["input_ids"].shape[0] == 1) == packed
        lp = logps_of(policy, mb)
        lp.sum().backward()
        out.append(lp.detach())
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
    padded, packed = out
    assert padded.shape == packed.shape == (8,) and float(padded.abs().min()) > 1.0
    assert torch.allclose(packed, padded, atol=1e-5, rtol=0), (packed - padded).abs().max()
    assert torch.allclose(grads[1], grads[0], atol=1e-5, rtol=1e-4)
    # Packed tokens are exactly the real ones: no padding is computed.
    assert collate(ex, 0, packed=True)["input_ids"].numel() == sum(len(e["input_ids"]) for e in ex) \
        < collate(ex, 0)["input_ids"].numel()


def test_a_packed_step_equals_a_padded_step():
    policy, shift, padded = run_step([(0, 4), (4, 8)])
    torch.manual_seed(0)
    p2 = fresh_policy()
    opt = torch.optim.SGD(p2.parameters(), lr=1.0)
    s2 = RewardShift()
    ex = examples()
    for i in range(2):
        m = train_step(p2, opt, [collate(ex[a:b], 0, packed=True) for a, b in [(0, 4), (4, 8)]], s2, ObjectiveConfig(),
                       max_grad_norm=None)
        assert m["loss"] == pytest.approx(padded[i]["loss"], abs=1e-6) and m["delta"] == pytest.approx(padded[i]["delta"])
    assert torch.allclose(params(p2), params(policy), atol=1e-5)


def test_step_loss_matches_bco_loss_by_hand():
    policy = fresh_policy()
    batch = collate(examples(), pad_token_id=0)
    with torch.no_grad():
        logps = policy(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    expected, rewards = bco_loss(logps, batch["ref_logps"], batch["label"], 0.0, 0.1, batch["weight"])
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    shift = RewardShift()
    m = train_step(policy, opt, [batch], shift, ObjectiveConfig(), max_grad_norm=None)
    assert m["loss"] == pytest.approx(expected.item(), rel=1e-5)
    up = batch["label"]
    assert m["rewards/chosen"] == pytest.approx(rewards[up].mean().item(), rel=1e-5)
    assert shift.value == pytest.approx((rewards[up].mean() + rewards[~up].mean()).item() / 2, rel=1e-5)
    # objective.udm_weights false: the same data trains as if every weight were 1.
    assert not torch.all(batch["weight"] == 1)
    unweighted, _ = bco_loss(logps, batch["ref_logps"], batch["label"], 0.0, 0.1, None)
    m = train_step(policy, opt, [batch], RewardShift(), ObjectiveConfig(udm_weights=False), max_grad_norm=None)
    assert m["loss"] == pytest.approx(unweighted.item(), rel=1e-5) and unweighted.item() != pytest.approx(expected.item())


def test_delta_zero_mode_never_shifts():
    _, _, m = run_step([(0, 8)], ObjectiveConfig(delta_mode="zero"))
    assert [x["delta"] for x in m] == [0.0, 0.0]


def test_dpo_and_kto_steps_run_and_are_finite():
    pairs = examples()
    for i, e in enumerate(pairs):  # rows i and i + 4 are one pair: chosen, rejected
        e["label"], e["pair_id"] = i < 4, i % 4
    policy = fresh_policy()
    batch = collate(pairs[::-1], 0)
    with torch.no_grad():
        batch["ref_logps"] = policy(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    m = train_step(policy, torch.optim.SGD(policy.parameters(), lr=0.1), [batch],
                   RewardShift(), ObjectiveConfig(loss="dpo"))
    assert m["rows"] == 4 and torch.isfinite(torch.tensor(m["loss"]))
    assert m["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0: log 2
    policy = fresh_policy()
    batch = collate(examples(), pad_token_id=0)
    kl = collate(examples(seed=1), pad_token_id=0)  # stands in for mismatched pairs
    batch.update({"kl_input_ids": kl["input_ids"], "kl_attention_mask": kl["attention_mask"],
                  "kl_completion_mask": kl["completion_mask"], "kl_ref_logps": kl["ref_logps"]})
    m = train_step(policy, torch.optim.SGD(policy.parameters(), lr=0.1), [batch], RewardShift(),
                   ObjectiveConfig(loss="kto"))
    assert torch.isfinite(torch.tensor([m["loss"], m["grad_norm"]])).all()


def test_dpo_batch_missing_a_pair_member_is_an_error():
    policy = fresh_policy()
    batch = collate(examples()[:3], pad_token_id=0)
    with pytest.raises(ValueError, match="pair"):
        train_step(policy, torch.optim.SGD(policy.parameters(), lr=0.1), [batch], RewardShift(),
                   ObjectiveConfig(loss="dpo"))


# Rank 0 holds 3 rows, all thumbs-down; rank 1 holds 5 rows of both labels.
RANK_ROWS = {0: (0, 3), 1: (3, 8)}


def _ddp_rank(rank):
    """This rank's DDP policy, SGD (lr 1), reward shift and rows (RANK_ROWS)."""
    torch.set_num_threads(1)
    policy = torch.nn.parallel.DistributedDataParallel(fresh_policy())
    a, b = RANK_ROWS[rank]
    return policy, torch.optim.SGD(policy.parameters(), lr=1.0), RewardShift(), examples()[a:b]


def _ddp_worker(rank, world, init_file, out_dir):
    with gloo_group(rank, world, init_file):
        policy, opt, shift, ex = _ddp_rank(rank)
        ms = []
        for _ in range(2):
            mbs = [collate(ex[:2], 0), collate(ex[2:], 0)] if len(ex) > 2 else [collate(ex[:1], 0), collate(ex[1:], 0)]
            ms.append(train_step(policy, opt, mbs, shift, ObjectiveConfig(), max_grad_norm=None))
        torch.save({"params": params(policy.module)}, os.path.join(out_dir, f"p{rank}.pt"))
        with open(os.path.join(out_dir, f"m{rank}.json"), "w") as f:
            json.dump({"metrics": ms, "delta": shift.value}, f)


@pytest.mark.dist
def test_two_ddp_ranks_equal_one_process():
    single, shift, m_single = run_step([(0, 8)])
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_ddp_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        res = [json.load(open(os.path.join(d, f"m{r}.json"))) for r in range(2)]
        p0 = torch.load(os.path.join(d, "p0.pt"), weights_only=True)["params"]
        p1 = torch.load(os.path.join(d, "p1.pt"), weights_only=True)["params"]
    assert torch.equal(p0, p1)
    assert torch.allclose(p0, params(single), atol=1e-5, rtol=0)
    # Padding differs between the two layouts, so fp32 rewards differ in the last bits.
    assert res[0]["delta"] == res[1]["delta"] == pytest.approx(shift.value, rel=1e-6)
    for step in range(2):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "reward_accuracy", "rows"):
            assert res[0]["metrics"][step][key] == pytest.approx(m_single[step][key], rel=1e-4, abs=1e-7)


def _kto_worker(rank, world, init_file, out_dir):
    with gloo_group(rank, world, init_file):
        torch.set_num_threads(1)
        policy = torch.nn.parallel.DistributedDataParallel(fresh_policy())
        ex = examples()[:4] if rank == 1 else []  # rank 0's micro-batch is empty
        batch = collate(ex, 0)
        kl = collate(examples(seed=1)[:4] if rank == 1 else [], 0)
        batch.update({"kl_input_ids": kl["input_ids"], "kl_attention_mask": kl["attention_mask"],
                      "kl_completion_mask": kl["completion_mask"], "kl_ref_logps": kl["ref_logps"]})
        m = train_step(policy, torch.optim.SGD(policy.parameters(), lr=0.1), [batch], RewardShift(),
                       ObjectiveConfig(loss="kto"))
        with open(os.path.join(out_dir, f"k{rank}.json"), "w") as f:
            json.dump(m, f)


@pytest.mark.dist
def test_kto_with_an_empty_rank_does_not_hang():
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.start_processes(_kto_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=False,
                                 start_method="spawn")
        import time
        deadline = time.time() + 120
        while not ctx.join(timeout=5):
            assert time.time() < deadline, "KTO step hung with an empty rank"
        res = [json.load(open(os.path.join(d, f"k{r}.json"))) for r in range(2)]
    assert res[0]["rows"] == res[1]["rows"] == 4.0
    assert res[0]["loss"] == pytest.approx(res[1]["loss"])
    # Equal to one process holding the 4 rows: the empty rank added nothing, not even to z.
    policy = fresh_policy()
    batch, kl = collate(examples()[:4], 0), collate(examples(seed=1)[:4], 0)
    batch.update({"kl_input_ids": kl["input_ids"], "kl_attention_mask": kl["attention_mask"],
                  "kl_completion_mask": kl["completion_mask"], "kl_ref_logps": kl["ref_logps"]})
    single = train_step(policy, torch.optim.SGD(policy.parameters(), lr=0.1), [batch], RewardShift(),
                        ObjectiveConfig(loss="kto"))
    assert res[1]["loss"] == pytest.approx(single["loss"], rel=1e-5)


# ---------------------------------------------------------------------------- non-finite steps

def _adam_run(batches_per_step, hook_step=None):
    """The train stage's AdamW (fused on CPU) + a constant-lr scheduler over the given steps; at
    `hook_step` one gradient is inf."""
    policy = fresh_policy()
    opt = optimizer(policy, TrainConfig(lr=1e-3, weight_decay=0.01), torch.device("cpu"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    shift, ms = RewardShift(), []
    first = next(policy.parameters())
    for i, mbs in enumerate(batches_per_step):
        handle = first.register_hook(lambda g: g * float("inf")) if i == hook_step else None
        ms.append(train_step(policy, opt, mbs, shift, ObjectiveConfig(), max_grad_norm=1.0, scheduler=sched))
        if handle:
            handle.remove()
    return policy, opt, sched, shift, ms


def test_the_fused_cpu_optimizer_steps_as_torchs_reference_adamw():
    """The train stage fuses AdamW on CPUs (a tenth of a demo step faster): the same update as
    torch's per-tensor AdamW, to fp32 rounding, with the stage's betas and weight decay."""
    tc = TrainConfig(lr=1e-3, weight_decay=0.01)
    runs = []
    for fused in (True, False):
        policy = fresh_policy()
        opt = (optimizer(policy, tc, torch.device("cpu")) if fused else
               torch.optim.AdamW(policy.parameters(), lr=tc.lr, betas=tuple(tc.adam_betas),
                                 weight_decay=tc.weight_decay, foreach=False))
        assert opt.defaults["fused"] is (True if fused else None)
        before = params(policy).clone()
        ex = examples()
        for _ in range(3):
            train_step(policy, opt, [collate(ex, 0)], RewardShift(), ObjectiveConfig(), max_grad_norm=1.0)
        runs.append(params(policy) - before)
    moved, reference = runs
    assert reference.abs().max() > 1e-4  # three steps of lr 1e-3 moved the weights
    assert torch.allclose(moved, reference, atol=1e-6, rtol=1e-4)


def _nan_ref(mb, row=0):
    mb = dict(mb)
    mb["ref_logps"] = mb["ref_logps"].clone()
    mb["ref_logps"][row] = float("nan")
    return mb


def test_a_nonfinite_step_changes_nothing_but_the_schedule():
    ex = examples()
    good = [collate(ex[:4], 0), collate(ex[4:], 0)]
    bad_loss = [good[0], _nan_ref(good[1])]  # one row's reference log-prob is NaN: loss and reward NaN
    clean, opt_c, _, shift_c, m_c = _adam_run([good, good])
    for bad, hook in ((bad_loss, None), (good, 1)):  # a NaN loss; a finite loss with an inf gradient
        policy, opt, sched, shift, ms = _adam_run([good, bad, good], hook_step=hook)
        assert [m["skipped"] for m in ms] == [False, True, False]
        assert not math.isfinite(ms[1]["grad_norm"])
        # The skipped step left weights, Adam's moments and step count, and delta as they were:
        # good, bad, good trains exactly as good, good.
        assert torch.equal(params(policy), params(clean))
        assert shift.state_dict() == shift_c.state_dict() and ms[2]["delta"] == m_c[1]["delta"]
        assert opt.state_dict()["state"][0]["step"] == opt_c.state_dict()["state"][0]["step"] == 2
        assert sched.last_epoch == 3  # the schedule moved on: the lr stays tied to the step count
        assert all(math.isfinite(m["loss"]) for m in ms)  # the metrics hold the finite micro-batches only


def test_count_skips_aborts_after_the_limit_in_a_row():
    state: dict = {}
    assert count_skips(state, {"skipped": False, "step": 1}, 2) is None
    line = count_skips(state, {"skipped": True, "step": 2, "grad_norm": float("nan")}, 2)
    assert "step 2" in line and "1 in a row" in line
    assert count_skips(state, {"skipped": False, "step": 3}, 2) is None and state["nonfinite_in_row"] == 0
    count_skips(state, {"skipped": True, "step": 4, "grad_norm": float("inf")}, 2)
    with pytest.raises(FloatingPointError, match=r"2 steps in a row .*steps 4-5.*after step 3"):
        count_skips(state, {"skipped": True, "step": 5, "grad_norm": float("nan")}, 2)
    assert state["nonfinite_steps"] == 3


def _nan_worker(rank, world, init_file, out_dir):
    with gloo_group(rank, world, init_file):
        policy, opt, shift, ex = _ddp_rank(rank)
        mb = collate(ex, 0)
        ms = [train_step(policy, opt, [_nan_ref(mb) if rank == 1 else mb], shift, ObjectiveConfig(), max_grad_norm=None),
              train_step(policy, opt, [mb], shift, ObjectiveConfig(), max_grad_norm=None)]
        torch.save({"params": params(policy.module)}, os.path.join(out_dir, f"p{rank}.pt"))
        with open(os.path.join(out_dir, f"n{rank}.json"), "w") as f:
            json.dump({"skipped": [m["skipped"] for m in ms], "shift": shift.state_dict()}, f)


@pytest.mark.dist
def test_a_nan_on_one_rank_skips_the_step_on_every_rank():
    single, shift, _ = run_step([(0, 8)], steps=1)  # what the second (good) step alone must give
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_nan_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        res = [json.load(open(os.path.join(d, f"n{r}.json"))) for r in range(2)]
        p = [torch.load(os.path.join(d, f"p{r}.pt"), weights_only=True)["params"] for r in range(2)]
    assert res[0]["skipped"] == res[1]["skipped"] == [True, False]
    assert torch.equal(p[0], p[1]) and torch.allclose(p[0], params(single), atol=1e-5, rtol=0)
    assert res[0]["shift"]["means"] == res[1]["shift"]["means"]
    assert res[0]["shift"]["means"]["desirable"] == pytest.approx(shift.means["desirable"], rel=1e-6)
