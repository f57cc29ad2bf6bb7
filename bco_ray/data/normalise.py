"""Raw feedback rows -> normalised examples or quarantine rows with a reason. Pure Python.

Every raw row yields one output row per example (two for a paired row), each either
`status="ok"` or `status="quarantined"` with a reason code from REASONS and the original
row as JSON, so nothing is ever dropped silently.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import math
import re
import uuid
from collections.abc import Iterable

import pyarrow as pa

from bco_ray.config import IngestConfig

REASONS = {
    "unknown_schema": "the file has none of the configured column sets (unpaired, paired, conversational)",
    "missing_prompt": "prompt is null",
    "missing_completion": "completion is null",
    "missing_label": "label is null or NaN",
    "unknown_label": "label is not in the configured true/false vocabularies",
    "empty_prompt": "prompt is empty or whitespace",
    "empty_completion": "completion is empty or whitespace",
    "bad_type": "a field has a type that cannot be text (number, map, ...)",
    "invalid_utf8": "a field holds bytes that are not valid UTF-8",
    "bad_messages": "chat messages are malformed (roles, contents, no final assistant turn, no user turn)",
    "oversize": "prompt + completion exceed ingest.max_chars characters",
    "prompt_too_long": "the templated prompt exceeds ingest.max_prompt_length tokens",
    "control_token_in_content": "a message spells a control token and the chat template rewrites content",
    "conflicting_labels": "the same (prompt, completion) has both labels (ingest.conflicts)",
    "unreadable_row_group": "the row group's pages cannot be decoded (a corrupt file whose footer reads)",
    "completion_not_served": "feedback for a completion id that the served log (_served/ of its day) does not hold",
}

ROLES = {"system", "user", "assistant", "tool", "developer"}

NORMALISED_SCHEMA = pa.schema([
    ("row_id", pa.string()), ("source", pa.string()), ("day", pa.string()),
    ("status", pa.string()), ("reason", pa.string()), ("raw", pa.string()),
    ("prompt", pa.string()), ("prompt_messages", pa.string()), ("completion", pa.string()),
    ("label", pa.bool_()), ("pair_id", pa.string()), ("pair_key", pa.int64()),
    ("vote_key", pa.string()), ("voted_at", pa.string()),
    # a feedback event's answer in the served log (status 'pending' until `prepare` joins it)
    ("served_key", pa.string()),
])

# The serve stage's feedback log (bco_ray/serve/feedback_log.py) names each vote: one per
# (completion, choice, caller) counts, the latest, so one client replaying its thumbs cannot
# out-vote the others on an answer. Logs without these columns have no vote keys.
VOTE_COLUMNS = ("completion_id", "choice_index", "caller", "feedback_at")


def vote_of(row: dict) -> tuple[str | None, str | None]:
    """(vote key, time) of a raw row of the serve log; (None, None) for any other log."""
    cid = row.get("completion_id")
    if not isinstance(cid, str) or not cid:
        return None, None
    at = row.get("feedback_at")
    return f"{served_key(cid, row.get('choice_index'))}\x1f{row.get('caller') or ''}", \
        (at.isoformat() if hasattr(at, "isoformat") else None if at is None else str(at))


SERVED = "_served"  # under the feedback log: `prepare` and log readers skip names starting with _
# The ids the server issues: the serve day, then 32 hex digits.
COMPLETION_ID = re.compile(r"^(?:chatcmpl|cmpl)-(\d{8})-[0-9a-f]{32}$")


def new_completion_id(prefix: str) -> str:
    return f"{prefix}-{dt.datetime.now(dt.UTC):%Y%m%d}-{uuid.uuid4().hex}"


def served_day(completion_id: str) -> str | None:
    """The serve day (YYYY-MM-DD) an id of ours carries; None for any other string."""
    m = COMPLETION_ID.match(completion_id)
    if not m:
        return None
    d = m.group(1)
    try:
        return dt.date(int(d[:4]), int(d[4:6]), int(d[6:])).isoformat()
    except ValueError:
        return None


def served_key(completion_id: str, index) -> str:
    return f"{completion_id}\x1f{index or 0}"


def event_of(row: dict, cfg: IngestConfig) -> str | None:
    """The served-log key of a feedback event: feedback the server wrote without its answer
    (it no longer remembered it), so no prompt and no completion. None for any other row."""
    cid = row.get("completion_id")
    if not isinstance(cid, str) or not cid:
        return None
    if row.get(cfg.prompt_column) is not None or row.get(cfg.completion_column) is not None:
        return None
    return served_key(cid, row.get("choice_index"))


_MODIFIERS = re.compile("[\U0001f3fb-\U0001f3ff\ufe0f]")  # emoji skin tones, variation selector


class Reject(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class LabelVocab:
    """Maps any spelling of a thumbs-up / thumbs-down to True / False."""

    def __init__(self, true_labels: Iterable[str], false_labels: Iterable[str]):
        self.true = {self._key(x) for x in true_labels}
        self.false = {self._key(x) for x in false_labels}
        both = self.true & self.false
        if both:
            raise ValueError(f"label spellings in both vocabularies: {sorted(both)}")

    @staticmethod
    def _key(text: str) -> str:
        return _MODIFIERS.sub("", str(text)).strip().lower()

    def __call__(self, value) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise Reject("missing_label")
        if isinstance(value, bool):
            return value
        if isinstance(value, int | float):
            if value == 1:
                return True
            if value in (0, -1):
                return False
            raise Reject("unknown_label")
        if isinstance(value, bytes):
            value = _text_or_reject(value, "label")
        if isinstance(value, str):
            key = self._key(value)
            if key in self.true:
                return True
            if key in self.false:
                return False
            if key == "":
                raise Reject("missing_label")
        raise Reject("unknown_label")


def _text_or_reject(value, field: str) -> str:
    if value is None:
        raise Reject(f"missing_{field}")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise Reject("invalid_utf8") from None
    if not isinstance(value, str):
        raise Reject("bad_type")
    return value


def text_field(value, field: str) -> str:
    text = _text_or_reject(value, field)
    if not text.strip():
        raise Reject(f"empty_{field}")
    return text


def _messages(value) -> list[dict]:
    """A list of {role, content} from a list or a JSON string; Reject('bad_messages') else."""
    if isinstance(value, str | bytes):
        try:
            value = json.loads(_text_or_reject(value, "prompt"))
        except json.JSONDecodeError:
            raise Reject("bad_messages") from None
    if not isinstance(value, list | tuple) or not value:
        raise Reject("bad_messages")
    out = []
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise Reject("bad_messages")
        content = m.get("content")
        if isinstance(content, bytes):
            content = _text_or_reject(content, "prompt")
        if not isinstance(content, str):
            raise Reject("bad_messages")
        out.append({"role": m["role"], "content": content})
    return out


def _completion_text(value) -> str:
    """Plain text, or the last assistant turn of a message list (TRL's conversational form)."""
    if isinstance(value, list | tuple):
        msgs = _messages(value)
        if msgs[-1]["role"] != "assistant":
            raise Reject("bad_messages")
        value = msgs[-1]["content"]
    return text_field(value, "completion")


def _prompt(value) -> tuple[str, str | None]:
    """(plain text, messages JSON or None). A list prompt is chat messages."""
    if isinstance(value, list | tuple):
        msgs = _messages(value)
        if not any(m["role"] == "user" for m in msgs):
            raise Reject("bad_messages")
        text = "\n".join(m["content"] for m in msgs if m["role"] != "system")
        if not text.strip():
            raise Reject("empty_prompt")
        return text, json.dumps(msgs, ensure_ascii=False)
    return text_field(value, "prompt"), None


def pair_key(prompt: str, prompt_messages: str | None, completion: str) -> int:
    h = hashlib.blake2b(digest_size=8)
    for part in (prompt_messages or prompt, completion):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "big", signed=True)


def _json_default(x):
    if isinstance(x, bytes):
        return {"base64": base64.b64encode(x).decode()}
    if isinstance(x, dt.datetime | dt.date | dt.time):
        return x.isoformat()
    return repr(x)


def raw_json(row: dict) -> str:
    def clean(v):  # JSON has no NaN: keep it readable and valid
        return "NaN" if isinstance(v, float) and math.isnan(v) else v
    return json.dumps({k: clean(v) for k, v in row.items()}, ensure_ascii=False, default=_json_default)


def detect_format(columns: Iterable[str], cfg: IngestConfig) -> str | None:
    cols = set(columns)
    if cfg.format != "auto":
        return cfg.format
    if {cfg.prompt_column, cfg.chosen_column, cfg.rejected_column} <= cols:
        return "paired"
    if {cfg.messages_column, cfg.label_column} <= cols:
        return "conversational"
    if {cfg.prompt_column, cfg.completion_column, cfg.label_column} <= cols:
        return "unpaired"
    return None


def _check_size(prompt: str, completion: str, cfg: IngestConfig) -> None:
    if len(prompt) + len(completion) > cfg.max_chars:
        raise Reject("oversize")


def _example(prompt, messages, completion, label) -> dict:
    return {"status": "ok", "reason": None, "raw": None, "prompt": prompt, "prompt_messages": messages,
            "completion": completion, "label": label, "pair_id": None,
            "pair_key": pair_key(prompt, messages, completion)}


def normalise_row(row: dict, fmt: str | None, cfg: IngestConfig, vocab: LabelVocab) -> list[dict]:
    """One raw row -> one or two example dicts (without row_id/source), each ok or rejected."""
    n_out = 2 if fmt == "paired" else 1
    try:
        if fmt is None:
            raise Reject("unknown_schema")
        if fmt == "paired":
            prompt, messages = _prompt(row.get(cfg.prompt_column))
            chosen = _completion_text(row.get(cfg.chosen_column))
            rejected = _completion_text(row.get(cfg.rejected_column))
            _check_size(prompt, max(chosen, rejected, key=len), cfg)
            return [_example(prompt, messages, chosen, True), _example(prompt, messages, rejected, False)]
        if fmt == "conversational":
            msgs = _messages(row.get(cfg.messages_column))
            if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
                raise Reject("bad_messages")
            prompt, messages = _prompt(msgs[:-1])
            completion = text_field(msgs[-1]["content"], "completion")
        else:
            key = event_of(row, cfg)
            if key is not None:  # its answer comes from the served log (`join_served`)
                ex = {"status": "pending", "reason": None, "raw": raw_json(row), "prompt": None,
                      "prompt_messages": None, "completion": None, "label": vocab(row.get(cfg.label_column)),
                      "pair_id": None, "pair_key": None, "served_key": key}
                ex["vote_key"], ex["voted_at"] = vote_of(row)
                return [ex]
            prompt, messages = _prompt(row.get(cfg.prompt_column))
            completion = _completion_text(row.get(cfg.completion_column))
        label = vocab(row.get(cfg.label_column))
        _check_size(prompt, completion, cfg)
        ex = _example(prompt, messages, completion, label)
        ex["vote_key"], ex["voted_at"] = vote_of(row)
        return [ex]
    except Reject as r:
        raw = raw_json(row)
        return [{"status": "quarantined", "reason": r.reason, "raw": raw, "prompt": None,
                 "prompt_messages": None, "completion": None, "label": None, "pair_id": None,
                 "pair_key": None} for _ in range(n_out)]


def complete_event(event: dict, served: dict | None, cfg: IngestConfig, vocab: LabelVocab) -> dict:
    """A pending feedback event with its answer from the served log (prompt text or messages
    JSON, completion), normalised like any row of the log; quarantined when the served log
    has no such answer."""
    keep = {k: event[k] for k in ("row_id", "source", "day")}
    if served is None:
        return {**keep, "status": "quarantined", "reason": "completion_not_served", "raw": event["raw"],
                "prompt": None, "prompt_messages": None, "completion": None, "label": None, "pair_id": None,
                "pair_key": None}
    row = json.loads(event["raw"])
    messages = served.get("s_messages")
    row[cfg.prompt_column] = json.loads(messages) if messages is not None else served.get("s_prompt")
    row[cfg.completion_column] = served.get("s_completion")
    (ex,) = normalise_row(row, "unpaired", cfg, vocab)
    return {**ex, **keep}


def normalise_table(table: pa.Table, source: str, file_id: str, row_group: int,
                    cfg: IngestConfig, vocab: LabelVocab, day: str | None) -> pa.Table:
    """A row group of a raw log file -> NORMALISED_SCHEMA rows (ids stable across reruns)."""
    fmt = detect_format(table.column_names, cfg)
    out = []
    for i, row in enumerate(table.to_pylist()):
        base = f"{file_id}:{row_group}:{i}"
        examples = normalise_row(row, fmt, cfg, vocab)
        for j, ex in enumerate(examples):
            ex["row_id"] = base if len(examples) == 1 else f"{base}/{'cr'[j]}"
            if len(examples) == 2 and ex["status"] == "ok":  # the two halves of a paired row
                ex["pair_id"] = base
            ex["source"], ex["day"] = source, day
            out.append(ex)
    return pa.Table.from_pylist(out, schema=NORMALISED_SCHEMA)


def unreadable_rows(n: int, source: str, file_id: str, row_group: int, day: str | None, error: str) -> pa.Table:
    """The `n` rows of a row group that cannot be decoded, one quarantine row each (the footer
    gave their number), so the accounting stays exact."""
    raw = json.dumps({"path": source, "row_group": row_group, "error": error}, ensure_ascii=False)
    return pa.Table.from_pylist([{"row_id": f"{file_id}:{row_group}:{i}", "source": source, "day": day,
                                  "status": "quarantined", "reason": "unreadable_row_group", "raw": raw}
                                 for i in range(n)], schema=NORMALISED_SCHEMA)


def file_id(path: str) -> str:
    return hashlib.blake2b(path.encode(), digest_size=6).hexdigest()


def resolve_group(rows: list[dict], policy: str) -> list[dict]:
    """Rows sharing (prompt, completion): keep one per decision, mark the rest.

    First one vote per vote key (completion, choice, caller of the serve log): the latest
    counts, the earlier ones become 'deduplicated' (duplicate_of: the latest). Then exact
    duplicates become 'deduplicated' and conflicting labels are resolved by `policy` (see
    IngestConfig.conflicts). Deterministic: rows sorted by row_id.
    """
    rows = sorted(rows, key=lambda r: r["row_id"])
    latest: dict[str, dict] = {}
    for r in rows:
        if r.get("vote_key") is not None:
            best = latest.get(r["vote_key"])
            if best is None or (r.get("voted_at") or "", r["row_id"]) > (best.get("voted_at") or "", best["row_id"]):
                latest[r["vote_key"]] = r
    for r in rows:
        if r.get("vote_key") is not None and latest[r["vote_key"]] is not r:
            r["status"], r["duplicate_of"] = "deduplicated", latest[r["vote_key"]]["row_id"]
    counted = [r for r in rows if r["status"] != "deduplicated"]
    by_label = {True: [r for r in counted if r["label"]], False: [r for r in counted if not r["label"]]}

    def keep_first(group: list[dict]) -> None:
        for r in group[1:]:
            r["status"], r["duplicate_of"] = "deduplicated", group[0]["row_id"]

    def quarantine(group: list[dict]) -> None:
        for r in group:
            r["status"], r["reason"] = "quarantined", "conflicting_labels"

    ups, downs = by_label[True], by_label[False]
    if not ups or not downs or policy == "keep":
        keep_first(ups)
        keep_first(downs)
    elif policy == "majority" and len(ups) != len(downs):
        win, lose = (ups, downs) if len(ups) > len(downs) else (downs, ups)
        keep_first(win)
        quarantine(lose)
    else:
        quarantine(counted)
    return rows
