"""The served and feedback logs: nothing acknowledged before it is on storage (group commit),
feedback for an answer the server forgot written as an event, and `prepare` joining those
events to the served log by id."""

import asyncio
import datetime as dt

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from bco_ray import storage
from bco_ray.config import StorageConfig, load_config
from bco_ray.data.normalise import new_completion_id, served_day
from bco_ray.serve.feedback_log import FeedbackWriter, UnknownCompletion


def _log(root, served=False):
    path = root / "_served" if served else root
    if not path.exists():
        return []
    return pads.dataset(str(path), format="parquet", partitioning="hive", ignore_prefixes=["_", "."]).to_table().to_pylist()


def _count(path):
    return sum(pq.ParquetFile(f).metadata.num_rows for f in path.rglob("*.parquet"))


def test_ids_carry_their_serve_day_and_foreign_ids_are_refused(tmp_path):
    cid = new_completion_id("chatcmpl")
    assert served_day(cid) == dt.datetime.now(dt.UTC).date().isoformat()
    assert served_day("chatcmpl-nope") is None and served_day("cmpl-20261399-" + "0" * 32) is None
    w = FeedbackWriter(str(tmp_path), StorageConfig())
    with pytest.raises(UnknownCompletion):
        w.feedback("chatcmpl-nope", True)
    with pytest.raises(IndexError):
        w.feedback(cid, True, index=500)


def test_rows_are_acknowledged_only_once_committed_and_a_forgotten_answer_becomes_an_event(tmp_path):
    w = FeedbackWriter(str(tmp_path), StorageConfig(), max_served=2)
    ids = [new_completion_id("cmpl") for _ in range(3)]
    seqs = [w.record(cid, f"prompt {i}", [f"a{i}", f"b{i}"], "m", "v1") for i, cid in enumerate(ids)]
    assert seqs == [2, 4, 6] and w.committed == 0 and _log(tmp_path, served=True) == []
    assert w.commit() == 6 and len(_log(tmp_path, served=True)) == 6  # one row per choice
    served = _log(tmp_path, served=True)
    assert {(r["completion_id"], r["choice_index"], r["completion"]) for r in served} == {
        (cid, j, f"{'ab'[j]}{i}") for i, cid in enumerate(ids) for j in (0, 1)}
    assert {r["date"] for r in served} == {served_day(ids[0])}  # partitioned by the id's day

    whole, seq = w.feedback(ids[2], True, index=1)  # remembered: written whole
    event, seq2 = w.feedback(ids[0], False, "late")  # forgotten (max_served 2): an event
    assert (seq, seq2) == (7, 8) and whole["completion"] == "b2" and whole["prompt"] == "prompt 2"
    assert event["prompt"] is None and event["completion"] is None and event["label"] == "thumbs_down"
    assert w.commit() == 8
    rows = sorted(_log(tmp_path), key=lambda r: r["completion_id"] == ids[0])
    assert [r["completion"] for r in rows] == ["b2", None] and rows[1]["comment"] == "late"


def test_a_storage_outage_keeps_every_row_and_delays_the_acknowledgements(tmp_path, monkeypatch):
    """The Serve deployment's logic, in process: requests wait for their group commit; with
    storage down they get False (503) after the timeout, and their rows are written once it is back."""
    from bco_ray.serve.log_replica import FeedbackLog

    cls = FeedbackLog.func_or_class
    real = storage.write_parquet_atomic
    down = {"on": False, "failed": 0}

    def flaky(*a, **k):
        if down["on"]:
            down["failed"] += 1
            raise OSError("connection refused (the S3 server is stopped)")
        return real(*a, **k)

    monkeypatch.setattr(storage, "write_parquet_atomic", flaky)

    async def run():
        # a 2 s commit timeout: a first write can take over 0.5 s on a loaded 2-core machine
        # (both test lanes and their Ray clusters), which failed all(acks) once
        log = cls(str(tmp_path), {}, 0.02, 2.0, 1000)
        ids = [new_completion_id("chatcmpl") for _ in range(40)]
        # 40 concurrent requests: all acknowledged, in a few group commits, not 40 files
        acks = await asyncio.gather(*(log.record(cid, [{"role": "user", "content": "hi"}], ["yo"], "m", "v")
                                      for cid in ids))
        assert all(acks)
        files = len(list((tmp_path / "_served").rglob("*.parquet")))
        assert 1 <= files < 40, files
        fb = await log.feedback(ids[0], True, None, 0, "k")
        assert fb == {"ok": True, "label": "thumbs_up", "joined": True}
        down["on"] = True
        late = await asyncio.gather(log.record(new_completion_id("cmpl"), "q", ["a"], "m", "v"),
                                    log.feedback(ids[1], False, None, 0, "k"))
        assert late == [False, {"error": "storage"}] and down["failed"] > 3  # retried, not dropped
        down["on"] = False
        for _ in range(100):  # the retries land within a commit or two; 10 s at most under load
            if log.writer.pending() == 0:
                break
            await asyncio.sleep(0.1)
        assert log.writer.pending() == 0
        log.committer.cancel()

    asyncio.run(run())
    assert _count(tmp_path / "_served") == 41 and _count(tmp_path) - 41 == 2


@pytest.mark.ray
def test_prepare_joins_feedback_events_to_the_served_log(ray_local, tmp_path):
    """A server restarted (or feedback days later): the events join their answers by id; an
    event for an id never served is quarantined with its reason; the count holds."""
    from bco_ray.data.ingest import prepare

    log = tmp_path / "log"
    first = FeedbackWriter(str(log), StorageConfig())
    chat, text, lost = new_completion_id("chatcmpl"), new_completion_id("cmpl"), new_completion_id("cmpl")
    first.record(chat, [{"role": "user", "content": "Tell me a joke"}], ["A pun.", "A long story."], "m", "v1")
    first.record(text, "The capital of France is", ["Paris."], "m", "v1")
    first.feedback(text, True, caller="k1")  # while remembered: whole
    first.commit()
    again = FeedbackWriter(str(log), StorageConfig())  # the restarted server remembers nothing
    again.feedback(chat, True, "funny", 0, "k1")
    again.feedback(chat, False, None, 1, "k1")
    again.feedback(chat, True, None, 1, "k1")  # the same caller's later vote wins
    again.feedback(lost, False, caller="k2")  # an id of ours, but never in the served log
    again.commit()
    assert sum(r["completion"] is None for r in _log(log)) == 4

    cfg = load_config(None, ["--model.policy", "tiny-llama", "--udm.enabled", "false", "--ingest.input", str(log),
                             "--ingest.eval_fraction", "0", "--run.run_dir", str(tmp_path / "run")])
    m = prepare(cfg)
    assert m["rows_read"] == 5 and m["served_join"]["events"] == 4 and m["served_join"]["served_files"] == 2
    assert (m["kept"], m["deduplicated"], m["quarantined"]) == (3, 1, 1), m
    assert m["quarantine_reasons"] == {"completion_not_served": 1}
    rows = pads.dataset(str(tmp_path / "run" / "prepared" / "data")).to_table().to_pylist()
    got = {r["completion"]: (r["label"], r["prompt"], r["prompt_messages"] is not None) for r in rows}
    assert got == {"A pun.": (True, "Tell me a joke", True), "A long story.": (True, "Tell me a joke", True),
                   "Paris.": (True, "The capital of France is", False)}
    (q,) = pads.dataset(str(tmp_path / "run" / "prepared" / "quarantine")).to_table().to_pylist()
    assert q["reason"] == "completion_not_served" and lost in q["raw"]
