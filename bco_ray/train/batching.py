"""The order units reach the optimizer in, as index arithmetic: deterministic, the same for
any number of workers, computable at any step (resume starts there, nothing is replayed),
and such that each rank reads only its own rows.

    split on disk, in the global order (a seeded hash sort; `bco_ray.train.shards`)
      = units (a row; DPO: a chosen/rejected pair, chosen first)
      = chunks of c consecutive units (c divides the global batch G)
    epoch e: the full windows of `shuffle_buffer` units are permuted, and the chunks inside
             each window (seeded by run seed, epoch, window); the last, partial window stays last
    global batch k of epoch e = positions [kG, (k+1)G) of that chunk sequence
    rank r of W takes positions [kG + rG/W, kG + (r+1)G/W): G/W = micro x accum units, whole
             chunks when c divides G/W, so it reads its rows and no others

Global batch k holds the same units whatever the world size, and its position in the file is
known without reading anything before it. A rank sorts its units by length and cuts them into
`accum` micro-batches (rows of similar length share one, so padding stays small).
"""

from __future__ import annotations

import math

import numpy as np


def chunk_units(global_units: int, knob: int) -> int:
    """Units that always travel together: a divisor of the global batch, so batches are whole
    chunks. It depends only on the global batch, which a resumed run keeps."""
    return math.gcd(global_units, max(1, knob))


def steps_per_epoch(units: int, chunk: int, global_units: int) -> int:
    """Whole global batches in an epoch; the last partial chunk and batch are left out (the
    schedule, the reward-shift windows and the resume position count whole batches). Equal to
    units // global_units because chunk divides global_units."""
    return (units // chunk) * chunk // global_units


class EpochOrder:
    """The chunk at each position of one epoch: O(window) memory and O(1) per lookup."""

    def __init__(self, units: int, chunk: int, window_units: int, seed: int, epoch: int):
        self.chunk, self.seed, self.epoch = chunk, seed, epoch
        self.chunks = units // chunk
        self.window = max(1, window_units // chunk)  # chunks per window
        full = self.chunks // self.window
        self.windows = np.random.default_rng([seed, epoch]).permutation(full) if full else np.zeros(0, np.int64)
        self._perms: dict[int, np.ndarray] = {}  # the windows being read (one or two at a time)

    def _perm(self, w: int) -> np.ndarray:
        if w not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(next(iter(self._perms)))
            size = min(self.window, self.chunks - w * self.window)
            self._perms[w] = np.random.default_rng([self.seed, self.epoch, w]).permutation(size)
        return self._perms[w]

    def chunk_at(self, slot: int) -> int:
        ws, i = divmod(slot, self.window)
        w = int(self.windows[ws]) if ws < len(self.windows) else ws  # the partial window: last, in place
        return w * self.window + int(self._perm(w)[i])

    def unit_ranges(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Epoch positions [start, stop) as ranges of unit indices in the file, in order
        (consecutive units of one chunk merged)."""
        out: list[tuple[int, int]] = []
        p = start
        while p < stop:
            slot, off = divmod(p, self.chunk)
            n = min(self.chunk - off, stop - p)
            u = self.chunk_at(slot) * self.chunk + off
            if out and out[-1][1] == u:
                out[-1] = (out[-1][0], u + n)
            else:
                out.append((u, u + n))
            p += n
        return out


def rank_span(step_in_epoch: int, global_units: int, rank: int, world: int) -> tuple[int, int]:
    """Epoch positions of this rank's share of a global batch."""
    per = global_units // world
    start = step_in_epoch * global_units + rank * per
    return start, start + per


def eval_span(units: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous share of the first `units` eval units."""
    per = math.ceil(units / world)
    return min(units, rank * per), min(units, (rank + 1) * per)


def rank_micro_batches(mine: list[list[dict]], accum: int) -> list[list[dict]]:
    """This rank's units as exactly `accum` lists of rows, longest units first (some lists may
    be empty: `train_step` copes)."""
    mine = sorted(mine, key=lambda u: -sum(len(r["input_ids"]) for r in u))
    out: list[list[dict]] = []
    start = 0
    for i in range(accum):
        n = len(mine) // accum + (1 if i < len(mine) % accum else 0)
        out.append([r for u in mine[start:start + n] for r in u])
        start += n
    return out


def interleave_order(labels: np.ndarray) -> np.ndarray:
    """The permutation that spreads each label evenly over the rows, keeping each label's own
    order: the i-th of n rows of a label goes to (i + 0.5) / n. Equal counts alternate
    (thumbs-up first); a skewed log gives every stretch of rows the split's label ratio, so
    every global batch (whole chunks of this order) holds both labels in that ratio."""
    labels = np.asarray(labels, dtype=bool)
    key = np.empty(len(labels), dtype=np.float64)
    for lab in (True, False):
        idx = np.flatnonzero(labels == lab)
        key[idx] = (np.arange(len(idx)) + 0.5) / max(1, len(idx))
    return np.lexsort((~labels, key))  # ties: thumbs-up first
