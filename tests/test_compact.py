"""`bco-ray compact`: the feedback log's small files merged per day and kind, no row lost,
a crash at any step recovered by the next run."""

import json
import shutil

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from bco_ray.config import StorageConfig, load_config
from bco_ray.data import compact as cp
from bco_ray.serve.feedback_log import FeedbackWriter


def _write_log(root, days=("2026-11-01", "2026-11-02"), per_day=12):
    """What the server writes at one request per group commit: a file a row in each log
    (feedback, and the served log under _served/), text and chat prompts."""
    for day in days:
        w = FeedbackWriter(str(root / "tmp"), StorageConfig())
        for i in range(per_day):
            prompt = [{"role": "user", "content": f"q{i}"}] if i % 3 == 0 else f"q{i} on {day}"
            w.record(f"{day}-c{i}", prompt, [f"a{i}"], "m", "v1")
            w.commit()
            w.feedback(f"{day}-c{i}", i % 2 == 0, caller=f"k{i % 4}")
            w.commit()
        (today,) = [p for p in (root / "tmp").iterdir() if p.name.startswith("date=")]
        shutil.move(str(today), str(root / f"date={day}"))
        (served,) = (root / "tmp" / "_served").iterdir()
        (root / "_served").mkdir(exist_ok=True)
        shutil.move(str(served), str(root / "_served" / f"date={day}"))
        shutil.rmtree(root / "tmp")
    # A file from before the caller column existed, one that is not ours, one a crash garbled.
    old = pa.table({"prompt": ["old q"], "completion": ["old a"], "label": ["thumbs_up"], "completion_id": ["old-c"],
                    "choice_index": pa.array([0], pa.int32()), "model": ["m"], "model_version": ["v0"],
                    "comment": pa.array([None], pa.string()),
                    "served_at": pa.array([0], pa.timestamp("ms", tz="UTC")),
                    "feedback_at": pa.array([0], pa.timestamp("ms", tz="UTC"))})
    pq.write_table(old, root / f"date={days[0]}" / "feedback-20261101T000000-0000aaaa-text.parquet")
    pq.write_table(old, root / f"date={days[0]}" / "users-own-export.parquet")
    if len(days) > 1:
        (root / f"date={days[1]}" / "feedback-20261102T000000-0000bbbb-text.parquet").write_bytes(b"PAR1 garbage")


def _rows(root):
    """Every readable row of the log (the garbled file aside), as sorted JSON lines."""
    out = []
    for f in sorted(root.rglob("*.parquet")):
        if "garbage" in f.read_bytes()[:20].decode("latin1"):
            continue
        for r in pq.read_table(f).to_pylist():
            out.append(json.dumps({k: str(v) for k, v in sorted(r.items()) if v is not None}, sort_keys=True))
    return sorted(out)


def test_plan_and_merge_keep_every_row_and_touch_nothing_else(tmp_path):
    root = tmp_path / "log"
    _write_log(root)
    before, files_before = _rows(root), len(list(root.rglob("*.parquet")))
    fs, path = cp.storage.filesystem(str(root), StorageConfig())
    groups, unreadable = cp.plan(fs, path, "2026-11-02", max_rows=1_000_000, min_files=2)
    # Only the day before `until`; each log apart, chat and text apart; the foreign file is no input.
    assert {(g["log"], g["day"], g["kind"]) for g in groups} == {
        (log, "2026-11-01", kind) for log in ("", "_served") for kind in ("text", "chat")}
    assert sum(len(g["inputs"]) for g in groups) == 2 * 12 + 1 and not unreadable
    for g in groups:
        cp.compact_group(fs, path, g)
    assert _rows(root) == before  # the same rows, the old file's missing caller as null
    day1 = sorted(p.name for p in (root / "date=2026-11-01").iterdir())
    assert len(day1) == 3 and "users-own-export.parquet" in day1
    assert not list((root / cp.JOURNALS).glob("*.json"))
    assert len(list(root.rglob("*.parquet"))) == files_before - 25 + 4
    assert len(list((root / "_served" / "date=2026-11-01").iterdir())) == 2

    # The next day, once `until` passes it: its garbled file is reported and left where it is.
    groups, unreadable = cp.plan(fs, path, "2026-12-01", 1_000_000, 2)
    assert [u["path"].rsplit("/", 1)[-1] for u in unreadable] == ["feedback-20261102T000000-0000bbbb-text.parquet"]
    assert {g["day"] for g in groups} == {"2026-11-02"}  # day 1 is one file per kind now: nothing to do
    # max_rows_per_file splits a day into files of at most that many rows
    groups, _ = cp.plan(fs, path, "2026-12-01", 3, 2)
    assert all(sum(n for _, n in g["inputs"]) <= 3 for g in groups) and len(groups) >= 3


def test_a_crash_at_any_step_is_finished_or_undone_by_the_next_run(tmp_path):
    root = tmp_path / "log"
    _write_log(root, days=("2026-11-01",))
    before = _rows(root)
    fs, path = cp.storage.filesystem(str(root), StorageConfig())
    (g, *_), _ = cp.plan(fs, path, "2026-11-02", 1_000_000, 2)
    keep = tmp_path / "inputs"
    keep.mkdir()
    for p, _ in g["inputs"]:
        shutil.copy(p, keep)
    cp.compact_group(fs, path, g)
    # Crash after the merged file was committed, before its inputs were deleted: both are there.
    for p, _ in g["inputs"]:
        shutil.copy(keep / p.rsplit("/", 1)[-1], p)
    journal = root / cp.JOURNALS / (cp.output_name(g) + ".json")
    journal.write_text(json.dumps({"output": f"{path}/date=2026-11-01/{cp.output_name(g)}",
                                   "rows": sum(n for _, n in g["inputs"]), **g}))
    assert len(_rows(root)) > len(before)
    (done,) = cp.finish_journals(fs, path)
    assert done["files"] == len(g["inputs"]) and _rows(root) == before and not journal.exists()
    # Crash after the journal, before the merged file: the journal goes and no row moves (the
    # inputs, still in place, are planned again by the next run).
    journal.write_text(json.dumps({"output": f"{path}/date=2026-11-01/compacted-never-written-text.parquet",
                                   "day": "2026-11-01", "kind": "text", "inputs": [], "rows": 0}))
    assert cp.finish_journals(fs, path) == [] and not journal.exists() and _rows(root) == before


@pytest.mark.ray
def test_bco_ray_compact_on_the_cluster(ray_local, tmp_path):
    root = tmp_path / "log"
    _write_log(root)
    before = _rows(root)
    cfg = load_config(None, ["--compact.input", str(root), "--compact.until", "2026-12-01",
                             "--run.run_dir", str(tmp_path / "run")])
    report = cp.compact(cfg)
    # 2 days x 12 rows x 2 logs, and the old file; per day and log, one file per kind
    assert report["files_in"] == 12 * 4 + 1 and report["files_out"] == 8 and report["rows"] == 12 * 4 + 1
    assert len(report["unreadable"]) == 1 and _rows(root) == before
    assert json.loads((root / cp.JOURNALS / "last.json").read_text())["rows"] == report["rows"]
    # prepare reads the compacted log as it read the small files
    ds = pads.dataset(str(root), format="parquet", partitioning="hive",
                      exclude_invalid_files=True, ignore_prefixes=["_", ".", "users-"])
    assert ds.count_rows() == 12 * 2 + 1  # the feedback log's rows (the served log's are under _served/)
    with pytest.raises(Exception, match="not a date"):
        cp.compact(load_config(None, ["--compact.input", str(root), "--compact.until", "December"]))
