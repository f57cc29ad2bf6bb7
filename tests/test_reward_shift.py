"""RewardShift: hand-computed values, accumulation windows, checkpoints, 2 gloo ranks."""

import json
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from distributed import gloo_group

from bco_ray.train.objectives import RewardShift, kto_kl_estimate

R1, L1 = torch.tensor([1.0, 2.0, -1.0]), [True, True, False]
R2, L2 = torch.tensor([4.0, -3.0]), [True, False]


def test_balanced_and_pooled_hand_computed():
    bal, pool = RewardShift("balanced"), RewardShift("pooled")
    for rs in (bal, pool):
        rs.update(R1, L1)
        rs.step()
    assert bal.value == pytest.approx((1.5 + -1.0) / 2)  # 0.25
    assert pool.value == pytest.approx(2.0 / 3)
    for rs in (bal, pool):
        rs.update(R2, L2)
        rs.step()
    # up: 1, 2, 4 -> 7/3 ; down: -1, -3 -> -2 ; all: 3/5
    assert bal.value == pytest.approx((7 / 3 - 2) / 2)
    assert pool.value == pytest.approx(3 / 5)
    assert bal.counts == {"desirable": 3, "undesirable": 2, "pooled": 5}


def test_balanced_differs_from_pooled_under_label_imbalance():
    rs_b, rs_p = RewardShift("balanced"), RewardShift("pooled")
    r = torch.tensor([1.0] * 9 + [-1.0])
    lab = [True] * 9 + [False]
    for rs in (rs_b, rs_p):
        rs.update(r, lab)
        rs.step()
    assert rs_b.value == pytest.approx(0.0)   # delta* = (1 + -1) / 2
    assert rs_p.value == pytest.approx(0.8)   # pulled toward the majority label


def test_delta_is_zero_before_data_and_uses_seen_label_only():
    rs = RewardShift()
    assert rs.value == 0.0
    rs.update(torch.tensor([0.4, 0.6]), [False, False])
    rs.step()
    assert rs.value == pytest.approx(0.5)


def test_value_constant_within_an_accumulation_window_and_equal_to_one_big_batch():
    acc, big = RewardShift(), RewardShift()
    acc.update(torch.tensor([0.2]), [True])
    acc.step()
    big.update(torch.tensor([0.2]), [True])
    big.step()
    before = acc.value
    rewards = torch.tensor([0.5, -0.3, 0.9, -0.7, 0.1, 0.0, -0.2, 0.4])
    labels = [True, False, True, False, True, True, False, False]
    for i in range(0, 8, 2):  # 4 micro-batches of one optimizer step
        acc.update(rewards[i:i + 2], labels[i:i + 2])
        assert acc.value == before
    acc.step()
    big.update(rewards, labels)
    big.step()
    assert acc.value == pytest.approx(big.value, abs=1e-15)


def test_ema_hand_computed():
    rs = RewardShift("balanced", decay=0.9)
    rs.update(torch.tensor([1.0, -1.0]), [True, False])
    rs.step()
    assert rs.value == pytest.approx(0.0)
    rs.update(torch.tensor([3.0, 1.0]), [True, False])
    rs.step()
    up, dn = 0.9 * 1 + 0.1 * 3, 0.9 * -1 + 0.1 * 1
    assert rs.value == pytest.approx((up + dn) / 2)


def test_state_dict_json_round_trip_continues_identically():
    a = RewardShift("balanced", decay=0.99)
    a.update(R1, L1)
    a.step()
    a.update(R2, L2)  # pending rewards are part of the state too
    state = json.loads(json.dumps(a.state_dict()))
    b = RewardShift("balanced", decay=0.99)
    b.load_state_dict(state)
    assert b.value == a.value and b.steps == a.steps
    for rs in (a, b):
        rs.step()
        rs.update(torch.tensor([0.3, -0.8]), [False, True])
        rs.step()
    assert a.value == b.value and a.state_dict() == b.state_dict()


def test_state_from_another_mode_is_refused():
    state = RewardShift("pooled").state_dict()
    with pytest.raises(ValueError, match="mode"):
        RewardShift("balanced").load_state_dict(state)


def test_bad_inputs():
    with pytest.raises(ValueError):
        RewardShift("mean")
    with pytest.raises(ValueError):
        RewardShift(decay=1.5)
    with pytest.raises(ValueError, match="non-finite"):
        RewardShift().update(torch.tensor([float("nan")]), [True])


# ----------------------------------------------------------------- two gloo processes

# Rank 0 sees only thumbs-down rows (a normal situation with small per-worker batches);
# rank 1 sees both labels, with different sizes per step.
SHARDS = {
    0: [(torch.tensor([-0.5, -0.1, -0.9]), [False, False, False]), (torch.tensor([-2.0]), [False])],
    1: [(torch.tensor([0.7, 0.2, -0.4, 1.1, 0.05]), [True, True, False, True, False]),
        (torch.tensor([0.6, -0.3]), [True, False])],
}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, world, init_file):
        results = {}
        for mode in ("balanced", "pooled"):
            rs = RewardShift(mode)
            values = []
            for rewards, labels in SHARDS[rank]:
                rs.update(rewards[:2], labels[:2])  # two micro-batches per step
                rs.update(rewards[2:], labels[2:])
                values.append(rs.step())
            results[mode] = values
        pol = torch.tensor([-1.0, -2.0]) if rank == 0 else torch.tensor([-3.0])
        results["kto_kl"] = kto_kl_estimate(pol, torch.full_like(pol, -2.5)).item()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)


@pytest.mark.dist
def test_two_gloo_ranks_equal_one_process_with_uneven_labels():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        ranks = [json.load(open(os.path.join(d, f"rank{r}.json"))) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank holds the same delta
    for mode in ("balanced", "pooled"):
        single = RewardShift(mode)
        expected = []
        for step in range(2):
            for rank in (0, 1):
                single.update(*SHARDS[rank][step])
            expected.append(single.step())
        assert ranks[0][mode] == pytest.approx(expected, abs=1e-12)
    assert ranks[0]["kto_kl"] == pytest.approx(((1.5 + 0.5 - 0.5) / 3), rel=1e-6)
