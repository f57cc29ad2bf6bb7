"""What one rank trains and evaluates on: its rows of each global batch, read from the split
files (`bco_ray.train.shards`) where the index arithmetic (`bco_ray.train.batching`) puts
them, and nothing else. No Ray, no pyarrow at import: the readers are handed in.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

from bco_ray.train.batching import EpochOrder, eval_span, rank_span
from bco_ray.train.step import collate


def _units(rows: list[dict], unit_rows: int) -> list[list[dict]]:
    return [rows[i:i + unit_rows] for i in range(0, len(rows), unit_rows)]


class RankData:
    """This rank's rows, read from the split files (`reader` per split: `.rows(start, stop)`
    of the global order) where the index arithmetic puts them, the next step's read overlapped
    with this step's compute by one thread."""

    def __init__(self, readers: dict, unit_rows: int, units: int, chunk: int, window: int, seed: int,
                 global_units: int, rank: int, world: int, steps_per_epoch: int):
        self.readers, self.k, self.units, self.chunk, self.window = readers, unit_rows, units, chunk, window
        self.seed, self.g, self.rank, self.world, self.spe = seed, global_units, rank, world, steps_per_epoch
        self._order: EpochOrder | None = None
        self._pool = ThreadPoolExecutor(1)
        self._next: tuple[int, object] | None = None

    def _read(self, step: int) -> list[list[dict]]:
        epoch, j = divmod(step, self.spe)
        if self._order is None or self._order.epoch != epoch:
            self._order = EpochOrder(self.units, self.chunk, self.window, self.seed, epoch)
        a, b = rank_span(j, self.g, self.rank, self.world)
        rows = [r for u0, u1 in self._order.unit_ranges(a, b) for r in self.readers["train"].rows(u0 * self.k, u1 * self.k)]
        return _units(rows, self.k)

    def step_units(self, step: int, prefetch: int | None) -> list[list[dict]]:
        """The units of global batch `step` (counted from 0 over all epochs) this rank trains
        on; starts reading global batch `prefetch` behind it."""
        got = self._next[1].result() if self._next and self._next[0] == step else self._read(step)
        self._next = (prefetch, self._pool.submit(self._read, prefetch)) if prefetch is not None else None
        return got

    def eval_batches(self, eval_units: int, micro: int, pad: int, packed: bool) -> list[dict]:
        """This rank's share of the first eval_units eval units (train.eval_max_rows), as
        micro-batches; as many on every rank (FSDP gathers in lockstep)."""
        a, b = eval_span(eval_units, self.rank, self.world)
        mine = _units(self.readers["eval"].rows(a * self.k, b * self.k), self.k)
        n = max(1, math.ceil(math.ceil(eval_units / self.world) / micro))
        chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
        chunks += [[]] * (n - len(chunks))
        return [collate([r for u in c for r in u], pad, packed) for c in chunks]

    def rows_read(self) -> dict:
        return {split: r.rows_read for split, r in self.readers.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def check_prompts(reader, k: int, rows: int, read: int = 256) -> list[list[int]]:
    """The eval split's first k distinct prompts, as token ids (chat template applied), in its
    global order: the same on every rank, at every eval and after a resume. Reads `read` rows
    at a time from the start of the split, and stops there."""
    seen: set[tuple] = set()
    out: list[list[int]] = []
    for start in range(0, rows, read):
        for r in reader.rows(start, start + read):
            mask = r["completion_mask"]
            prompt = tuple(r["input_ids"][:mask.index(1) if 1 in mask else len(mask)])
            if prompt and prompt not in seen:
                seen.add(prompt)
                out.append(list(prompt))
                if len(out) == k:
                    return out
    return out
