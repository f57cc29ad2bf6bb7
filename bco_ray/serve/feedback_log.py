"""Closing the loop: what the server answered, and the thumbs users gave it, as a parquet log
in the schema `bco-ray prepare` reads (so next week's alignment run reads this week's traffic).

    <log>/date=YYYY-MM-DD/feedback-<time>-<uuid>-text.parquet   prompt: string
    <log>/date=YYYY-MM-DD/feedback-<time>-<uuid>-chat.parquet   prompt: list<{role, content}>
    columns: prompt, completion, label ("thumbs_up" / "thumbs_down"), completion_id,
             choice_index, model, model_version, comment, served_at, feedback_at,
             caller (the first 16 hex digits of the SHA-256 of the caller's API key; "anonymous")

A caller may change its mind: `prepare` counts one vote per (completion_id, choice_index,
caller), the latest (bco_ray.data.normalise.resolve_group).

Served completions are remembered (bounded, oldest forgotten first) until their feedback
arrives; feedback rows are buffered and written in batches, and on `close()`.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from collections import OrderedDict

import pyarrow as pa

from bco_ray import storage
from bco_ray.config import StorageConfig

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def _schema(chat: bool) -> pa.Schema:
    return pa.schema([("prompt", MESSAGES if chat else pa.string()), ("completion", pa.string()),
                      ("label", pa.string()), ("completion_id", pa.string()), ("choice_index", pa.int32()),
                      ("model", pa.string()), ("model_version", pa.string()), ("comment", pa.string()),
                      ("served_at", pa.timestamp("ms", tz="UTC")), ("feedback_at", pa.timestamp("ms", tz="UTC")),
                      ("caller", pa.string())])


def _table(rows: list[dict], chat: bool) -> pa.Table | None:
    """The rows as an Arrow table of the log's schema; None if any of them cannot be."""
    try:
        return pa.Table.from_pylist(rows, schema=_schema(chat))
    except (pa.ArrowException, TypeError, ValueError, UnicodeError):
        return None


class UnknownCompletion(KeyError):
    """Feedback for a completion id this server never served (or has forgotten)."""


class FeedbackWriter:
    def __init__(self, uri: str, storage_cfg: StorageConfig, flush_rows: int = 256, flush_seconds: float = 10.0,
                 max_served: int = 100_000):
        self.fs, self.root = storage.filesystem(uri, storage_cfg)
        self.flush_rows, self.flush_seconds, self.max_served = flush_rows, flush_seconds, max_served
        self.served: OrderedDict[str, dict] = OrderedDict()
        self.buffer: list[dict] = []
        self.oldest: float | None = None
        self.written = self.dead_lettered = 0
        self.lock = threading.Lock()

    def record(self, completion_id: str, prompt: str | list[dict], completions: list[str], model: str,
               model_version: str) -> None:
        with self.lock:
            self.served[completion_id] = {"prompt": prompt, "completions": completions, "model": model,
                                          "model_version": model_version,
                                          "served_at": dt.datetime.now(dt.UTC)}
            while len(self.served) > self.max_served:
                self.served.popitem(last=False)

    def feedback(self, completion_id: str, thumbs_up: bool, comment: str | None = None, index: int = 0,
                 caller: str = "anonymous") -> dict:
        with self.lock:
            served = self.served.get(completion_id)
            if served is None:
                raise UnknownCompletion(completion_id)
            if not 0 <= index < len(served["completions"]):
                raise IndexError(f"choice_index {index} out of range (this completion has "
                                 f"{len(served['completions'])} choices)")
            row = {"prompt": served["prompt"], "completion": served["completions"][index],
                   "label": "thumbs_up" if thumbs_up else "thumbs_down", "completion_id": completion_id,
                   "choice_index": index, "model": served["model"], "model_version": served["model_version"],
                   "comment": comment, "served_at": served["served_at"],
                   "feedback_at": dt.datetime.now(dt.UTC), "caller": caller}
            self.buffer.append(row)
            self.oldest = self.oldest or time.monotonic()
            due = len(self.buffer) >= self.flush_rows
        if due:
            self.flush()
        return row

    def due(self) -> bool:
        return self.oldest is not None and time.monotonic() - self.oldest >= self.flush_seconds

    def flush(self) -> int:
        """Write the buffered rows (one file per prompt kind and day); returns how many."""
        with self.lock:
            rows, self.buffer, self.oldest = self.buffer, [], None
        if not rows:
            return 0
        stamp = time.strftime("%Y%m%dT%H%M%S")
        groups: dict[tuple[str, bool], list[dict]] = {}
        for r in rows:
            groups.setdefault((r["feedback_at"].date().isoformat(), isinstance(r["prompt"], list)), []).append(r)
        pending = list(groups.items())
        try:
            while pending:
                (day, chat), part = pending[0]
                name = f"feedback-{stamp}-{uuid.uuid4().hex[:8]}-{'chat' if chat else 'text'}"
                table = _table(part, chat)
                if table is None:  # a row that can never be written must not block the others
                    good = [r for r in part if _table([r], chat) is not None]
                    self._dead_letter(name, [r for r in part if _table([r], chat) is None])
                    table = _table(good, chat) if good else None
                if table is not None:
                    # committed whole: a truncated file would abort every later `prepare`
                    storage.write_parquet_atomic(self.fs, storage.join(self.root, f"date={day}"), name + ".parquet",
                                                 table)
                pending.pop(0)
        except Exception:
            with self.lock:  # storage failed: keep the unwritten rows for the next flush
                self.buffer[:0] = [r for _, part in pending for r in part]
                self.oldest = self.oldest or time.monotonic()
            raise
        self.written += len(rows)  # dead-lettered rows included: they are on storage too
        return len(rows)

    def _dead_letter(self, name: str, rows: list[dict]) -> None:
        """Rows that cannot be written as parquet, kept as JSON lines with the reason, beside
        the log (`_dead_letter/`, which `prepare` skips)."""
        import json

        reason = "not writable as parquet (text that is not valid UTF-8, or a value of the wrong type)"
        lines = [json.dumps({"reason": reason, "row": {k: (str(v) if isinstance(v, dt.datetime) else v)
                                                        for k, v in r.items()}}, ensure_ascii=True)
                 for r in rows]
        data = ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
        storage.write_bytes(self.fs, storage.join(self.root, "_dead_letter", name + ".jsonl"), data)
        self.dead_lettered += len(rows)
        print(f"[serve] {len(rows)} feedback row(s) could not be written ({reason}): kept in "
              f"{storage.join(self.root, '_dead_letter', name + '.jsonl')}", flush=True)

    def close(self) -> int:
        return self.flush()
