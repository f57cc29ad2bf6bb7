"""Synthetic production feedback logs: reproducible, production schema, some dirt.

    python -m bco_ray.data.demo_data --out data/demo_feedback --rows 2000 --seed 0

Layout and schema are those of a product's logs: hive partitions `date=YYYY-MM-DD/`, columns
request_id, ts, model_version, prompt, completion, feedback (thumbs_up / thumbs_down in
several spellings). Answers are helpful or unhelpful; helpful ones get mostly thumbs-up.
`shift` makes some topics draw more thumbs-down regardless of the answer, so thumbs-up and
thumbs-down prompts come from different topic distributions (what UDM corrects).
`dirty` rows exercise every quarantine reason; `variants` adds files in the paired and
conversational schemas, a file whose prompt column is an integer, and one of raw bytes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TOPICS = {
    "cooking": ["How do I make {x}?", "What goes well with {x}?", "Can I freeze {x}?"],
    "travel": ["What should I see in {x}?", "When is the best time to visit {x}?", "Is {x} safe for tourists?"],
    "programming": ["How do I reverse a list in {x}?", "Why is my {x} code slow?", "How do I read a file in {x}?"],
    "finance": ["Should I invest in {x}?", "How are {x} taxed?", "What are the risks of {x}?"],
    "health": ["Is {x} good for me?", "How much {x} is too much?", "What are the side effects of {x}?"],
    "music": ["Who are the best {x} artists?", "How do I learn {x} guitar?", "What is the history of {x}?"],
}
SUBJECTS = {
    "cooking": ["risotto", "banana bread", "pho", "pancakes", "hummus", "paella", "ramen", "falafel",
                "lasagna", "sourdough"],
    "travel": ["Lisbon", "Kyoto", "Patagonia", "Iceland", "Marrakech", "Hanoi", "Oaxaca", "Tbilisi",
               "Cape Town", "Vancouver"],
    "programming": ["Python", "Rust", "Go", "JavaScript", "C++", "Java", "Kotlin", "Haskell", "Ruby", "Swift"],
    "finance": ["index funds", "bonds", "stock options", "crypto", "REITs", "gold", "annuities",
                "savings accounts", "ETFs", "pension funds"],
    "health": ["coffee", "ibuprofen", "fasting", "creatine", "melatonin", "vitamin D", "running",
               "saunas", "green tea", "protein shakes"],
    "music": ["jazz", "blues", "flamenco", "bossa nova", "funk", "reggae", "soul", "tango", "bluegrass",
              "gospel"],
}
CONTEXTS = ["", " I'm a beginner.", " Please keep it short.", " Asking for my family.", " I have 10 minutes.",
            " Explain like I'm five.", " I tried before and failed.", " Thanks!", " Be honest.",
            " My friend disagrees with me.", " Answer in detail.", " Quick question."]
HELPFUL = [
    "Good question about {x}. Here is a clear answer in three steps: first, {a}; second, {b}; third, check the result.",
    "Sure! For {x}, the short answer is {a}. If you want more detail, {b}.",
    "Here's what I'd suggest for {x}: {a}. A common mistake is to skip this: {b}.",
]
UNHELPFUL = [
    "I don't know.",
    "That is a silly question about {x}.",
    "{x}? Search the internet.",
    "As an AI I cannot help with {x}.",
]
TIPS = ["start simple", "measure before changing anything", "use good ingredients", "ask a local",
        "read the official documentation", "compare several sources", "take it slowly", "plan ahead"]
UP = ["thumbs_up", "up", "1", "true", "\U0001f44d", "positive"]
DOWN = ["thumbs_down", "down", "0", "false", "\U0001f44e", "-1"]
SHIFTED = ("finance", "health")  # topics users thumb down more when shift > 0


def synth_rows(n: int, seed: int = 0, shift: float = 0.0, p_helpful: float = 0.5,
               start: dt.datetime | None = None, days: int = 3, unique: bool = False, repeat: float = 0.0) -> dict:
    """n clean rows as columns. Returns also `topic` and `helpful` (ground truth, for tests).
    unique: append a per-request detail so no two prompts repeat (benchmarks); repeat: with
    unique, this share of the rows asks again the prompt of a uniformly drawn earlier row."""
    rng = np.random.default_rng(seed)
    topics = list(TOPICS)
    t = rng.integers(0, len(topics), n)
    q = rng.integers(0, 3, n)
    s = rng.integers(0, 10, n)
    ctx = rng.integers(0, len(CONTEXTS), n)
    ident = np.arange(n)
    if repeat:  # a repeat asks the earlier row's question: its topic, wording, subject and detail
        earlier = (rng.random(n) * np.arange(n)).astype(int)
        for i in np.flatnonzero(rng.random(n) < repeat)[1:] if n > 1 else []:
            j = earlier[i]
            t[i], q[i], s[i], ctx[i], ident[i] = t[j], q[j], s[j], ctx[j], ident[j]
    helpful = rng.random(n) < p_helpful
    a, b = rng.integers(0, len(TIPS), n), rng.integers(0, len(TIPS), n)
    hv, uv = rng.integers(0, len(HELPFUL), n), rng.integers(0, len(UNHELPFUL), n)
    p_up = np.where(helpful, 0.9, 0.1)
    shifted = np.isin(np.array(topics)[t], SHIFTED)
    p_up = np.where(shifted, p_up * (1 - shift), p_up + (1 - p_up) * shift * 0.5)
    up = rng.random(n) < p_up
    spell = rng.integers(0, len(UP), n)
    start = start or dt.datetime(2026, 11, 1)
    prompts, completions, feedback, ts = [], [], [], []
    for i in range(n):
        topic = topics[t[i]]
        x = SUBJECTS[topic][s[i]]
        detail = f" (Order #{seed}-{ident[i]}.)" if unique else ""
        prompts.append(TOPICS[topic][q[i]].format(x=x) + CONTEXTS[ctx[i]] + detail)
        tpl = HELPFUL[hv[i]] if helpful[i] else UNHELPFUL[uv[i]]
        completions.append(tpl.format(x=x, a=TIPS[a[i]], b=TIPS[b[i]]))
        feedback.append((UP if up[i] else DOWN)[spell[i]])
        ts.append(start + dt.timedelta(seconds=int(i * days * 86400 / max(n, 1))))
    return {"request_id": [f"req-{seed}-{i:08d}" for i in range(n)], "ts": ts,
            "model_version": ["smollm2-135m-instruct@2026-10"] * n, "prompt": prompts,
            "completion": completions, "feedback": feedback,
            "topic": [topics[i] for i in t], "helpful": helpful.tolist(), "thumbs_up": up.tolist()}


def add_dirt(cols: dict, seed: int, fraction: float) -> dict:
    """Replace ~fraction of rows with each kind of dirt, and append duplicates and conflicts."""
    rng = np.random.default_rng(seed + 1)
    n = len(cols["prompt"])
    kinds = ["null_prompt", "empty_completion", "null_label", "unknown_label", "whitespace_prompt",
             "oversize", "duplicate", "conflict"]
    picks = rng.choice(n, size=min(n, int(n * fraction)), replace=False)
    extra = {k: [] for k in cols}
    for j, i in enumerate(picks):
        kind = kinds[j % len(kinds)]
        if kind == "null_prompt":
            cols["prompt"][i] = None
        elif kind == "empty_completion":
            cols["completion"][i] = ""
        elif kind == "null_label":
            cols["feedback"][i] = None
        elif kind == "unknown_label":
            cols["feedback"][i] = "meh"
        elif kind == "whitespace_prompt":
            cols["prompt"][i] = "   \n "
        elif kind == "oversize":
            cols["completion"][i] = "very long answer " * 15_000  # 255k characters
        else:
            for k in cols:
                extra[k].append(cols[k][i])
            if kind == "conflict":
                flipped = "thumbs_down" if cols["thumbs_up"][i] else "thumbs_up"
                extra["feedback"][-1] = flipped
                extra["thumbs_up"][-1] = not cols["thumbs_up"][i]
                extra["request_id"][-1] += "-again"
    return {k: list(cols[k]) + extra[k] for k in cols}


LOG_COLUMNS = ["request_id", "ts", "model_version", "prompt", "completion", "feedback"]


def write_log(out: str, rows: int, seed: int = 0, shift: float = 0.0, dirty: float = 0.0,
              days: int = 3, files_per_day: int = 2, variants: bool = False, filesystem=None,
              row_group_size: int = 50_000, unique: bool = False, repeat: float = 0.0) -> dict:
    """Write a partitioned log under `out` (local path, or a path inside `filesystem`)."""
    cols = synth_rows(rows, seed, shift, days=days, unique=unique, repeat=repeat)
    if dirty:
        cols = add_dirt(cols, seed, dirty)
    n = len(cols["prompt"])
    start = dt.date(2026, 11, 1)
    fs = filesystem
    table = pa.table({k: cols[k] for k in LOG_COLUMNS})
    parts = days * files_per_day
    bounds = np.linspace(0, n, parts + 1).astype(int)
    for p in range(parts):
        day = start + dt.timedelta(days=p // files_per_day)
        path = f"{out}/date={day.isoformat()}/part-{p % files_per_day:03d}.parquet"
        if fs is None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        else:
            fs.create_dir(os.path.dirname(path), recursive=True)
        pq.write_table(table.slice(bounds[p], bounds[p + 1] - bounds[p]), path, filesystem=fs,
                       row_group_size=row_group_size)
    written = {"rows": n, "files": parts}
    if variants:
        written["rows"] += _write_variants(out, seed, fs)
    return written


def _write_variants(out: str, seed: int, fs) -> int:
    """Files in the other schemas a user may have, and two with wrongly typed columns."""
    day = f"{out}/date=2026-11-03"
    if fs is None:
        os.makedirs(day, exist_ok=True)
    tables = {
        "paired.parquet": pa.table({
            "prompt": ["How do I make risotto?", "Is coffee good for me?", None],
            "chosen": ["Toast the rice, add warm stock slowly, stir.", "In moderation, yes.", "x"],
            "rejected": ["I don't know.", "Search the internet.", "y"]}),
        "chat.parquet": pa.table({
            "messages": [
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Best time to visit Kyoto?"},
                 {"role": "assistant", "content": "Spring or autumn."}],
                [{"role": "user", "content": "How do I learn jazz guitar?"},
                 {"role": "assistant", "content": "I don't know."}],
                [{"role": "user", "content": "No answer here"}]],
            "feedback": ["thumbs_up", "thumbs_down", "thumbs_up"]}),
        "typed.parquet": pa.table({"prompt": [1, 2], "completion": ["a", "b"], "feedback": ["up", "down"]}),
        "bytes.parquet": pa.table({"prompt": pa.array([b"\xff\xfe not utf-8", b"fine prompt"],
                                                       pa.binary()),
                                   "completion": ["a", "fine answer"], "feedback": ["up", "down"]}),
    }
    for name, t in tables.items():
        pq.write_table(t, f"{day}/{name}", filesystem=fs)
    return sum(t.num_rows for t in tables.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift", type=float, default=0.6)
    p.add_argument("--dirty", type=float, default=0.03)
    p.add_argument("--days", type=int, default=3)
    p.add_argument("--no-variants", action="store_true")
    a = p.parse_args()
    info = write_log(a.out, a.rows, a.seed, a.shift, a.dirty, a.days, variants=not a.no_variants)
    print(f"wrote {info['rows']} rows in {info['files']} files under {a.out}")


if __name__ == "__main__":
    main()
