"""Feedback events joined to the served log (a pass of `prepare`, after read + normalise).

The server writes feedback whole while it remembers the answer; feedback for an answer it no
longer remembers (restarted, or days later) is an event without prompt and completion
(bco_ray/serve/feedback_log.py). Pass 1 leaves such rows as status=pending; here each one
gets its answer from the served log by (completion id, choice) and becomes an ok or a
quarantined row, one out per event, so the accounting holds.
"""

from __future__ import annotations

import json

import pyarrow as pa

from bco_ray import storage
from bco_ray.config import Config
from bco_ray.data.normalise import (
    NORMALISED_SCHEMA,
    SERVED,
    LabelVocab,
    complete_event,
    served_day,
    served_key,
)

JOIN_SCHEMA = pa.schema(list(NORMALISED_SCHEMA) + [pa.field("s_prompt", pa.string()),
                                                    pa.field("s_messages", pa.string()),
                                                    pa.field("s_completion", pa.string())])


def _served_side(batch: pa.Table, keys: frozenset) -> pa.Table:
    """Ray Data: served-log rows -> JOIN_SCHEMA rows (status 'served'), only those some event asks for."""
    rows = []
    for r in batch.to_pylist():
        key = served_key(r["completion_id"], r["choice_index"])
        if key in keys:
            p = r["prompt"]
            rows.append({"status": "served", "served_key": key, "s_prompt": p if isinstance(p, str) else None,
                         "s_messages": json.dumps(p, ensure_ascii=False) if isinstance(p, list) else None,
                         "s_completion": r["completion"]})
    return pa.Table.from_pylist(rows, schema=JOIN_SCHEMA)


def _event_side(batch: pa.Table) -> pa.Table:
    """Ray Data: pending events -> JOIN_SCHEMA rows (the served fields empty)."""
    rows = batch.to_pylist()
    for r in rows:
        r["status"] = "pending"  # the hive directory status=pending may or may not come back as a column
    return pa.Table.from_pylist(rows, schema=JOIN_SCHEMA)


def _complete_events(group: pa.Table, cfg: Config) -> pa.Table:
    """Ray Data: the events and served rows of one served key -> one normalised row per event."""
    rows = group.to_pylist()
    served = next((r for r in rows if r["status"] == "served"), None)  # a row committed twice: one
    vocab = LabelVocab(cfg.ingest.true_labels, cfg.ingest.false_labels)
    out = [complete_event(r, served, cfg.ingest, vocab) for r in rows if r["status"] == "pending"]
    return pa.Table.from_pylist(out, schema=NORMALISED_SCHEMA)


def join_served(cfg: Config, fs, stage1: str, cpus: float) -> dict:
    """Feedback events (status=pending) joined by completion id and choice to the served log
    of their serve day, and added to pass 1's output as ok or quarantined rows: one out per
    event, so the accounting holds. The driver holds the events' keys (one short string each:
    a few hundred MB for millions of late thumbs); the served log is filtered to them as read."""
    pending_dir = storage.join(stage1, "status=pending")
    if not storage.exists(fs, pending_dir):
        return {"events": 0}
    pending = storage.read_parquet(pending_dir, fs, cpus).materialize()
    keys = frozenset(r["served_key"] for r in pending.select_columns(["served_key"]).take_all())
    days = sorted({d for d in (served_day(k.split("\x1f")[0]) for k in keys) if d})
    log = cfg.ingest.served_log or storage.join(cfg.ingest.input, SERVED)
    log_fs, log_root = storage.filesystem(log, cfg.storage)
    files = {"text": [], "chat": []}
    for day in days:
        folder = storage.join(log_root, f"date={day}")
        if storage.exists(log_fs, folder):
            for f in storage.list_parquet(log_fs, folder):
                files["chat" if f.endswith("-chat.parquet") else "text"].append(f)
    sides = [pending.map_batches(_event_side, batch_format="pyarrow", num_cpus=cpus)]
    for kind_files in files.values():
        if kind_files:
            sides.append(storage.read_parquet(kind_files, log_fs, cpus).map_batches(
                _served_side, fn_kwargs={"keys": keys}, batch_format="pyarrow", num_cpus=cpus))
    joined = sides[0].union(*sides[1:]) if len(sides) > 1 else sides[0]
    joined = joined.groupby("served_key").map_groups(_complete_events, fn_kwargs={"cfg": cfg},
                                                     batch_format="pyarrow", num_cpus=cpus)
    joined.write_parquet(stage1, filesystem=fs, partition_cols=["status"], ray_remote_args={"num_cpus": cpus})
    fs.delete_dir(pending_dir)
    return {"events": pending.count(), "served_log": log, "served_files": sum(map(len, files.values())), "days": days}
