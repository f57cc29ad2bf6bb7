"""`bco-ray train`: the scored dataset in, the aligned model (HF format) and a run card out.

The driver counts the data, writes each split once in one global shuffled order (a sort on
a seeded hash of the row id, or of the pair id so DPO pairs stay adjacent) as files of
fixed-size chunks (`bco_ray.train.shards`), and starts a `TorchTrainer` whose workers run
`bco_ray.train.loop.worker_loop`. Each worker computes where its share of every global batch
lies (`bco_ray.train.batching`) and reads those rows only: the order is identical for any
number of workers and on resume, which is what makes both exact, and resume starts at its step.
"""

from __future__ import annotations

import hashlib
import json
import math
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from bco_ray import console, exports, storage
from bco_ray.config import Config, ConfigError, redacted, to_dict
from bco_ray.errors import UserError
from bco_ray.train import shards
from bco_ray.train.batching import chunk_units, interleave_order

TRAIN_COLUMNS = ["row_id", "label", "input_ids", "completion_mask", "ref_logps", "weight", "pair_id"]
KL_COLUMNS = ["kl_input_ids", "kl_completion_mask", "kl_ref_logps"]


def _order_key(table: pa.Table, seed: int) -> pa.Array:
    pair_ids, labels = table.column("pair_id").to_pylist(), table.column("label").to_pylist()
    h = []
    for p, r, lab in zip(pair_ids, table.column("row_id").to_pylist(), labels, strict=True):
        x = int.from_bytes(hashlib.blake2b(f"{seed}:{p if p is not None else r}".encode(), digest_size=8).digest(),
                           "big") >> 1
        # A pair's two rows share the hash; its lowest bit puts the chosen row first, so that no
        # two rows tie (Ray Data's distributed sort, unlike the driver's, does not keep ties in
        # order). DPO's splits hold complete pairs only, so every row of theirs takes this path.
        h.append((x & ~1) | (0 if lab else 1) if p is not None else x)
    return pa.array(h, pa.int64())


def _split(table: pa.Table, split: str, columns: list[str], seed: int, pairs: set | None = None) -> pa.Table:
    """One split's rows with their order key; DPO (pairs given): complete pairs only."""
    keep = pc.equal(table.column("split"), split)
    if pairs is not None:
        keep = pc.and_(keep, pc.is_in(table.column("pair_id"), pa.array(sorted(pairs), pa.string())))
    table = table.filter(keep).select(columns)
    return table.append_column("_order", _order_key(table, seed))


def _interleave(table: pa.Table) -> pa.Table:
    return table.take(pa.array(interleave_order(table.column("label").to_numpy(zero_copy_only=False))))


def sort_boundaries(rows: int, rows_per_partition: int = 100_000, most: int = 1000) -> list[int]:
    """Range cuts of the (uniform, 63-bit) order key: one sort partition per ~100k rows.
    Without them Ray Data samples and shuffles into 200 partitions whatever the size (about
    3 s of each short train stage on 2 cores, for a few hundred rows)."""
    k = max(2, min(most, -(-rows // rows_per_partition)))
    return [(1 << 63) // k * i for i in range(1, k)]


def _num_rows(table: pa.Table) -> int:
    return table.num_rows


def _write_part(fs, path: str, chunk_rows: int, slices: list[tuple[int, int]], *blocks) -> int:
    return shards.write_part([b.slice(o, n) for b, (o, n) in zip(blocks, slices, strict=True)], fs, path, chunk_rows)


def write_order(data_dir: str, fs, split: str, columns: list[str], rows: int, cfg: Config, out_fs, out_dir: str,
                chunk_units: int, meta: dict, pairs: set | None) -> dict:
    """One split, in the global order, as the files each rank reads its rows from
    (`bco_ray.train.shards`): a sort on a seeded hash of the row id (DPO: of the pair id, the
    chosen row first), thumbs-up and thumbs-down spread evenly when train.interleave_labels.
    Written once per run and data (a rerun or a resume finds index.json and reuses it), here,
    while the cluster's CPUs are free.

    A split of up to train.driver_sort_rows rows is sorted in this process (pyarrow,
    milliseconds); a larger one by Ray Data's distributed sort (about 5 s of fixed cost on 2
    cores, so not for short runs), its ordered blocks written by one task per file. There the
    labels are interleaved per sort partition (~100k rows, each a uniform sample of the split)."""
    import ray

    meta = {**meta, "split": split, "chunk_units": chunk_units}
    index = shards.read_index(out_fs, out_dir)
    if index is not None and all(index.get(k) == v for k, v in meta.items()):
        return index
    if index is not None:  # another run's order under this train.name: replaced (check_resume allowed it)
        out_fs.delete_file(storage.join(out_dir, shards.INDEX))
    chunk_rows = chunk_units * (2 if pairs is not None else 1)
    interleave = cfg.train.interleave_labels and pairs is None
    if rows <= cfg.train.driver_sort_rows:
        table = pads.dataset(data_dir, filesystem=fs, format="parquet").to_table(
            columns=list(dict.fromkeys(columns + ["split", "label"])), filter=pc.field("split") == split)
        table = _split(table, split, columns, cfg.run.seed, pairs).sort_by("_order").drop_columns(["_order"])
        return shards.write_table(_interleave(table) if interleave else table, out_fs, out_dir, chunk_rows, meta)
    cpus = cfg.ingest.num_cpus_per_task
    ds = storage.read_parquet(data_dir, fs, cpus).map_batches(
        _split, fn_kwargs={"split": split, "columns": columns, "seed": cfg.run.seed, "pairs": pairs},
        batch_format="pyarrow", num_cpus=cpus)
    ds = ds.sort("_order", boundaries=sort_boundaries(rows)).drop_columns(["_order"])
    if interleave:
        ds = ds.map_batches(_interleave, batch_size=None, batch_format="pyarrow", num_cpus=cpus)
    refs = ds.materialize().to_arrow_refs()
    count = ray.remote(num_cpus=cpus)(_num_rows)
    block_rows = ray.get([count.remote(r) for r in refs])
    per = shards.rows_per_file(chunk_rows)
    out_fs.create_dir(out_dir, recursive=True)
    write = ray.remote(num_cpus=cpus)(_write_part)
    ray.get([write.remote(out_fs, storage.join(out_dir, shards.part_name(i)), chunk_rows,
                          [(o, n) for _, o, n in part], *[refs[b] for b, _, _ in part])
             for i, part in enumerate(shards.plan_parts(block_rows, per))])
    return shards.write_index(out_fs, out_dir, sum(block_rows), chunk_rows, per, meta)


def complete_pairs(meta: pa.Table, split: str) -> set:
    """DPO: the pair ids of the split with exactly one thumbs-up and one thumbs-down row."""
    t = meta.filter(pc.equal(meta.column("split"), split))
    pairs: dict = {}
    for pid, lab in zip(t.column("pair_id").to_pylist(), t.column("label").to_pylist(), strict=True):
        if pid is not None:
            pairs.setdefault(pid, []).append(bool(lab))
    return {p for p, v in pairs.items() if sorted(v) == [False, True]}


def count_units(meta: pa.Table, pairs: dict | None) -> dict:
    """Rows per split and label, and the units training will see (DPO, `pairs` given: each
    split's complete pairs)."""
    out = {}
    for split in ("train", "eval"):
        t = meta.filter(pc.equal(meta.column("split"), split))
        labels = t.column("label").to_numpy(zero_copy_only=False)
        n = {"rows": t.num_rows, "up": int(labels.sum()), "down": int((~labels).sum())}
        n["units"] = len(pairs[split]) if pairs is not None else t.num_rows
        out[split] = n
    return out


def plan(cfg: Config, counts: dict) -> dict:
    tc = cfg.train
    g = tc.micro_batch_size * tc.grad_accum * tc.num_workers
    spe = counts["train"]["units"] // g
    if spe == 0:
        raise ValueError(f"the train split has {counts['train']['units']} units (rows; DPO: pairs), fewer than one "
                         f"global batch of {g} (micro_batch_size x grad_accum x num_workers): lower one of them")
    total = tc.max_steps or max(1, math.ceil(tc.epochs * spe))
    return {"global_batch_units": g, "steps_per_epoch": spe, "total_steps": total,
            "eval_every": interval(tc.eval_every, total, "train.eval_every"),
            "checkpoint_every": interval(tc.checkpoint_every, total, "train.checkpoint_every")}


def interval(every: float, total: int, name: str) -> int:
    """train.eval_every / checkpoint_every in steps: a whole number is steps; below 1 it is that
    share of the run's steps (0.5: halfway), as in transformers' eval_steps, so a config keeps its
    overhead share whatever max_steps or epochs a user sets; 0: only at the end."""
    if every < 0 or (every >= 1 and every != int(every)):
        raise ConfigError(f"{name} {every:g}: a whole number of steps, a share of the run below 1, or 0")
    return int(every) if every >= 1 or every == 0 else max(1, round(every * total))


def eval_units(cfg: Config, counts: dict) -> int:
    """Units each eval reads: the eval split's, capped by train.eval_max_rows."""
    n = counts["eval"]["units"]
    return n if cfg.train.eval_max_rows is None else min(n, cfg.train.eval_max_rows)


# The train knobs that shape the trajectory; logging, eval, storage and speed knobs are not here.
# The split of the global batch over workers and micro-batches is not (any number of workers
# resumes a checkpoint): the global batch is.
TRAJECTORY = ("epochs", "max_steps", "lr",
              "weight_decay", "adam_betas", "warmup_ratio", "schedule", "max_grad_norm", "mixed_precision",
              "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "shuffle_buffer", "shuffle_chunk",
              "interleave_labels")


def reward_shift_seed(cfg: Config) -> dict | None:
    """The reward-shift state objective.reward_shift_from's run card ended with (None: start at
    zero). Its means and counts continue here, as if this run's rewards followed that run's."""
    src = cfg.objective.reward_shift_from
    if not src:
        return None
    fs, path = storage.filesystem(src, cfg.storage)
    try:
        card = json.loads(storage.read_bytes(fs, storage.join(path, "run_card.json")))
    except (FileNotFoundError, OSError):
        raise UserError(f"objective.reward_shift_from {src}: no run_card.json there",
                        "give a model directory that `bco-ray train` exported, or leave it null") from None
    state = card.get("delta")
    if not isinstance(state, dict) or state.get("version") != 1:
        raise UserError(f"objective.reward_shift_from {src}: its run card holds no reward-shift state",
                        "the model was trained with objective.loss kto/dpo or by an older bco-ray; leave it null")
    mode = "pooled" if cfg.objective.delta_mode == "pooled" else "balanced"
    if (state["mode"], state["decay"]) != (mode, cfg.objective.delta_decay):
        raise UserError(f"objective.reward_shift_from {src}: its reward shift was kept with mode {state['mode']!r}, "
                        f"decay {state['decay']}; this run keeps mode {mode!r}, decay {cfg.objective.delta_decay}",
                        "use the same objective.delta_mode and delta_decay, or leave reward_shift_from null")
    return {**state, "pending": [0.0, 0.0, 0.0, 0.0], "steps": 0}


def run_fingerprint(cfg: Config, scored_manifest: dict) -> dict:
    """What a checkpoint must share with this run to be resumed by it: the scored data (its
    key: prepared files and reference), the policy, the seed, the objective and TRAJECTORY."""
    fp = {"data": scored_manifest.get("key"), "model.policy": cfg.model.policy, "run.seed": cfg.run.seed,
          **{f"objective.{k}": v for k, v in to_dict(cfg.objective).items()},
          **{f"train.{k}": getattr(cfg.train, k) for k in TRAJECTORY},
          "train.global_batch": cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.train.num_workers}
    return json.loads(json.dumps(fp))  # as state.json will hold it (tuples as lists)


def check_resume(fs, run_path: str, fingerprint: dict, cfg: Config) -> None:
    """Refuse to continue a checkpoint of another run (other data or settings) under this
    run's name: rerunning with a changed config would otherwise silently resume the old one."""
    from bco_ray.train import checkpoint

    state = checkpoint.latest_state(fs, run_path)
    if state is None or cfg.train.resume == "force" or state.get("fingerprint") == fingerprint:
        return
    old = state.get("fingerprint")
    if old is None:
        what = "written before checkpoints recorded their run's settings"
    else:
        what = ", ".join(f"{k} {old.get(k)!r} -> {fingerprint.get(k)!r}"
                         for k in sorted(old.keys() | fingerprint.keys()) if old.get(k) != fingerprint.get(k))
    raise UserError(f"train.name {cfg.train.name!r} already holds a checkpoint (step {state.get('step')}) of a "
                    f"different run in {run_path}: {what}",
                    "use a new --train.name, delete that directory, or --train.resume force to continue it "
                    "with these settings")


def train(cfg: Config, _fail_at_step: int | None = None, _fail_marker: str | None = None) -> dict:
    """Train on a Ray cluster (already initialised); returns the run card.

    Fault drill: with $BCO_RAY_FAULT_DRILL_STEP=N the last worker kills itself (SIGKILL) at
    step N, once per run directory, to rehearse recovery on a real cluster."""
    import os

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from bco_ray.train.loop import worker_loop

    t0 = time.time()
    tc = cfg.train
    if _fail_at_step is None and os.environ.get("BCO_RAY_FAULT_DRILL_STEP"):
        _fail_at_step = int(os.environ["BCO_RAY_FAULT_DRILL_STEP"])
        _fail_marker = os.path.abspath(storage.join(cfg.run.run_dir, ".fault-drill-done"))
    src = tc.input or cfg.score.output or storage.join(cfg.run.run_dir, "scored")
    fs, src_dir = storage.filesystem(src, cfg.storage)
    data_dir = storage.join(src_dir, "data")
    if not storage.exists(fs, data_dir):
        raise UserError(f"no scored data at {src}/data", "run `bco-ray score-ref` first (or set train.input)")
    scored_manifest = json.loads(storage.read_bytes(fs, storage.join(src_dir, "manifest.json")))
    columns = TRAIN_COLUMNS + (KL_COLUMNS if cfg.objective.loss == "kto" else [])
    if cfg.objective.loss == "kto" and not scored_manifest.get("kl_pairs"):
        raise ValueError("KTO needs the mismatched-pair reference log-probs: run score-ref with "
                         "--objective.loss kto (or --score.kl_pairs on)")
    meta = pads.dataset(data_dir, filesystem=fs, format="parquet").to_table(columns=["split", "label", "pair_id"])
    # DPO trains on complete pairs: found once, for the counts and for the written order.
    pairs = {split: complete_pairs(meta, split) for split in ("train", "eval")} if cfg.objective.loss == "dpo" else None
    counts = count_units(meta, pairs)
    p = plan(cfg, counts)
    console.say(f"[train] {counts['train']['units']} train units ({counts['train']['up']} up / "
                f"{counts['train']['down']} down rows), {counts['eval']['units']} eval units; global batch "
                f"{p['global_batch_units']}, {p['steps_per_epoch']} steps/epoch, {p['total_steps']} steps")

    store_uri = tc.storage or storage.join(cfg.run.run_dir, "train")
    if not storage.is_s3(store_uri):
        store_uri = os.path.abspath(store_uri)
    store_fs, store_path = storage.filesystem(store_uri, cfg.storage)
    fingerprint = run_fingerprint(cfg, scored_manifest)
    check_resume(store_fs, storage.join(store_path, tc.name), fingerprint, cfg)
    export_uri = tc.export or storage.join(cfg.run.run_dir, "model")
    if not storage.is_s3(export_uri):  # workers run in their own working directories
        export_uri = os.path.abspath(export_uri)
    exports.check_target(export_uri, cfg.storage)  # now, not after hours of training

    shift_init = reward_shift_seed(cfg)
    console.status("writing the splits in the global order")
    t_order = time.time()
    chunk = chunk_units(p["global_batch_units"], tc.shuffle_chunk)
    order_meta = {"data": scored_manifest.get("key"), "seed": cfg.run.seed, "loss": cfg.objective.loss,
                  "interleave_labels": tc.interleave_labels, "columns": columns}
    order = {}
    for split in ("train", "eval"):
        out_dir = storage.join(store_path, tc.name, "order", split)
        order[split] = {"dir": out_dir, **write_order(data_dir, fs, split, columns, counts[split]["rows"], cfg,
                                                      store_fs, out_dir, chunk, order_meta,
                                                      pairs[split] if pairs is not None else None)}

    t_order = time.time() - t_order
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 if tc.use_gpu is None else tc.use_gpu
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    tracking = tc.tracking_uri
    if tracking is None:
        tracking = "file:" + os.path.abspath(storage.join(cfg.run.run_dir, "mlruns"))
    sink = console.train_sink()
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"cfg": to_dict(cfg), **p, "console": sink.queue if sink else None, "eval_units": eval_units(cfg, counts), "order": order, "export": export_uri, "fingerprint": fingerprint,
                           "shift_init": shift_init, "tracking_uri": tracking, "storage_uri": store_uri, "fail_at_step": _fail_at_step, "fail_marker": _fail_marker},
        scaling_config=ray.train.ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources, placement_strategy=tc.placement),
        run_config=ray.train.RunConfig(
            name=tc.name, storage_path=store_path, storage_filesystem=store_fs,
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints)),
    )
    t_fit = time.time()
    try:
        result = trainer.fit()
        t_fit = time.time() - t_fit
    finally:
        if sink:
            sink.close()
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        with open(f"{d}/state.json") as f:
            state = json.load(f)
    card = {
        "phase_seconds": phase_seconds(state.get("phase_seconds", {}), t_order, t_fit, time.time() - t0),
        "model": export_uri, "exported_step": state.get("exported_step"), "exported_eval": state.get("exported_eval"),
        "stopped_early": state.get("stopped_early"), "nonfinite_steps": state.get("nonfinite_steps", 0),
        "base_model": cfg.model.policy, "reference": cfg.model.reference or cfg.model.policy,
        "objective": to_dict(cfg.objective), "steps": state["step"], "plan": p, "data": counts,
        "final_metrics": state["history"][-1] if state["history"] else {}, "final_eval": state["eval"][-1],
        "delta": state["reward_shift"], "history": state["history"], "eval_history": state["eval"],
        "scored_manifest": {k: v for k, v in scored_manifest.items() if k != "config"},
        "rows_read": state.get("rows_read"), "checkpoint": result.checkpoint.path, "worker_nodes": state.get("worker_nodes"), "mlflow": {"tracking_uri": tracking, "run_id": state.get("mlflow_run_id")},
        "seconds": round(time.time() - t0, 1), "config": redacted(cfg),
    }
    console.say("[train] where the time went: " + ", ".join(
        f"{k} {v:.0f} s" for k, v in sorted(card["phase_seconds"].items(), key=lambda kv: -kv[1]) if v >= 0.5))
    efs, epath = storage.filesystem(export_uri, cfg.storage)
    stale = storage.join(epath, "eval.json")  # an earlier model's eval verdict: not this model's
    if storage.exists(efs, stale):
        efs.delete_file(stale)
    storage.write_bytes(efs, storage.join(epath, "run_card.json"), json.dumps(card, indent=1).encode())
    storage.write_bytes(efs, storage.join(epath, "README.md"), _card_markdown(card).encode())
    return card


def phase_seconds(worker: dict, order: float, fit: float, total: float) -> dict:
    """Where the stage's wall time went: the driver's parts around rank 0's phases. Ray Train's
    worker start and stop and the final checkpoint are the part of trainer.fit() the workers'
    clock does not see (on a resumed run the workers' phases span every attempt)."""
    out = {"splits in the global order": round(order, 1), **{k: round(v, 1) for k, v in worker.items()}}
    out["worker group start and stop, final checkpoint"] = round(max(fit - sum(worker.values()), 0.0), 1)
    out["other"] = round(max(total - fit - order, 0.0), 1)
    return out


def _card_markdown(card: dict) -> str:
    fm, ev = card["final_metrics"], card["final_eval"]
    obj = card["objective"]
    rows = [("objective", f"{obj['loss']} (beta {obj['beta']}, delta {obj['delta_mode']})"),
            ("base model", card["base_model"]), ("steps", card["steps"]),
            ("train units", card["data"]["train"]["units"]), ("final train loss", f"{fm.get('loss', float('nan')):.4f}"),
            ("final delta", f"{fm.get('delta', 0.0):+.4f}"),
            ("eval loss", f"{ev.get('eval/loss', float('nan')):.4f}"),
            ("eval reward accuracy", f"{ev.get('eval/reward_accuracy', float('nan')):.3f}"),
            ("eval reward margin", f"{ev.get('eval/rewards/margin', float('nan')):+.4f}"),
            ("exported weights", f"step {card['exported_step']}")]
    if stop := card.get("stopped_early"):
        rows.append(("stopped early", f"at step {stop['step']}: " + "; ".join(stop["reasons"])))
    lines = ["# bco-ray aligned model", "",
             f"Aligned from thumbs-up / thumbs-down feedback with bco-ray. Load with "
             f"`AutoModelForCausalLM.from_pretrained(\"{card['model']}\")`.", "",
             "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + \
            ["", "Full config, data manifests and per-step metrics: `run_card.json`.", ""]
    return "\n".join(lines)

