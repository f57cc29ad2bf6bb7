"""The order rows reach the optimizer in: deterministic, so resume is exact and any number
of workers sees the same global batches as one process.

    rows (global shuffled order) -> units -> seeded shuffle buffer (per epoch)
         -> [interleave labels] -> global batches of G units -> this rank's micro-batches

A unit is a row (BCO, KTO) or a chosen/rejected pair (DPO: both halves must meet in one
micro-batch). Global batch k holds the same units whatever the world size; rank r takes
units r, r + W, r + 2W, ..., sorts them by length and cuts them into `accum` micro-batches
(length bucketing: rows of similar length share a micro-batch, so padding stays small).
Every rank gets exactly `accum` micro-batches (some may be empty: `train_step` copes).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Iterator


def units(rows: Iterable[dict], loss: str, dropped: list | None = None) -> Iterator[list[dict]]:
    """Rows -> units. DPO: consecutive rows sharing a pair_id with both labels form a pair
    (chosen first); anything else is dropped (appended to `dropped` when given)."""
    if loss != "dpo":
        for r in rows:
            yield [r]
        return
    pending: list[dict] = []
    for r in rows:
        if pending and r["pair_id"] is not None and r["pair_id"] == pending[0]["pair_id"]:
            pending.append(r)
            continue
        yield from _pair(pending, dropped)
        pending = [r]
    yield from _pair(pending, dropped)


def _pair(rows: list[dict], dropped: list | None) -> Iterator[list[dict]]:
    ups = [r for r in rows if r["label"]]
    downs = [r for r in rows if not r["label"]]
    if rows and rows[0]["pair_id"] is not None and len(ups) == 1 and len(downs) == 1:
        yield [ups[0], downs[0]]
    elif rows and dropped is not None:
        dropped.extend(rows)


def shuffle_buffer(items: Iterable, size: int, seed: int) -> Iterator:
    """A seeded buffer shuffle: same seed and input order, same output order."""
    if size <= 1:
        yield from items
        return
    rng = random.Random(seed)
    buf: list = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = x
    rng.shuffle(buf)
    yield from buf


def interleave_labels(items: Iterable[list[dict]], limit: int | None = None) -> Iterator[list[dict]]:
    """Alternate thumbs-up and thumbs-down units while both remain; then the rest in order.

    The units of the label in surplus wait for the other label's; more than `limit` waiting
    go out in order without a partner, so a skewed log (90 % thumbs-up) never holds the
    rest of the epoch in memory."""
    queues: dict[bool, deque] = {True: deque(), False: deque()}
    want = True
    for u in items:
        queues[bool(u[0]["label"])].append(u)
        while queues[want]:
            yield queues[want].popleft()
            want = not want
        while limit is not None and len(queues[not want]) > limit:  # queues[want] is empty here
            yield queues[not want].popleft()
    yield from queues[want]
    yield from queues[not want]


def global_batches(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items; a last partial batch is dropped (the schedule,
    the reward-shift windows and the resume position all count whole batches)."""
    batch: list = []
    for x in items:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []


def rank_micro_batches(batch: list[list[dict]], rank: int, world: int, accum: int) -> list[list[dict]]:
    """This rank's share of a global batch as exactly `accum` lists of rows."""
    mine = sorted(batch[rank::world], key=lambda u: -sum(len(r["input_ids"]) for r in u))
    out: list[list[dict]] = []
    start = 0
    for i in range(accum):
        n = len(mine) // accum + (1 if i < len(mine) % accum else 0)
        out.append([r for u in mine[start:start + n] for r in u])
        start += n
    return out


def epoch_batches(rows_of_epoch, epoch: int, seed: int, loss: str, global_units: int,
                  buffer: int, interleave: bool, dropped: list | None = None) -> Iterator[list[list[dict]]]:
    """Global batches of one epoch. `rows_of_epoch` yields the rows in the dataset's fixed
    (globally shuffled) order; the buffer shuffle re-mixes them differently every epoch."""
    stream = shuffle_buffer(units(rows_of_epoch, loss, dropped), buffer, seed * 100_003 + epoch)
    if interleave and loss != "dpo":
        stream = interleave_labels(stream, max(buffer, 1))
    return global_batches(stream, global_units)
