"""The training data path at scale: writing the global order, and what each rank reads.

    python bench/train_data.py                          # 2e5 rows of 256 tokens, both write paths
    python bench/train_data.py --rows 1e6 --no-driver   # Ray Data's sort only (the driver path holds the split)

A synthetic scored split (random token ids, lengths 64..tokens, 95 % train) is written as
parquet, then:
- write: `stage.write_order` by the driver (pyarrow sort) and by Ray Data (distributed sort,
  one task per file) on a local 2-CPU Ray cluster: seconds, rows/s, and that both give the
  same order;
- read: for W = 1, 8, 32 workers at a global batch of 256 units, rank 0 and rank W-1 each read
  `--steps` steps through `RankData` (the workers' reader): rows read per step (G/W, where
  every worker streamed all G before), ms per step;
- resume: a fresh reader starts at the last step of the epoch: rows read and ms before its first
  batch, against the rows a replay of the epoch up to there would have read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

GLOBAL_UNITS = 256


def write_scored(root: str, rows: int, tokens: int, seed: int = 0, per_file: int = 50_000) -> None:
    rng = np.random.default_rng(seed)
    os.makedirs(root)
    for f, a in enumerate(range(0, rows, per_file)):
        n = min(per_file, rows - a)
        lens = rng.integers(64, tokens + 1, n)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        ids = pa.ListArray.from_arrays(offsets, rng.integers(0, 49152, offsets[-1], dtype=np.int32))
        mask = pa.ListArray.from_arrays(offsets, (rng.random(offsets[-1]) < 0.6).astype(np.int8))
        pq.write_table(pa.table({
            "row_id": [f"r{a + i}" for i in range(n)],
            "label": rng.random(n) < 0.3,
            "pair_id": pa.nulls(n, pa.string()),
            "input_ids": ids, "completion_mask": mask,
            "ref_logps": -rng.random(n) * 50, "weight": np.ones(n, np.float32),
            "split": np.where(rng.random(n) < 0.95, "train", "eval"),
        }), os.path.join(root, f"part-{f:04d}.parquet"))


def write(args, data: str, out: str, driver: bool, rows: int) -> tuple[dict, float]:
    from bco_ray.config import load_config
    from bco_ray.train.batching import chunk_units
    from bco_ray.train.stage import TRAIN_COLUMNS, write_order

    fs = pafs.LocalFileSystem()
    cfg = load_config(None, ["--train.driver_sort_rows", str(10**9 if driver else 0),
                             "--train.interleave_labels", str(args.interleave).lower()])
    t0 = time.time()
    index = write_order(data, fs, "train", TRAIN_COLUMNS, rows, cfg, fs, out,
                        chunk_units(GLOBAL_UNITS, cfg.train.shuffle_chunk), {"bench": 1}, None)
    return index, time.time() - t0


def read(out: str, index: dict, world: int, rank: int, steps: int, start: int = 0) -> dict:
    from bco_ray.train import shards
    from bco_ray.train.batching import steps_per_epoch
    from bco_ray.train.rank_data import RankData

    fs = pafs.LocalFileSystem()
    spe = steps_per_epoch(index["rows"], index["chunk_units"], GLOBAL_UNITS)
    data = RankData({"train": shards.SplitReader(fs, out, index)}, 1, index["rows"], index["chunk_units"], 1024, 0,
                    GLOBAL_UNITS, rank, world, spe)
    start = min(start, spe - steps)
    t0 = time.time()
    first = None
    for s in range(start, start + steps):
        got = data.step_units(s, s + 1 if s + 1 < start + steps else None)
        assert len(got) == GLOBAL_UNITS // world
        first = first if first is not None else time.time() - t0
    seconds = time.time() - t0
    data.close()
    return {"world": world, "rank": rank, "start": start, "steps": steps, "steps_per_epoch": spe,
            "rows_read_per_step": data.rows_read()["train"] / steps,
            "ms_per_step": round(1000 * seconds / steps, 2), "ms_first_batch": round(1000 * first, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=float, default=2e5)
    p.add_argument("--tokens", type=int, default=256, help="longest row (lengths uniform from 64)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-driver", action="store_true", help="skip the driver (in-memory) write path")
    p.add_argument("--interleave", action="store_true", help="train.interleave_labels on")
    args = p.parse_args()
    rows = int(args.rows)
    tmp = tempfile.mkdtemp(prefix="bcb-td-")
    try:
        from bco_ray.config import RayConfig
        from bco_ray.raycluster import init_ray

        t0 = time.time()
        data = os.path.join(tmp, "scored")
        write_scored(data, rows, args.tokens)
        size = sum(os.path.getsize(os.path.join(data, f)) for f in os.listdir(data))
        print(f"# {rows:,} scored rows ({size / 2**20:.0f} MiB parquet) in {time.time() - t0:.0f}s", flush=True)
        train_rows = sum(pq.read_table(os.path.join(data, f), columns=["split"]).column("split")
                         .to_pylist().count("train") for f in os.listdir(data))
        init_ray(RayConfig(num_cpus=2, temp_dir=f"/tmp/bcb-{os.getpid()}"))
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = False
        results, orders = [], {}
        for driver in ([False] if args.no_driver else [True, False]):
            out = os.path.join(tmp, "driver" if driver else "ray")
            index, sec = write(args, data, out, driver, train_rows)
            orders[driver] = out
            r = {"write": "driver (pyarrow)" if driver else "Ray Data sort", "rows": index["rows"],
                 "files": index["files"], "seconds": round(sec, 1), "rows_per_s": round(index["rows"] / sec)}
            print(json.dumps(r), flush=True)
            results.append(r)
        ray.shutdown()
        out = orders[False]
        if len(orders) == 2:
            from bco_ray.train import shards

            a = shards.SplitReader(pafs.LocalFileSystem(), orders[True], index).table(0, index["rows"])
            b = shards.SplitReader(pafs.LocalFileSystem(), orders[False], index).table(0, index["rows"])
            same = a.column("row_id").equals(b.column("row_id"))
            print(f"# the two paths wrote the same order: {same}", flush=True)
        reads = []
        for world in (1, 8, 32):
            for rank in sorted({0, world - 1}):
                r = read(out, index, world, rank, args.steps)
                r["before_rows_per_step"] = index["rows"] / r["steps_per_epoch"]  # every worker streamed the split
                print(json.dumps(r), flush=True)
                reads.append(r)
        resume = read(out, index, 8, 3, 1, start=10**12)
        replay = resume["start"] * GLOBAL_UNITS
        print(json.dumps({"resume_at_step": resume["start"], "rows_read": resume["rows_read_per_step"],
                          "ms_first_batch": resume["ms_first_batch"], "replay_rows_before": replay}), flush=True)
        print("\n| write path | rows | files | seconds | rows/s |\n|---|---|---|---|---|")
        for r in results:
            print(f"| {r['write']} | {r['rows']:,} | {r['files']} | {r['seconds']} | {r['rows_per_s']:,} |")
        print(f"\n| workers | rank | rows read a step | before (whole stream a step) | ms a step |"
              f"  (G = {GLOBAL_UNITS}, {args.steps} steps)\n|---|---|---|---|---|")
        for r in reads:
            print(f"| {r['world']} | {r['rank']} | {r['rows_read_per_step']:.0f} | {r['before_rows_per_step']:.0f} | "
                  f"{r['ms_per_step']} |")
        print(f"\nresume at step {resume['start']:,} (8 workers, rank 3): {resume['rows_read_per_step']:.0f} rows read, "
              f"first batch in {resume['ms_first_batch']} ms; a replay would have read {replay:,} rows first")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
