"""`bco-ray compact`: the feedback log's small files merged, day by day, without losing a row.

    bco-ray compact --serve.feedback_log s3://bucket/feedback        # every day before today (UTC)
    bco-ray compact --compact.input ./runs/demo/feedback --compact.until 2026-12-01

The serve stage commits files as often as every `serve.log_commit_seconds` under load: a year
of traffic is millions of small files, and each `prepare` lists and opens every one. Per log
(feedback, and the served log under `_served/`), day partition (`date=YYYY-MM-DD/`) and prompt
kind (text or chat: two schemas), the files the writer made (`feedback-*-{kind}.parquet`,
`served-*-{kind}.parquet`, and the output of an earlier compaction) become files of up to
`compact.max_rows_per_file` rows each.
Files of other names are never touched. Only days before `compact.until` are compacted: the
writer may still be adding to today's.

Per group of inputs, in this order, so a crash at any point loses nothing:
1. a journal, `_compaction/<output name>.json`, naming the inputs and their row counts
   (from their footers; a file whose footer cannot be read stays where it is, and is named);
2. the merged file, committed whole (`storage.write_parquet_atomic`) and checked: its rows
   are the inputs' rows, in input order;
3. the inputs deleted, then the journal.
A rerun finds a journal left by a crash: if its output is there, it finishes step 3, otherwise
it starts the group again. Between 2 and 3 a `prepare` would read a row twice, once from each
file; its vote deduplication (one vote per completion, choice and caller) keeps one.

Each group is one Ray task; `compact_group` under it needs no Ray.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bco_ray import console, storage
from bco_ray.config import Config, to_dict
from bco_ray.data.normalise import SERVED
from bco_ray.errors import UserError

OURS = re.compile(r"^(feedback|served|compacted)-.*-(text|chat)\.parquet$")
SUBLOGS = ("", SERVED)  # the feedback log at the root, the served log under _served/
JOURNALS = "_compaction"


def log_uri(cfg: Config) -> str:
    return cfg.compact.input or cfg.serve.feedback_log or storage.join(cfg.run.run_dir, "feedback")


def _rows_or_error(fs, path: str) -> tuple[str, int | str]:
    """(path, rows from its footer), or (path, why it cannot be read)."""
    try:
        with fs.open_input_file(path) as h:
            return path, pq.ParquetFile(h).metadata.num_rows
    except (OSError, pa.ArrowException) as e:
        return path, f"{type(e).__name__}: {e}"[:300]


def plan(fs: pafs.FileSystem, root: str, until: str, max_rows: int, min_files: int) -> tuple[list[dict], list[dict]]:
    """(groups, unreadable): the groups of input files to merge, each {day, kind, inputs:
    [(path, rows)]}, and the files left alone because their footer could not be read."""
    by_day_kind: dict[tuple[str, str, str], list[str]] = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root):].strip("/").split("/")
        m = OURS.match(rel[-1])
        day = storage.partition_value(info.path[len(root):], "date")
        sub = "/".join(rel[:-2])
        if not m or not day or len(rel) < 2 or sub not in SUBLOGS or day >= until:
            continue
        by_day_kind.setdefault((sub, day, m.group(2)), []).append(info.path)
    groups, unreadable = [], []
    for (sub, day, kind), files in sorted(by_day_kind.items()):
        sized = []
        for f, n in storage.parallel_map(lambda f: _rows_or_error(fs, f), sorted(files)):
            if isinstance(n, int):
                sized.append((f, n))
            else:
                unreadable.append({"path": f, "reason": n})
        group: list[tuple[str, int]] = []
        rows = 0
        for f, n in sized + [(None, 0)]:
            if f is None or (group and rows + n > max_rows):
                # A lone file that is already as big as allowed is left as it is.
                if len(group) >= max(2, min_files):
                    groups.append({"log": sub, "day": day, "kind": kind, "inputs": group})
                group, rows = [], 0
            if f is not None:
                group.append((f, n))
                rows += n
    return groups, unreadable


def output_name(group: dict) -> str:
    digest = hashlib.sha256("\n".join(p for p, _ in group["inputs"]).encode()).hexdigest()[:16]
    return f"compacted-{group['day'].replace('-', '')}-{digest}-{group['kind']}.parquet"


def compact_group(fs: pafs.FileSystem, root: str, group: dict) -> dict:
    """Merge one group's files into one (see the module's steps); returns what was done."""
    folder = storage.join(root, *([group["log"]] if group.get("log") else []), f"date={group['day']}")
    name = output_name(group)
    out, journal = storage.join(folder, name), storage.join(root, JOURNALS, name + ".json")
    expected = sum(n for _, n in group["inputs"])
    if not storage.exists(fs, out):
        storage.write_bytes(fs, journal, json.dumps({"output": out, "rows": expected, **group}).encode())
        tables = []
        for path, n in group["inputs"]:
            with fs.open_input_file(path) as h:
                t = pq.read_table(h)
            if t.num_rows != n:
                raise ValueError(f"{path} holds {t.num_rows} rows, its footer said {n}: left as it is")
            tables.append(t)
        # Files written before a column was added (caller) get it as nulls.
        merged = pa.concat_tables(tables, promote_options="default")
        storage.write_parquet_atomic(fs, folder, name, merged)
    with fs.open_input_file(out) as h:
        written = pq.ParquetFile(h).metadata.num_rows
    if written != expected:
        raise ValueError(f"{out} holds {written} rows where its inputs held {expected}: inputs kept")
    for path, _ in group["inputs"]:
        if path != out and storage.exists(fs, path):
            fs.delete_file(path)
    if storage.exists(fs, journal):
        fs.delete_file(journal)
    return {"log": group.get("log", ""), "day": group["day"], "kind": group["kind"],
            "files": len(group["inputs"]), "rows": expected,
            "output": out}


def finish_journals(fs: pafs.FileSystem, root: str) -> list[dict]:
    """Groups a crashed run left half done: finished when their output is complete, else dropped
    (their inputs are all still there, and `plan` finds them again)."""
    done = []
    folder = storage.join(root, JOURNALS)
    for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)):
        if not info.path.endswith(".json"):
            continue
        j = json.loads(storage.read_bytes(fs, info.path))
        if storage.exists(fs, j["output"]):
            done.append(compact_group(fs, root, {"log": j.get("log", ""), "day": j["day"], "kind": j["kind"],
                                                 "inputs": [tuple(x) for x in j["inputs"]]}))
        else:
            fs.delete_file(info.path)
    return done


def _task(storage_cfg: dict, root_uri: str, group: dict) -> dict:
    from bco_ray.config import StorageConfig

    fs, root = storage.filesystem(root_uri, StorageConfig(**storage_cfg))
    return compact_group(fs, root, group)


def compact(cfg: Config) -> dict:
    """The command: plan, merge each group in a Ray task, report (and write `_compaction/last.json`)."""
    import ray

    t0 = time.time()
    cc = cfg.compact
    uri = log_uri(cfg)
    fs, root = storage.filesystem(uri, cfg.storage)
    until = cc.until or dt.datetime.now(dt.UTC).date().isoformat()
    try:
        dt.date.fromisoformat(until)
    except ValueError:
        raise UserError(f"compact.until {until!r} is not a date", "write it as YYYY-MM-DD") from None
    recovered = finish_journals(fs, root)
    groups, unreadable = plan(fs, root, until, cc.max_rows_per_file, cc.min_files)
    console.say(f"[compact] {uri}: {sum(len(g['inputs']) for g in groups)} files in {len(groups)} group(s) "
                f"before {until}" + (f"; {len(recovered)} group(s) a crashed run left finished" if recovered else ""))
    task = ray.remote(num_cpus=cfg.ingest.num_cpus_per_task, max_retries=2)(_task)
    st = to_dict(cfg.storage)
    done = ray.get([task.remote(st, uri, g) for g in groups])
    report = {"log": uri, "until": until, "groups": len(done), "files_in": sum(d["files"] for d in done),
              "files_out": len(done), "rows": sum(d["rows"] for d in done), "recovered": recovered,
              "unreadable": unreadable, "seconds": round(time.time() - t0, 1)}
    for u in unreadable:
        console.say(f"[compact] left alone (unreadable footer): {u['path']}: {u['reason']}")
    console.say(f"[compact] {report['files_in']} files -> {report['files_out']}, {report['rows']} rows, "
                f"in {report['seconds']} s")
    storage.write_bytes(fs, storage.join(root, JOURNALS, "last.json"), json.dumps(report, indent=1).encode())
    return report
