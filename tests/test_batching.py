"""The data order: deterministic, world-size invariant, DPO pairs kept whole."""

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from bco_ray.train.batching import (
    epoch_batches,
    interleave_labels,
    rank_micro_batches,
    shuffle_buffer,
    units,
)


def make_rows(n):
    out = []
    for i in range(n):
        out.append({"row_id": f"r{i}", "label": i % 3 != 0, "input_ids": list(range(1 + (i * 7) % 13)),
                    "pair_id": None})
    return out


def test_dpo_units_are_whole_pairs_chosen_first_and_orphans_are_dropped():
    rows = [{"row_id": "a", "pair_id": "p1", "label": False}, {"row_id": "b", "pair_id": "p1", "label": True},
            {"row_id": "c", "pair_id": None, "label": True},
            {"row_id": "d", "pair_id": "p2", "label": True},  # orphan half
            {"row_id": "e", "pair_id": "p3", "label": True}, {"row_id": "f", "pair_id": "p3", "label": False}]
    dropped = []
    got = [[r["row_id"] for r in u] for u in units(rows, "dpo", dropped)]
    assert got == [["b", "a"], ["e", "f"]]
    assert sorted(r["row_id"] for r in dropped) == ["c", "d"]
    assert [[r["row_id"] for r in u] for u in units(rows, "bco")] == [[r["row_id"]] for r in rows]


@given(st.integers(0, 60), st.integers(1, 9), st.integers(0, 5))
@settings(max_examples=40, deadline=None)
def test_shuffle_buffer_is_a_seeded_permutation(n, size, seed):
    a = list(shuffle_buffer(range(n), size, seed))
    assert sorted(a) == list(range(n))
    assert a == list(shuffle_buffer(range(n), size, seed))


def test_interleave_holds_at_most_limit_units_of_a_skewed_log():
    """90 % thumbs-up: without a bound the ups would queue up for the whole epoch; with one,
    at most `limit` wait, every unit comes out once, and the downs still alternate."""
    import random

    rng = random.Random(0)
    us = [[{"label": rng.random() < 0.9, "i": i}] for i in range(5000)]
    seen, waiting, peak = [], 0, 0

    def counted(items):
        nonlocal waiting, peak
        for u in items:
            waiting += 1
            peak = max(peak, waiting - len(seen))
            yield u

    for u in interleave_labels(counted(us), limit=32):
        seen.append(u[0]["i"])
    assert sorted(seen) == list(range(5000)) and peak <= 33
    small = [[{"label": x}] for x in (True, True, False, True, False, False, True)]
    assert list(interleave_labels(small, limit=32)) == list(interleave_labels(small))  # balanced: unchanged


def test_interleave_alternates_while_both_labels_last():
    us = [[{"label": lab}] for lab in [True, True, True, False, True, False, False]]
    assert [u[0]["label"] for u in interleave_labels(us)] == [True, False, True, False, True, False, True]


@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 30))
@settings(max_examples=40, deadline=None)
def test_ranks_split_a_global_batch_exactly_into_accum_micro_batches(world, accum, n):
    batch = [[r] for r in make_rows(n)]
    parts = [rank_micro_batches(batch, r, world, accum) for r in range(world)]
    assert all(len(p) == accum for p in parts)
    got = sorted(r["row_id"] for p in parts for mb in p for r in mb)
    assert got == sorted(r["row_id"] for u in batch for r in u)
    for p in parts:  # length-bucketed: longest rows first
        lengths = [len(r["input_ids"]) for mb in p for r in mb]
        assert lengths == sorted(lengths, reverse=True)


def test_global_batches_do_not_depend_on_the_world_size_and_replay_identically():
    rows = make_rows(50)
    a = list(epoch_batches(iter(rows), epoch=1, seed=3, loss="bco", global_units=8, buffer=16, interleave=True))
    b = list(epoch_batches(iter(rows), epoch=1, seed=3, loss="bco", global_units=8, buffer=16, interleave=True))
    c = list(epoch_batches(iter(rows), epoch=2, seed=3, loss="bco", global_units=8, buffer=16, interleave=True))
    assert a == b and a != c and len(a) == 50 // 8
    for gb in a[:4]:  # interleaved: both labels in every batch while both last (17 down rows)
        assert {u[0]["label"] for u in gb} == {True, False}
    ids = [r["row_id"] for gb in a for u in gb for r in u]
    assert len(ids) == len(set(ids)) == 48
    # Any world size sees the same rows per step.
    for world, accum in itertools.product((1, 2, 4), (1, 2)):
        per_step = [sorted(r["row_id"] for rank in range(world) for mb in rank_micro_batches(gb, rank, world, accum)
                           for r in mb) for gb in a]
        assert per_step == [sorted(r["row_id"] for u in gb for r in u) for gb in a]
