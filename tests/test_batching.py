"""The data order as index arithmetic: a permutation per epoch, world-size invariant, any step
computable without the ones before it, and each rank reading its own rows only."""

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from hypothesis import given, settings
from hypothesis import strategies as st

from bco_ray.train import shards
from bco_ray.train.batching import (
    EpochOrder,
    chunk_units,
    eval_span,
    interleave_order,
    rank_micro_batches,
    rank_span,
    steps_per_epoch,
)


def make_rows(n):
    return [{"row_id": f"r{i}", "label": i % 3 != 0, "input_ids": list(range(1 + (i * 7) % 13)), "pair_id": None}
            for i in range(n)]


def batch_units(order: EpochOrder, step: int, g: int, rank: int, world: int) -> list[int]:
    a, b = rank_span(step, g, rank, world)
    return [u for u0, u1 in order.unit_ranges(a, b) for u in range(u0, u1)]


@given(st.integers(0, 300), st.sampled_from([2, 4, 6, 8, 12, 16]), st.integers(1, 8), st.integers(1, 40),
       st.integers(0, 3), st.integers(0, 2))
@settings(max_examples=80, deadline=None)
def test_an_epoch_is_a_permutation_of_its_whole_chunks(units, g, knob, window, seed, epoch):
    c = chunk_units(g, knob)
    assert g % c == 0
    order = EpochOrder(units, c, window, seed, epoch)
    seen = [u for u0, u1 in order.unit_ranges(0, (units // c) * c) for u in range(u0, u1)]
    assert sorted(seen) == list(range((units // c) * c))
    assert steps_per_epoch(units, c, g) == units // g  # chunks divide the batch: no batch lost to them


def test_global_batches_do_not_depend_on_the_world_size_and_any_step_is_computed_directly():
    units, g, window = 203, 24, 40
    c = chunk_units(g, 4)
    spe = steps_per_epoch(units, c, g)
    for epoch in (0, 1):
        order = EpochOrder(units, c, window, seed=7, epoch=epoch)
        one = [batch_units(order, k, g, 0, 1) for k in range(spe)]
        for world in (2, 3, 4, 6):
            parts = [[batch_units(order, k, g, r, world) for r in range(world)] for k in range(spe)]
            assert all(len(p) == g // world for step in parts for p in step)  # micro x accum units each
            assert [sorted(u for p in step for u in p) for step in parts] == [sorted(b) for b in one]
        # Resume: a fresh order asked for step 5 first gives what the run going through 0..4 did.
        assert batch_units(EpochOrder(units, c, window, 7, epoch), 5, g, 0, 1) == one[5]
    a, b = (EpochOrder(units, c, window, 7, e) for e in (0, 1))
    assert [batch_units(a, k, g, 0, 1) for k in range(spe)] != [batch_units(b, k, g, 0, 1) for k in range(spe)]
    assert [batch_units(a, k, g, 0, 1) for k in range(spe)] == \
        [batch_units(EpochOrder(units, c, window, 7, 0), k, g, 0, 1) for k in range(spe)]  # seeded


def test_each_rank_reads_its_own_rows_and_no_others(tmp_path):
    """2 ranks, micro 2 x accum 2: each reads 4 rows a step, whole chunks of the file. With a
    chunk that does not divide a rank's share, the boundary chunks are the only extra rows."""
    units, world, micro, accum = 200, 2, 2, 2
    g = micro * accum * world
    for knob, extra_ok in ((4, 0), (8, 4)):
        c = chunk_units(g, knob)
        table = pa.table({"row_id": [f"r{i}" for i in range(units)]})
        root = str(tmp_path / f"c{knob}")
        index = shards.write_table(table, pafs.LocalFileSystem(), root, c, {})
        order = EpochOrder(units, c, 32, seed=0, epoch=0)
        got = []
        for rank in range(world):
            reader = shards.SplitReader(pafs.LocalFileSystem(), root, index)
            rows = []
            for k in range(10):
                a, b = rank_span(k, g, rank, world)
                rows += [r["row_id"] for u0, u1 in order.unit_ranges(a, b) for r in reader.rows(u0, u1)]
            assert len(rows) == 10 * micro * accum
            assert 10 * micro * accum <= reader.rows_read <= 10 * (micro * accum + extra_ok)
            got.append(rows)
        assert not set(got[0]) & set(got[1])  # the two ranks' rows: disjoint


def test_the_split_files_hold_the_rows_in_order_across_files_and_blocks(tmp_path):
    fs = pafs.LocalFileSystem()
    n = 40_000  # three files of 16,384 rows
    table = pa.table({"x": np.arange(n)})
    index = shards.write_table(table, fs, str(tmp_path / "a"), 4, {"k": 1})
    assert index["files"] == 3 and index["rows"] == n and index == shards.read_index(fs, str(tmp_path / "a"))
    reader = shards.SplitReader(fs, str(tmp_path / "a"), index)
    assert [r["x"] for r in reader.rows(16_380, 16_390)] == list(range(16_380, 16_390))
    assert reader.rows_read == 12  # the three chunks it crossed, in two files
    # Ordered blocks of any sizes go into the same files (the distributed path).
    blocks = [table.slice(0, 5000), table.slice(5000, 0), table.slice(5000, 30_000), table.slice(35_000, 5000)]
    parts = shards.plan_parts([b.num_rows for b in blocks], 16_384)
    assert [sum(n for _, _, n in p) for p in parts] == [16_384, 16_384, n - 2 * 16_384]
    root = str(tmp_path / "b")
    fs.create_dir(root)
    for i, part in enumerate(parts):
        shards.write_part([blocks[b].slice(o, k) for b, o, k in part], fs, f"{root}/{shards.part_name(i)}", 4)
    index_b = shards.write_index(fs, root, n, 4, 16_384, {"k": 1})
    assert shards.SplitReader(fs, root, index_b).table(0, n).column("x").to_pylist() == list(range(n))


@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 30))
@settings(max_examples=40, deadline=None)
def test_a_ranks_units_become_exactly_accum_micro_batches_longest_first(world, accum, n):
    mine = [[r] for r in make_rows(n)]
    parts = rank_micro_batches(mine, accum)
    assert len(parts) == accum
    assert sorted(r["row_id"] for mb in parts for r in mb) == sorted(r["row_id"] for u in mine for r in u)
    lengths = [len(r["input_ids"]) for mb in parts for r in mb]
    assert lengths == sorted(lengths, reverse=True)


def test_eval_shares_cover_the_capped_eval_split_once():
    for units, world in itertools.product((0, 1, 7, 64, 65), (1, 2, 3, 8)):
        spans = [eval_span(units, r, world) for r in range(world)]
        assert [u for a, b in spans for u in range(a, b)] == list(range(units))


def test_interleave_alternates_equal_labels_and_spreads_a_skewed_log_evenly():
    labels = np.array([True, True, True, False, True, False, False, False])
    assert labels[interleave_order(labels)].tolist() == [True, False] * 4
    rng = np.random.default_rng(0)
    skewed = rng.random(5000) < 0.9
    perm = interleave_order(skewed)
    assert sorted(perm.tolist()) == list(range(5000))
    ups = np.flatnonzero(skewed)
    assert (perm[skewed[perm]] == ups).all()  # each label keeps its own order
    share = skewed.mean()
    for a in range(0, 5000 - 40, 40):  # every 40 rows (a global batch) has the split's ratio, +-1 row
        assert abs(skewed[perm[a:a + 40]].sum() - 40 * share) <= 1.01
