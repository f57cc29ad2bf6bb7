"""`bco-ray prepare`: feedback logs (local or S3) -> prepared dataset, quarantine, manifest.

Three streaming Ray Data passes; the driver only ever holds file footers, a UDM sample and
aggregate counts, so memory does not grow with the number of rows:

  1. read + normalise  each parquet row group of the input is one task; every raw row
                       becomes an ok example or a quarantine row   -> _stage1/status=*/
  2. dedup + tokenize  a shuffle by (prompt, completion) resolves duplicates and conflicting
                       labels; tokenizer tasks encode and split     -> _stage2/status=*/
  3. UDM weights       fit on a seeded per-label sample, weigh every row -> prepared/

Output layout under `ingest.output` (default <run_dir>/prepared):
  data/            the prepared rows (parquet)        quarantine/   rows rejected, with reason
  deduplicated/    ids of exact duplicates dropped    udm/          classifier.json, diagnostics.png
  manifest.json    counts, invariant, token lengths, UDM metrics
"""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bco_ray import console, storage
from bco_ray.config import Config, redacted
from bco_ray.data.join import join_served
from bco_ray.data.normalise import (
    NORMALISED_SCHEMA,
    REASONS,
    LabelVocab,
    file_id,
    normalise_table,
    resolve_group,
    unreadable_rows,
)
from bco_ray.errors import UserError, first_line

QUARANTINE_COLUMNS = ["row_id", "source", "day", "reason", "raw"]
UNREADABLE_FILE = "unreadable_file"
UNREADABLE_ROW_GROUP = "unreadable_row_group"
MAX_LISTED_FILES = 1000  # unreadable files named in the manifest (all are counted)
FOOTER_THREADS = 16  # parquet footers read at once (latency-bound on S3)
# Rows one read task of pass 1 normalises, at most; fewer on a small log so that it still
# makes READ_TASKS_MIN tasks. The driver keeps ~20 KB per Ray task (measured, 2026-12-06):
# one task per row group of the serve stage's 500-row files is 4 GB at 1e8 rows.
READ_TASK_ROWS = 50_000
READ_TASKS_MIN = 64
READ_TASK_BYTES = 256 * 2**20  # uncompressed, as the footers count it: long rows close a task sooner
STAGES = ("_stage1", "_stage2", "data", "quarantine", "deduplicated", "udm")


def read_tasks(units: list[dict], rows: int) -> list[dict]:
    """The input's row groups, in listing order, gathered into the read tasks of pass 1:
    consecutive groups until a task holds min(READ_TASK_ROWS, rows / READ_TASKS_MIN) rows or
    READ_TASK_BYTES. A large row group is a task alone; a day of small files shares a few tasks."""
    target = max(1, min(READ_TASK_ROWS, rows // READ_TASKS_MIN))
    tasks, task, n, size = [], [], 0, 0
    for u in units:
        task.append([u["path"], u["row_group"], u["day"]])
        n, size = n + u["rows"], size + u["bytes"]
        if n >= target or size >= READ_TASK_BYTES:
            tasks.append(task)
            task, n, size = [], 0, 0
    if task:
        tasks.append(task)
    return [{"units": json.dumps(t)} for t in tasks]


def _read_normalise(batch: dict, cfg: Config) -> pa.Table:
    """Ray Data: read tasks (JSON lists of [file, row group, day]) -> normalised rows."""
    ic = cfg.ingest
    fs, _ = storage.filesystem(ic.input, cfg.storage)
    vocab = LabelVocab(ic.true_labels, ic.false_labels)
    tables = []
    units = (unit for task in batch["units"] for unit in json.loads(task))
    # A task holds consecutive row groups: a file's are adjacent, opened (footer read) once.
    for path, groups in itertools.groupby(units, key=lambda unit: str(unit[0])):
        fid = file_id(path)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            for _, group, day in groups:
                group, day = int(group), None if day == "" else str(day)
                try:
                    table = pf.read_row_group(group)
                except (pa.ArrowInvalid, OSError) as e:  # corrupt pages: its rows quarantined, the run goes on
                    if isinstance(e, OSError) and storage.explain(e, path) is not None:
                        raise  # storage failed, not the file: Ray retries the task
                    tables.append(unreadable_rows(pf.metadata.row_group(group).num_rows, path, fid, group, day,
                                                  first_line(e)))
                    continue
                tables.append(normalise_table(table, path, fid, group, ic, vocab, day))
    return pa.concat_tables(tables)


def _example_json(r: dict) -> str:
    """The `raw` of a row rejected after normalisation: its example fields as JSON."""
    return json.dumps({k: r[k] for k in ("prompt", "prompt_messages", "completion", "label")}, ensure_ascii=False)


STAGE2_SCHEMA = NORMALISED_SCHEMA.append(pa.field("duplicate_of", pa.string()))


def _resolve(block: pa.Table, policy: str) -> pa.Table:
    """Ray Data: a block of the shuffle by pair_key, each key's rows all in it -> resolved rows.

    Nearly every key holds one row (a row without a duplicate, a conflict or a repeated vote):
    those stay in Arrow, status ok. Only keys with several rows go through `resolve_group` as
    Python rows. (Ray's map_groups called a function per key: a Python call and two table
    conversions for every row of a log whose prompts rarely repeat.)"""
    import pyarrow.compute as pc

    counts = pc.value_counts(block["pair_key"])
    several = pc.is_in(block["pair_key"], value_set=counts.field("values").filter(
        pc.greater(counts.field("counts"), 1)))
    single = block.filter(pc.invert(several))
    n = single.num_rows
    columns = {f.name: (pa.array(["ok"] * n, f.type) if f.name == "status"
                        else single[f.name].cast(f.type) if f.name in single.column_names
                        else pa.nulls(n, f.type)) for f in STAGE2_SCHEMA}
    groups: dict[int, list[dict]] = {}
    for r in block.filter(several).to_pylist():
        r["status"], r["duplicate_of"] = "ok", None  # the hive directory status=ok may come back as a column
        groups.setdefault(r["pair_key"], []).append(r)
    rows = [r for g in groups.values() for r in resolve_group(g, policy)]
    for r in rows:
        if r["status"] == "quarantined" and r["raw"] is None:
            r["raw"] = _example_json(r)
    return pa.concat_tables([pa.table(columns, schema=STAGE2_SCHEMA),
                             pa.Table.from_pylist(rows, schema=STAGE2_SCHEMA)])


_TOKENIZERS: dict = {}


def _feedback_tokenizer(cfg: Config):
    """One tokenizer per Ray worker process (workers are reused across tasks)."""
    key = (cfg.model.policy, cfg.model.cache_dir, cfg.ingest.max_length, cfg.ingest.max_prompt_length,
           cfg.ingest.chat_template)
    if key not in _TOKENIZERS:
        from transformers import AutoTokenizer

        from bco_ray.assets import local_model_dir
        from bco_ray.data.tokenization import FeedbackTokenizer

        path = local_model_dir(cfg.model.policy, cfg)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
        _TOKENIZERS[key] = FeedbackTokenizer(tok, *key[2:])
    return _TOKENIZERS[key]


TOKEN_FIELDS = [("input_ids", pa.list_(pa.int32())), ("completion_mask", pa.list_(pa.int8())),
                ("prompt_tokens", pa.int32()), ("completion_tokens", pa.int32()),
                ("truncated", pa.bool_()), ("split", pa.string())]


def _tokenize(table: pa.Table, cfg: Config) -> pa.Table:
    """Ray Data task: encode the ok rows, assign the split; prompt_too_long -> quarantine.

    Plain tasks, not an actor pool: actors would hold CPUs through the shuffle before
    this step and starve it on a small cluster.
    """
    from bco_ray.data.normalise import Reject
    from bco_ray.data.tokenization import split_of

    enc = _feedback_tokenizer(cfg)
    rows = table.to_pylist()
    for r in rows:
        r.update({name: None for name, _ in TOKEN_FIELDS})
    ok = [r for r in rows if r["status"] == "ok"]
    encoded = enc.encode_many([r["prompt"] for r in ok], [r["prompt_messages"] for r in ok],
                              [r["completion"] for r in ok])
    for r, e in zip(ok, encoded, strict=True):
        if isinstance(e, Reject):
            r["status"], r["reason"] = "quarantined", e.reason
            r["raw"] = _example_json(r)
        else:
            r.update(e)
            r["split"] = split_of(r["prompt"], r["prompt_messages"], cfg.ingest.eval_fraction)
    schema = table.schema
    for name, typ in TOKEN_FIELDS:
        schema = schema.append(pa.field(name, typ))
    return pa.Table.from_pylist(rows, schema=schema)


def check_input(cfg: Config) -> None:
    """The pre-flight of `prepare` (and `align`): raises the UserErrors of `_input_units`
    before any work, reading footers only up to the first file with a known schema."""
    _input_units(cfg, first_known=True)


def _input_units(cfg: Config, first_known: bool = False) -> tuple[list[dict], int, list[str], list[dict]]:
    """Row groups to read (after the date filter), raw rows in them, the files, and the files
    set aside as unreadable (path, reason, error).

    A file whose footer cannot be parsed (empty, truncated, not parquet) is set aside, not
    fatal: a writer that crashed mid-file must not stop every later `prepare`. Its rows are
    unknowable, so it is counted as a file (manifest `quarantined_files`), not in the rows.
    Stops with what to change when nothing could be kept: no input, no parquet file, a
    date range that matches no file, or no file with a known schema."""
    from bco_ray.data.normalise import detect_format

    ic = cfg.ingest
    fs, root = storage.filesystem(ic.input, cfg.storage)
    try:
        listed = storage.list_parquet(fs, root)
    except FileNotFoundError as e:
        raise UserError(f"ingest.input {ic.input!r} does not exist ({e})",
                        "point --ingest.input at a parquet file, a directory of them or an s3:// prefix") from None
    if not listed:
        raise UserError(f"ingest.input {ic.input!r} holds no .parquet files (names starting with _ or . are "
                        "skipped)", "point --ingest.input at the directory of your feedback logs")
    units, rows, files, days, known, bad = [], 0, [], [], False, []
    unknown: tuple[str, list[str]] | None = None  # the first file of an unknown schema, its columns
    n_unknown = 0
    def wanted(path: str) -> bool:
        day = storage.partition_value(path, ic.partition_key)
        return day is None or not ((ic.date_from and day < ic.date_from) or (ic.date_to and day > ic.date_to))

    # The pre-flight reads footers one by one and stops at the first known schema.
    footers = (map(lambda p: _footer(fs, p), filter(wanted, listed)) if first_known
               else storage.parallel_map(lambda p: _footer(fs, p), [p for p in listed if wanted(p)], FOOTER_THREADS))
    for path in listed:
        day = storage.partition_value(path, ic.partition_key)
        if day is not None:
            days.append(day)
        if not wanted(path):
            continue
        meta, columns = next(footers)
        if isinstance(meta, dict):  # the bytes are no parquet file: set aside
            bad.append(meta)
            continue
        if detect_format(columns, ic) is not None:
            known = True
            if first_known:
                return [], 0, [path], bad
        else:
            unknown, n_unknown = unknown or (path, columns), n_unknown + 1
        files.append(path)
        rows += meta.num_rows
        units += [{"path": path, "row_group": g, "day": day or "", "rows": meta.row_group(g).num_rows,
                   "bytes": meta.row_group(g).total_byte_size} for g in range(meta.num_row_groups)]
    if bad and not files:
        raise UserError(f"none of the {len(bad)} parquet files under {ic.input} can be read: {bad[0]['path']}: "
                        f"{bad[0]['error']}", "check that the log's writer finished its files")
    if bad and not first_known:
        console.say(f"[prepare] warning: {len(bad)} unreadable file(s) set aside ({UNREADABLE_FILE}, listed in the "
                    f"manifest's quarantined_files): {bad[0]['path']}: {bad[0]['error']}")
    if not files:
        span = f"days {min(days)} to {max(days)}" if days else f"no {ic.partition_key}=YYYY-MM-DD partitions"
        raise UserError(f"the date filter (ingest.date_from {ic.date_from}, ingest.date_to {ic.date_to}) matches "
                        f"none of the {len(listed)} files under {ic.input} ({span})",
                        "widen --ingest.date_from / --ingest.date_to, or set them to null")
    if unknown is not None:
        path, columns = unknown
        expected = (f"({ic.prompt_column}, {ic.completion_column}, {ic.label_column}) for unpaired rows, "
                    f"({ic.prompt_column}, {ic.chosen_column}, {ic.rejected_column}) for paired or "
                    f"({ic.messages_column}, {ic.label_column}) for conversational")
        fix = ("name your columns with ingest.prompt_column / completion_column / label_column (or chosen_column, "
               "rejected_column, messages_column), e.g. --ingest.label_column feedback")
        if not known:
            raise UserError(f"no input file has a known schema: {path} (and {n_unknown - 1} more) has columns "
                            f"{columns}, but bco-ray expects {expected}", fix)
        if not first_known:  # some files fit: go on, their rows are quarantined as unknown_schema
            console.say(f"[prepare] warning: {n_unknown} of {len(files)} files have an unknown schema and all their rows "
                        f"will be quarantined (unknown_schema): {path} has columns {columns}, expected {expected}; "
                        f"to read them, {fix}")
    return units, rows, files, bad


def _footer(fs, path: str):
    """(metadata, column names) of one parquet file, or (a quarantined-file record, None)."""
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            return pf.metadata, pf.schema_arrow.names
    except (pa.ArrowInvalid, EOFError) as e:
        return {"path": path, "reason": UNREADABLE_FILE, "error": first_line(e)}, None
    except OSError as e:  # storage refused or failed: not the file's fault, say so and stop
        raise (storage.explain(e, path) or ValueError(f"cannot read parquet file {path}: {e}")) from e


def count_rows(fs, path: str) -> int:
    """Rows of the parquet files under `path`, from their footers (read in parallel: a footer
    read is one or two small requests, bound by latency, tens of ms on S3)."""
    if not storage.exists(fs, path):
        return 0
    footers = storage.parallel_map(lambda p: _footer(fs, p), storage.list_parquet(fs, path), FOOTER_THREADS)
    return sum(meta.num_rows for meta, _ in footers if not isinstance(meta, dict))


def _length_hist(batch: dict, max_length: int) -> dict:
    """Per block: the token-length histogram and the truncated rows, summed on the driver."""
    n = np.asarray(batch["prompt_tokens"], np.int64) + np.asarray(batch["completion_tokens"], np.int64)
    return {"hist": [np.bincount(np.minimum(n, max_length), minlength=max_length + 1)],
            "truncated": [int(np.asarray(batch["truncated"], bool).sum())]}


def _percentiles(hist: np.ndarray, qs=(50, 90, 99, 100)) -> dict:
    cum = np.cumsum(hist)
    if cum[-1] == 0:
        return {}
    return {f"p{q}": int(np.searchsorted(cum, q / 100 * cum[-1])) for q in qs}


def prepare(cfg: Config) -> dict:
    """Run the three passes; returns the manifest (also written to <output>/manifest.json)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    previous = ctx.shuffle_strategy
    strategies = ray.data.context.ShuffleStrategy
    ctx.shuffle_strategy = strategies.SORT_SHUFFLE_PULL_BASED if cfg.ingest.shuffle == "sort" \
        else strategies.HASH_SHUFFLE
    try:
        return _prepare(cfg)
    finally:  # the caller's Ray session keeps its own setting
        ctx.shuffle_strategy = previous


def _prepare(cfg: Config) -> dict:
    import ray

    from bco_ray.data.udm_stage import diagnostics, fit_and_weigh

    t0 = time.time()
    ic = cfg.ingest
    cpus = ic.num_cpus_per_task
    remote = {"num_cpus": cpus}
    fs, out = storage.filesystem(ic.output or storage.join(cfg.run.run_dir, "prepared"), cfg.storage)

    def path(*parts: str) -> str:
        return storage.join(out, *parts)

    # The manifest goes first: it marks a complete output, and a prepare that crashes below
    # must not leave an earlier run's manifest beside half-rewritten data.
    if storage.exists(fs, path("manifest.json")):
        fs.delete_file(path("manifest.json"))
    for sub in STAGES:  # writes append: never mix with an earlier run's files
        if storage.exists(fs, path(sub)):
            fs.delete_dir(path(sub))
    units, rows_read, files, bad_files = _input_units(cfg)

    # Pass 1: read + normalise.
    console.status(f"pass 1/3: read + normalise {rows_read} rows from {len(files)} files")
    tasks = read_tasks(units, rows_read)
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    ds = ds.map_batches(_read_normalise, fn_kwargs={"cfg": cfg}, batch_size=1, batch_format="numpy", **remote)
    ds.write_parquet(path("_stage1"), filesystem=fs, partition_cols=["status"], ray_remote_args=remote)
    # Feedback the server logged without its answer: joined to the served log by id.
    joined = join_served(cfg, fs, path("_stage1"), cpus)
    if joined["events"]:
        console.say(f"[prepare] {joined['events']} feedback event(s) joined to the served log "
                    f"({joined['served_files']} file(s) of {len(joined['days'])} day(s))")

    # Pass 2: dedup / conflicts, tokenize, split.
    console.status("pass 2/3: dedup + tokenize + split")
    if storage.exists(fs, path("_stage1", "status=ok")):
        ok = storage.co_locate(storage.read_parquet(path("_stage1", "status=ok"), fs, cpus), "pair_key", rows_read,
                               ic.shuffle)
        # batch_size=None: a whole block, so a whole group (as Ray's own map_groups relies on)
        ok = ok.map_batches(_resolve, fn_kwargs={"policy": ic.conflicts}, batch_size=None, batch_format="pyarrow",
                            **remote)
        ok = ok.map_batches(_tokenize, fn_kwargs={"cfg": cfg}, batch_format="pyarrow", batch_size=1024, **remote)
        ok.write_parquet(path("_stage2"), filesystem=fs, partition_cols=["status"], ray_remote_args=remote)

    # Quarantine (both passes) and the dedup audit trail, in one uniform schema each.
    q_parts = [p for p in (path("_stage1", "status=quarantined"), path("_stage2", "status=quarantined"))
               if storage.exists(fs, p)]
    if q_parts:
        q = storage.read_parquet(q_parts[0], fs, cpus, QUARANTINE_COLUMNS)
        for extra in q_parts[1:]:
            q = q.union(storage.read_parquet(extra, fs, cpus, QUARANTINE_COLUMNS))
        q.write_parquet(path("quarantine"), filesystem=fs, ray_remote_args=remote)
    if storage.exists(fs, path("_stage2", "status=deduplicated")):
        dedup = storage.read_parquet(path("_stage2", "status=deduplicated"), fs, cpus, ["row_id", "source", "duplicate_of"])
        dedup.write_parquet(path("deduplicated"), filesystem=fs, ray_remote_args=remote)

    # Pass 3: UDM weights (or weight 1), written as the prepared data.
    console.status("pass 3/3: UDM weights" if cfg.udm.enabled else "pass 3/3: write the prepared data")
    udm_report = {"enabled": cfg.udm.enabled}
    if storage.exists(fs, path("_stage2", "status=ok")):
        kept = storage.read_parquet(path("_stage2", "status=ok"), fs, cpus).drop_columns(
            ["reason", "raw", "duplicate_of", "pair_key", "vote_key", "voted_at", "served_key"])
        kept, udm_report = fit_and_weigh(kept, cfg, fs, path("udm"))
        kept.write_parquet(path("data"), filesystem=fs, ray_remote_args=remote)
        udm_report = diagnostics(cfg, fs, path("data"), path("udm"), udm_report)

    manifest = _manifest(cfg, fs, out, rows_read, files, bad_files, udm_report, time.time() - t0, joined)
    for sub in ("_stage1", "_stage2"):  # _stage2 is absent when pass 1 kept no row
        if storage.exists(fs, path(sub)):
            fs.delete_dir(path(sub))
    if manifest["kept"] == 0:
        raise nothing_kept(manifest, path("quarantine"))
    return manifest


def nothing_kept(manifest: dict, quarantine: str) -> UserError:
    """Every row was quarantined or deduplicated: the manifest and quarantine are written;
    say why, with the top reasons, and fail (exit 1), since there is nothing to train on."""
    top = sorted(manifest["quarantine_reasons"].items(), key=lambda kv: -kv[1])[:3]
    why = "; ".join(f"{reason} x{n} ({REASONS.get(reason, '')})" for reason, n in top) or "all deduplicated"
    return UserError(f"all {manifest['examples']} examples were quarantined or deduplicated, none kept: {why}",
                     f"see the rows and their reasons in {quarantine} and fix the log or the ingest.* keys",
                     exit_code=1)


def _manifest(cfg, fs, out, rows_read, files, bad_files, udm_report, seconds, joined) -> dict:
    ic = cfg.ingest
    stage1 = count_rows(fs, storage.join(out, "_stage1"))
    kept = count_rows(fs, storage.join(out, "data"))
    dedup = count_rows(fs, storage.join(out, "deduplicated"))
    reasons: dict[str, int] = {}
    if storage.exists(fs, storage.join(out, "quarantine")):
        reason_counts = storage.read_parquet(storage.join(out, "quarantine"), fs, ic.num_cpus_per_task, ["reason"])
        for (reason,), n in storage.count_by(reason_counts, ["reason"], ic.num_cpus_per_task).items():
            reasons[reason] = n
    quarantined = count_rows(fs, storage.join(out, "quarantine"))  # from footers, not from `reasons`
    if quarantined != sum(reasons.values()):
        raise RuntimeError(f"quarantine has {quarantined} rows but its reasons sum to {sum(reasons.values())}")
    per_split_label, lengths = {}, {}
    if kept:
        columns = ["split", "label", "prompt_tokens", "completion_tokens", "truncated"]
        data = storage.read_parquet(storage.join(out, "data"), fs, ic.num_cpus_per_task, columns)
        for (split, label), n in storage.count_by(data, ["split", "label"], ic.num_cpus_per_task).items():
            per_split_label[f"{split}/{'up' if label else 'down'}"] = n
        # Summed here from per-block rows, not with Dataset.sum: that is an all-to-all whose
        # tiny per-block pieces stay in the driver (probe: +29 MB for 1,000 blocks).
        hist, truncated = np.zeros(ic.max_length + 1, np.int64), 0
        for b in data.map_batches(_length_hist, fn_kwargs={"max_length": ic.max_length},
                                  batch_format="numpy").iter_rows():
            hist += np.asarray(b["hist"])
            truncated += int(b["truncated"])
        lengths = _percentiles(hist)
        lengths["truncated"] = truncated
    manifest = {
        "input": ic.input, "files": len(files), "rows_read": rows_read, "examples": stage1,
        # files whose footer could not be read: their rows are unknown, so they are counted here
        "quarantined_files": {"count": len(bad_files), "files": bad_files[:MAX_LISTED_FILES]},
        "paired_rows_expanded": stage1 - rows_read, "kept": kept, "quarantined": quarantined,
        "deduplicated": dedup, "quarantine_reasons": dict(sorted(reasons.items())),
        "reason_help": {k: REASONS[k] for k in sorted(reasons) if k in REASONS},
        "kept_by_split_label": dict(sorted(per_split_label.items())), "tokens": lengths,
        "served_join": joined, "udm": udm_report, "seconds": round(seconds, 1), "config": redacted(cfg),
    }
    if stage1 != kept + quarantined + dedup:  # the accounting invariant; a failure is a bug
        raise RuntimeError(f"row accounting broken: examples {stage1} != kept {kept} + quarantined "
                           f"{quarantined} + deduplicated {dedup}")
    storage.write_bytes(fs, storage.join(out, "manifest.json"), json.dumps(manifest, indent=2).encode())
    return manifest
