"""Closing the loop: what the server answered, and the thumbs users gave it, as parquet logs
that `bco-ray prepare` reads (so next week's alignment run reads this week's traffic).

    <log>/date=YYYY-MM-DD/feedback-<time>-<uuid>-{text,chat}.parquet     the feedback events
    <log>/_served/date=YYYY-MM-DD/served-<time>-<uuid>-{text,chat}.parquet  every served answer
    prompt: string (text) or list<{role, content}> (chat): two schemas, two file kinds

    served:   completion_id, choice_index, prompt, completion, model, model_version, served_at
    feedback: prompt, completion, label ("thumbs_up" / "thumbs_down"), completion_id,
              choice_index, model, model_version, comment, served_at, feedback_at,
              caller (the first 16 hex digits of the SHA-256 of the caller's API key; "anonymous")

Nothing is acknowledged before it is on storage. Rows are committed in groups (`commit()`:
at once when the log is idle, else at most every `serve.log_commit_seconds`, all waiting rows
together; bco_ray/serve/log_replica.py): a request waits for the group that holds its row, so a
completion answered with 200 is in the served log, and a feedback answered with 200 is in
the feedback log, whatever crashes afterwards. Each file is committed whole (temp name then
rename; one PUT on S3). A storage outage keeps the rows buffered and retried; the waiting
requests get 503 after `serve.log_commit_timeout_s`.

Feedback for a completion still in memory (the last `serve.served_cache_size`) is written
whole; feedback for one the server no longer remembers (restarted, or long ago) is written
as an event without prompt and completion, and `prepare` joins it to the served log by id:
the completion id carries its serve day (`chatcmpl-YYYYMMDD-<hex>`), so the join reads that
day's served files only. A caller may change its mind: `prepare` counts one vote per
(completion_id, choice_index, caller), the latest (bco_ray.data.normalise.resolve_group).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from collections import OrderedDict

import pyarrow as pa

from bco_ray import storage
from bco_ray.config import StorageConfig
from bco_ray.data.normalise import SERVED, served_day

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
def _feedback_schema(chat: bool) -> pa.Schema:
    return pa.schema([("prompt", MESSAGES if chat else pa.string()), ("completion", pa.string()),
                      ("label", pa.string()), ("completion_id", pa.string()), ("choice_index", pa.int32()),
                      ("model", pa.string()), ("model_version", pa.string()), ("comment", pa.string()),
                      ("served_at", pa.timestamp("ms", tz="UTC")), ("feedback_at", pa.timestamp("ms", tz="UTC")),
                      ("caller", pa.string())])


def _served_schema(chat: bool) -> pa.Schema:
    return pa.schema([("completion_id", pa.string()), ("choice_index", pa.int32()),
                      ("prompt", MESSAGES if chat else pa.string()), ("completion", pa.string()),
                      ("model", pa.string()), ("model_version", pa.string()),
                      ("served_at", pa.timestamp("ms", tz="UTC"))])


SCHEMAS = {"feedback": _feedback_schema, "served": _served_schema}


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table | None:
    """The rows as an Arrow table of the schema; None if any of them cannot be."""
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowException, TypeError, ValueError, UnicodeError):
        return None


class UnknownCompletion(KeyError):
    """Feedback for an id this server cannot have issued."""


class FeedbackWriter:
    def __init__(self, uri: str, storage_cfg: StorageConfig, max_served: int = 100_000):
        self.fs, self.root = storage.filesystem(uri, storage_cfg)
        self.max_served = max_served
        self.served: OrderedDict[str, dict] = OrderedDict()
        self.buffer: list[tuple[str, dict]] = []  # (log, row): log is "served" or "feedback"
        self.seq = self.committed = 0  # rows appended / rows on storage, in order
        self.written = self.dead_lettered = 0
        self.lock = threading.Lock()
        self.commit_lock = threading.Lock()  # one commit at a time: they acknowledge in order

    def _append(self, log: str, rows: list[dict]) -> int:
        self.buffer += [(log, r) for r in rows]
        self.seq += len(rows)
        return self.seq

    def record(self, completion_id: str, prompt: str | list[dict], completions: list[str], model: str,
               model_version: str) -> int:
        """Remember a served answer and queue its rows; returns the sequence number that
        `commit()` must reach before the answer may be sent."""
        now = dt.datetime.now(dt.UTC)
        with self.lock:
            self.served[completion_id] = {"prompt": prompt, "completions": completions, "model": model,
                                          "model_version": model_version, "served_at": now}
            while len(self.served) > self.max_served:
                self.served.popitem(last=False)
            return self._append("served", [
                {"completion_id": completion_id, "choice_index": i, "prompt": prompt, "completion": text,
                 "model": model, "model_version": model_version, "served_at": now}
                for i, text in enumerate(completions)])

    def feedback(self, completion_id: str, thumbs_up: bool, comment: str | None = None, index: int = 0,
                 caller: str = "anonymous") -> tuple[dict, int]:
        """Queue one feedback row: (the row, the sequence number to wait for). Whole when the
        answer is remembered; otherwise an event that `prepare` joins to the served log."""
        with self.lock:
            served = self.served.get(completion_id)
            if served is None:
                if served_day(completion_id) is None:
                    raise UnknownCompletion(completion_id)
                if not 0 <= index < 128:
                    raise IndexError(f"choice_index {index} out of range")
                served = {"prompt": None, "completions": None, "model": None, "model_version": None,
                          "served_at": None}
            elif not 0 <= index < len(served["completions"]):
                raise IndexError(f"choice_index {index} out of range (this completion has "
                                 f"{len(served['completions'])} choices)")
            row = {"prompt": served["prompt"],
                   "completion": None if served["completions"] is None else served["completions"][index],
                   "label": "thumbs_up" if thumbs_up else "thumbs_down", "completion_id": completion_id,
                   "choice_index": index, "model": served["model"], "model_version": served["model_version"],
                   "comment": comment, "served_at": served["served_at"],
                   "feedback_at": dt.datetime.now(dt.UTC), "caller": caller}
            return row, self._append("feedback", [row])

    def pending(self) -> int:
        with self.lock:
            return len(self.buffer)

    def commit(self) -> int:
        """Write everything queued (one file per log, day and prompt kind); returns the sequence
        number now on storage. On a storage error the rows stay queued, in order, and it raises."""
        with self.commit_lock:
            with self.lock:
                rows, self.buffer, upto = self.buffer, [], self.seq
            if not rows:
                return self.committed
            stamp = time.strftime("%Y%m%dT%H%M%S")
            groups: dict[tuple[str, str, bool], list[dict]] = {}
            for log, r in rows:
                # served rows by the day their id carries: the day `prepare`'s join looks in
                day = served_day(r["completion_id"]) if log == "served" else None
                day = day or (r["served_at"] if log == "served" else r["feedback_at"]).date().isoformat()
                groups.setdefault((log, day, isinstance(r["prompt"], list)), []).append(r)
            pending = list(groups.items())
            try:
                while pending:
                    (log, day, chat), part = pending[0]
                    self._write(log, day, chat, part, stamp)
                    pending.pop(0)
            except Exception:
                with self.lock:  # storage failed: the unwritten rows go back in front, in order
                    self.buffer[:0] = [(log, r) for (log, _, _), part in pending for r in part]
                raise
            self.written += len(rows)  # dead-lettered rows included: they are on storage too
            self.committed = upto
            return upto

    def _write(self, log: str, day: str, chat: bool, part: list[dict], stamp: str) -> None:
        schema = SCHEMAS[log](chat)
        name = f"{log}-{stamp}-{uuid.uuid4().hex[:8]}-{'chat' if chat else 'text'}"
        folder = storage.join(self.root, *([SERVED] if log == "served" else []), f"date={day}")
        table = _table(part, schema)
        if table is None:  # a row that can never be written must not block the others
            good = [r for r in part if _table([r], schema) is not None]
            self._dead_letter(name, [r for r in part if _table([r], schema) is None])
            table = _table(good, schema) if good else None
        if table is not None:
            # committed whole: a truncated file would abort every later `prepare`
            storage.write_parquet_atomic(self.fs, folder, name + ".parquet", table)

    def _dead_letter(self, name: str, rows: list[dict]) -> None:
        """Rows that cannot be written as parquet, kept as JSON lines with the reason, beside
        the log (`_dead_letter/`, which `prepare` skips)."""
        reason = "not writable as parquet (text that is not valid UTF-8, or a value of the wrong type)"
        lines = [json.dumps({"reason": reason, "row": {k: (str(v) if isinstance(v, dt.datetime) else v)
                                                        for k, v in r.items()}}, ensure_ascii=True)
                 for r in rows]
        data = ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
        storage.write_bytes(self.fs, storage.join(self.root, "_dead_letter", name + ".jsonl"), data)
        self.dead_lettered += len(rows)
        print(f"[serve] {len(rows)} log row(s) could not be written ({reason}): kept in "
              f"{storage.join(self.root, '_dead_letter', name + '.jsonl')}", flush=True)

    def close(self) -> int:
        return self.commit()
