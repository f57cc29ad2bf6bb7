"""`prepare` on a real local Ray cluster: local files, a real S3 server, UDM, accounting."""

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from bco_ray.config import load_config
from bco_ray.data.demo_data import SHIFTED, write_log
from bco_ray.data.ingest import prepare

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BASE = ["--model.policy", "tiny-llama", "--ingest.label_column", "feedback", "--ingest.max_length", "256",
        "--ingest.max_prompt_length", "200", "--udm.enabled", "true"]  # on here (off by default): what it does


def write_corrupt_pages(path, rows=5) -> int:
    """A parquet file of 2 row groups of `rows` rows whose first group's pages are overwritten:
    its footer reads, that group does not. Returns `rows`."""
    import pyarrow.parquet as pq

    t = pa.table({"prompt": [f"Question {i}?" for i in range(2 * rows)],
                  "completion": [f"Answer {i}." for i in range(2 * rows)], "feedback": ["up", "down"] * rows})
    pq.write_table(t, path, row_group_size=rows, compression="none")
    meta = pq.ParquetFile(path).metadata
    first = min(c.dictionary_page_offset or c.data_page_offset
                for c in (meta.row_group(1).column(j) for j in range(meta.num_columns)))
    data = bytearray(path.read_bytes())
    data[4:first] = b"\xff" * (first - 4)
    path.write_bytes(bytes(data))
    return rows


def read(path, fs=None):
    return pads.dataset(path, filesystem=fs, format="parquet").to_table().to_pylist()


def check_accounting(m):
    assert m["examples"] == m["kept"] + m["quarantined"] + m["deduplicated"]
    assert m["quarantined"] == sum(m["quarantine_reasons"].values())
    assert m["kept"] == sum(m["kept_by_split_label"].values())


def test_demo_log_every_reason_and_exact_accounting(ray_local, tmp_path):
    log = str(tmp_path / "log")
    written = write_log(log, 2000, seed=3, shift=0.8, dirty=0.05, variants=True)
    # What a crashed writer leaves: an empty file, and one whose first row group is garbage.
    (tmp_path / "log" / "crashed-empty.parquet").write_bytes(b"")
    broken_rows = write_corrupt_pages(tmp_path / "log" / "crashed-pages.parquet")
    cfg = load_config(None, BASE + ["--ingest.input", log, "--ingest.eval_fraction", "0.15",
                                    "--run.run_dir", str(tmp_path / "run")])
    m = prepare(cfg)
    out = tmp_path / "run" / "prepared"
    assert m["rows_read"] == written["rows"] + 2 * broken_rows
    assert m["quarantined_files"]["count"] == 1 and m["quarantined_files"]["files"][0]["reason"] == "unreadable_file"
    assert m["quarantine_reasons"]["unreadable_row_group"] == broken_rows
    check_accounting(m)
    assert json.loads((out / "manifest.json").read_text())["kept"] == m["kept"]
    for reason in ("missing_prompt", "empty_completion", "missing_label", "unknown_label", "empty_prompt",
                   "oversize", "bad_type", "invalid_utf8", "bad_messages", "conflicting_labels"):
        assert m["quarantine_reasons"].get(reason, 0) > 0, reason
    data, quarantine = read(str(out / "data")), read(str(out / "quarantine"))
    dedup = read(str(out / "deduplicated"))
    ids = [r["row_id"] for r in data] + [r["row_id"] for r in quarantine] + [r["row_id"] for r in dedup]
    assert len(ids) == len(set(ids)) == m["examples"]  # each example in exactly one place
    assert all(r["raw"] and r["reason"] for r in quarantine)
    row = data[0]
    assert len(row["input_ids"]) == len(row["completion_mask"]) == row["prompt_tokens"] + row["completion_tokens"]
    assert row["completion_mask"][:row["prompt_tokens"]] == [0] * row["prompt_tokens"]
    assert {r["split"] for r in data} == {"train", "eval"}
    assert all(r["weight"] == 1.0 for r in data if r["label"])
    # A chat row and a paired row made it through with their structure.
    assert any(r["prompt_messages"] for r in data) and any(r["pair_id"] for r in data)
    # UDM on shifted logs found the shift, and its weights move thumbs-down prompts toward
    # the thumbs-up prompt distribution (share of the over-thumbed-down topics).
    assert m["udm"]["heldout_auc"] > 0.6, m["udm"]
    assert m["udm"]["applied"] and m["udm"]["decision"].startswith("on:"), m["udm"]
    clf = json.loads((out / "udm" / "classifier.json").read_text())
    assert clf["format"] == "bco-ray-udm-v1" and len(clf["coef"]) == 384
    assert (out / "udm" / "diagnostics.png").read_bytes()[:4] == b"\x89PNG"

    def shifted_share(rows, weighted):
        w = np.array([r["weight"] if weighted else 1.0 for r in rows])
        hit = np.array([any(s in r["prompt"] for s in _shifted_subjects()) for r in rows])
        return float((w * hit).sum() / w.sum())

    up = [r for r in data if r["label"]]
    down = [r for r in data if not r["label"]]
    target = shifted_share(up, False)
    assert abs(shifted_share(down, True) - target) < 0.5 * abs(shifted_share(down, False) - target)
    # This log is under twice the UDM sample, so every prompt was embedded in one pass and the
    # weights came from those embeddings: they are what the weigher (the other path's actor)
    # computes from the same classifier.
    from bco_ray.assets import resolve_model
    from bco_ray.data.udm import UDMWeigher

    assert m["udm"]["embedding_passes"] == 1, m["udm"]
    some = down[:48]
    weigher = UDMWeigher(str(resolve_model(cfg.model.embedder)), (out / "udm" / "classifier.json").read_text())
    got = weigher(pa.table({"prompt": [r["prompt"] for r in some], "label": [False] * len(some)}))
    # rtol: in bf16 (udm.embed_dtype auto where the CPU has it) an embedding moves ~1e-3 with
    # its batch's padding and threads; a weight of the wrong prompt is tens of % off.
    np.testing.assert_allclose(got["weight"].to_numpy(), [r["weight"] for r in some], rtol=5e-3)

    # Rerunning gives the same rows and splits (seeded, hash-based). With a sample under half
    # the log, the weights take the other path: a second embedding pass over the thumbs-down
    # rows in an actor pool (UDMWeigher); they still move the thumbs-down prompts toward the
    # thumbs-up ones. (The same sample size would give the same weights: the one-pass weights
    # are the weigher's, checked above, and the sample is seeded.)
    again = prepare(load_config(None, BASE + ["--ingest.input", log, "--ingest.eval_fraction", "0.15",
                                              "--run.run_dir", str(tmp_path / "run"), "--udm.sample_size", "300",
                                              "--udm.eval_sample_size", "200"]))
    assert {k: again[k] for k in ("kept", "quarantined", "deduplicated")} == \
        {k: m[k] for k in ("kept", "quarantined", "deduplicated")}
    assert again["udm"]["applied"] and again["udm"]["embedding_passes"] == 2, again["udm"]
    assert 0 < again["udm"]["distinct_down_prompts"] <= again["udm"]["down_rows"]  # each distinct prompt once
    data2 = read(str(out / "data"))
    assert {r["row_id"]: r["split"] for r in data2} == {r["row_id"]: r["split"] for r in data}
    assert all(r["weight"] == 1.0 for r in data2 if r["label"])
    down2 = [r for r in data2 if not r["label"]]
    assert abs(shifted_share(down2, True) - target) < 0.5 * abs(shifted_share(down2, False) - target)


def _shifted_subjects():
    from bco_ray.data.demo_data import SUBJECTS
    return [s for t in SHIFTED for s in SUBJECTS[t]]


def test_unshifted_logs_give_auc_near_half_and_weights_near_one(ray_local, tmp_path):
    log = str(tmp_path / "log")
    write_log(log, 1500, seed=5, shift=0.0)
    m = prepare(load_config(None, BASE + ["--ingest.input", log, "--run.run_dir", str(tmp_path / "run")]))
    check_accounting(m)
    assert abs(m["udm"]["heldout_auc"] - 0.5) < 0.12, m["udm"]
    # No shift shown (the AUC's lower bound is under udm.min_auc): the weights are not applied.
    assert m["udm"]["applied"] is False and "below udm.min_auc" in m["udm"]["decision"], m["udm"]
    assert m["udm"]["thumbs_down_weight"]["mean"] == 1.0, m["udm"]
    # The weights it withheld (what udm.min_auc null applies, through the same UDMWeigher):
    # noise spread around 1, not a correction.
    from bco_ray.assets import minilm_dir
    from bco_ray.data.udm import UDMWeigher

    prepared = tmp_path / "run" / "prepared"
    table = pads.dataset(str(prepared / "data"), format="parquet").to_table(columns=["prompt", "label"])
    weigher = UDMWeigher(str(minilm_dir()), (prepared / "udm" / "classifier.json").read_text())
    w = weigher(table.slice(0, 600))
    down = [x for x, up in zip(w["weight"].to_pylist(), w["label"].to_pylist(), strict=True) if not up]
    assert len(down) > 100 and 0.75 < sum(down) / len(down) < 1.35 and len(set(down)) > 10, down[:20]


def test_s3_partitioned_logs_date_filter_and_s3_outputs(ray_local, s3_endpoint, tmp_path):
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint.removeprefix("http://"), scheme="http",
                           access_key="testing", secret_key="testing", region="us-east-1")
    written = write_log("logs/feedback", 600, seed=7, dirty=0.05, days=3, filesystem=fs)
    storage = ["--storage.endpoint_url", s3_endpoint, "--storage.access_key_id", "testing",
               "--storage.secret_access_key", "testing", "--storage.region", "us-east-1"]
    cfg = load_config(None, BASE + storage + [
        "--ingest.input", "s3://logs/feedback", "--ingest.output", "s3://logs/prepared",
        "--ingest.date_from", "2026-11-02", "--ingest.date_to", "2026-11-03", "--udm.enabled", "false"])
    m = prepare(cfg)
    check_accounting(m)
    assert m["files"] == 4 and 350 < m["rows_read"] < written["rows"]  # day 1 was never read
    manifest = json.loads(fs.open_input_stream("logs/prepared/manifest.json").read())
    assert manifest["kept"] == m["kept"]
    data = read("logs/prepared/data", fs)
    assert len(data) == m["kept"] and {r["day"] for r in data} == {"2026-11-02", "2026-11-03"}
    assert all(r["weight"] == 1.0 for r in data)
    assert len(read("logs/prepared/quarantine", fs)) == m["quarantined"]


def test_large_dirty_log_keeps_exactly_the_valid_rows(ray_local, tmp_path):
    """Independent recount: which rows are valid and unique is computed here, not by prepare."""
    from bco_ray.config import IngestConfig
    from bco_ray.data.demo_data import add_dirt, synth_rows

    log = tmp_path / "log" / "date=2026-11-01"
    log.mkdir(parents=True)
    cols = add_dirt(synth_rows(3000, seed=11), seed=11, fraction=0.2)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({k: cols[k] for k in ("prompt", "completion", "feedback")}),
                   str(log / "part.parquet"), row_group_size=700)
    m = prepare(load_config(None, BASE + ["--ingest.input", str(tmp_path / "log"), "--udm.enabled", "false",
                                          "--run.run_dir", str(tmp_path / "run")]))
    check_accounting(m)
    assert m["rows_read"] == len(cols["prompt"])
    vocab_ok = set(IngestConfig().true_labels) | set(IngestConfig().false_labels)
    groups: dict = {}
    for p, c, f in zip(cols["prompt"], cols["completion"], cols["feedback"], strict=True):
        valid = (isinstance(p, str) and p.strip() and isinstance(c, str) and c.strip() and f in vocab_ok
                 and len(p) + len(c) <= 200_000)
        if valid:
            groups.setdefault((p, c), Counter())[f in IngestConfig().true_labels] += 1
    expected = sum(1 if len(g) == 1 or g[True] != g[False] else 0 for g in groups.values())
    assert m["kept"] == expected


def test_each_distinct_thumbs_down_prompt_is_embedded_once_and_its_weight_joined_back(ray_local):
    """The second UDM pass: a log where thumbs-down prompts repeat (40 distinct among 300
    rows) gets, for every row, exactly the weight that embedding that row's own prompt gives
    (UDMWeigher row by row), with 40 prompts embedded; thumbs-up rows weigh 1."""
    import ray

    from bco_ray.assets import resolve_model
    from bco_ray.data.udm import UDMClassifier, UDMWeigher
    from bco_ray.data.udm_stage import weigh_distinct_prompts

    rng = np.random.default_rng(0)
    prompts = [f"How do I {verb} my {thing}?" for verb in ("reset", "change", "recover", "delete", "export")
               for thing in ("password", "invoice", "account", "avatar", "email", "plan", "card", "data")]
    rows = [{"row_id": f"r{i}", "prompt": prompts[int(rng.integers(len(prompts)))], "label": bool(rng.random() < 0.3)}
            for i in range(300)]
    table = pa.Table.from_pylist(rows)
    model_dir = str(resolve_model("all-minilm-l6-v2"))
    clf = UDMClassifier(coef=(rng.normal(size=384) * 0.5).tolist(), intercept=0.1, embedder="all-minilm-l6-v2",
                        max_embed_length=64, min_density_ratio=0.5, max_density_ratio=10.0)
    cfg = load_config(None, BASE + ["--udm.embed_batch_size", "16"])
    down = sum(not r["label"] for r in rows)
    weighted, report = weigh_distinct_prompts(ray.data.from_arrow(table).repartition(6), down, clf, model_dir, cfg)
    got = {r["row_id"]: r["weight"] for r in weighted.take_all()}
    assert report["distinct_down_prompts"] == len({r["prompt"] for r in rows if not r["label"]}) == 40
    # udm.embed_actors null: one per CPU of the cluster less one, and the pass's rate per actor
    want_actors = max(1, int(ray.cluster_resources()["CPU"]) - 1)
    assert report["embed_actors"] == want_actors and report["prompts_per_s_per_actor"] > 0
    # udm.embed_threads null: the CPUs shared among the actors, which run after the shuffle
    assert report["embed_threads"] == int(ray.cluster_resources()["CPU"]) // want_actors
    want = UDMWeigher(model_dir, clf.to_json(), batch_size=16)(table)["weight"].to_pylist()
    assert len(got) == 300 and all(got[r["row_id"]] == 1.0 for r in rows if r["label"])
    # rtol: in bf16 (udm.embed_dtype auto on a CPU with native bf16) a prompt's embedding moves
    # ~1e-3 with its batch's padding; a weight joined to the wrong prompt is tens of % off.
    np.testing.assert_allclose([got[r["row_id"]] for r in rows], want, rtol=5e-3)
    assert len({round(w, 6) for w in want}) > 10  # the weights differ by prompt: a real check

    # Prompts whose weight is known (the classifier's sample, embedded to fit it) are not
    # embedded again: their rows take the known weight, the others the weigher's as before.
    from bco_ray.data.udm_stage import prompt_keys

    old = sorted({r["prompt"] for r in rows if not r["label"]})[:5]
    known = pa.table({"prompt_key": pa.array(prompt_keys(old), pa.uint64()),
                      "weight": pa.array(np.full(5, 7.25, np.float32))})
    weighted, report = weigh_distinct_prompts(ray.data.from_arrow(table).repartition(6), down, clf, model_dir, cfg,
                                              known)
    again = {r["row_id"]: r["weight"] for r in weighted.take_all()}
    assert report["distinct_down_prompts"] == 40 and report["embedded_down_prompts"] == 35
    assert all(again[r["row_id"]] == 7.25 for r in rows if not r["label"] and r["prompt"] in old)
    assert any(not r["label"] and r["prompt"] in old for r in rows)
    np.testing.assert_allclose([again[r["row_id"]] for r in rows if r["label"] or r["prompt"] not in old],
                               [w for r, w in zip(rows, want, strict=True) if r["label"] or r["prompt"] not in old],
                               rtol=5e-3)


def test_footers_of_many_small_files_on_s3_are_read_in_parallel_in_listing_order(s3_endpoint, monkeypatch):
    """The serve stage writes many small files: their footers are read 16 at a time (latency,
    not bandwidth, bounds a footer read), yet the row groups, the row count and the unreadable
    file set aside come out exactly as a one-by-one read gives them."""
    import pyarrow.parquet as pq

    from bco_ray import storage
    from bco_ray.data import ingest

    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint.removeprefix("http://"), scheme="http",
                           access_key="testing", secret_key="testing", region="us-east-1")
    for i in range(40):
        t = pa.table({"prompt": [f"p{i}-{j}" for j in range(i % 3 + 1)], "completion": ["c"] * (i % 3 + 1),
                      "feedback": [True] * (i % 3 + 1)})
        pq.write_table(t, f"logs/small/date=2026-11-0{1 + i % 3}/part-{i:03d}.parquet", filesystem=fs,
                       row_group_size=2)
    with fs.open_output_stream("logs/small/date=2026-11-02/part-999.parquet") as f:
        f.write(b"not parquet")  # a writer that crashed: set aside, not fatal
    storage_args = ["--storage.endpoint_url", s3_endpoint, "--storage.access_key_id", "testing",
                    "--storage.secret_access_key", "testing", "--storage.region", "us-east-1"]
    cfg = load_config(None, BASE + storage_args + ["--ingest.input", "s3://logs/small",
                                                   "--ingest.date_from", "2026-11-02"])
    parallel = ingest._input_units(cfg)
    monkeypatch.setattr(ingest, "FOOTER_THREADS", 1)
    assert ingest._input_units(cfg) == parallel
    units, rows, files, bad = parallel
    assert files == sorted(files) and len(files) == 26 and [b["path"] for b in bad] == [
        "logs/small/date=2026-11-02/part-999.parquet"]
    assert rows == sum(i % 3 + 1 for i in range(40) if i % 3 != 0)
    assert len(units) == sum(-(-(i % 3 + 1) // 2) for i in range(40) if i % 3 != 0)  # row groups of 2
    assert ingest.count_rows(fs, "logs/small/date=2026-11-03") == sum(i % 3 + 1 for i in range(40) if i % 3 == 2)
    # In order, and never more than 4 x threads results ahead of the consumer.
    started: list[int] = []
    gen = storage.parallel_map(lambda i: started.append(i) or i * i, range(100), threads=2)
    assert next(gen) == 0 and len(started) <= 9
    assert list(gen) == [i * i for i in range(1, 100)]


def test_small_files_share_read_tasks_and_read_as_they_would_alone(tmp_path):
    """Pass 1 gathers consecutive row groups into tasks of about min(READ_TASK_ROWS, rows / 64)
    rows (the driver keeps ~20 KB per Ray task: one task per 500-row file would be 4 GB at 1e8
    rows). Every row group is read once, in listing order, a large one alone; a task of many
    groups, including a corrupt one, gives exactly the rows of those groups read one by one."""
    import pyarrow.parquet as pq

    from bco_ray.data import ingest

    def units(sizes, row_bytes=100):
        return [{"path": f"f{i}", "row_group": 0, "day": "", "rows": n, "bytes": n * row_bytes}
                for i, n in enumerate(sizes)]

    tasks = [json.loads(t["units"]) for t in ingest.read_tasks(units([500] * 2000), 10**6)]
    assert [u[0] for t in tasks for u in t] == [f"f{i}" for i in range(2000)]
    assert len(tasks) == 63 and {len(t) for t in tasks[:-1]} == {32}  # >= 15,625 rows a task: 32 files of 500
    assert len(ingest.read_tasks(units([500] * 200_000), 10**8)) == 2000  # 1e8 rows in 500-row files
    mixed = ingest.read_tasks(units([10**6, 3, 3, 3, 10**6, 3]), 2 * 10**6 + 12)
    assert [len(json.loads(t["units"])) for t in mixed] == [1, 4, 1]  # a large group closes its task
    long_rows = ingest.read_tasks(units([500] * 2000, row_bytes=100_000), 10**6)  # 50 MB a file
    assert {len(json.loads(t["units"])) for t in long_rows[:-1]} == {6}  # 300 MB >= 256 MB, before 15,625 rows
    assert ingest.read_tasks(units([5] * 3), 15) == [{"units": json.dumps([[f"f{i}", 0, ""]])} for i in range(3)]

    log = tmp_path / "date=2026-11-02"
    log.mkdir()
    for i in range(6):
        t = pa.table({"prompt": [f"Question {i}-{j}?" for j in range(4)], "completion": ["Answer."] * 4,
                      "feedback": ["up", "down", "thumbs_up", "maybe"]})
        pq.write_table(t, log / f"part-{i}.parquet", row_group_size=2)
    write_corrupt_pages(log / "part-9.parquet", rows=3)
    cfg = load_config(None, BASE + ["--ingest.input", str(tmp_path)])
    groups, rows, _, _ = ingest._input_units(cfg)
    assert len(groups) == 14 and rows == 30
    together = ingest._read_normalise({"units": [t["units"] for t in ingest.read_tasks(groups, 14 * 64)]}, cfg)
    alone = pa.concat_tables(ingest._read_normalise({"units": [json.dumps([[u["path"], u["row_group"], u["day"]]])]},
                                                    cfg) for u in groups)
    assert together.num_rows == 30 and together.equals(alone)
    assert Counter(together["reason"].to_pylist()) == {None: 21, "unknown_label": 6, "unreadable_row_group": 3}
    assert set(together["day"].to_pylist()) == {"2026-11-02"}


def test_a_block_is_resolved_as_each_of_its_groups_alone():
    """`_resolve` keeps single-row keys in Arrow and sends only repeated keys through
    resolve_group: every row's status, reason, duplicate_of and raw must be those of
    resolve_group on its key's rows (duplicates, conflicts under every policy, repeated votes)."""
    from bco_ray.data.ingest import STAGE2_SCHEMA, _resolve
    from bco_ray.data.normalise import NORMALISED_SCHEMA, resolve_group

    rng = np.random.default_rng(3)
    rows = []
    for i in range(3000):
        key = int(rng.integers(2000))  # ~1/3 of the keys repeat, some several times
        vote = f"v{rng.integers(40)}" if rng.random() < 0.2 else None
        rows.append({"row_id": f"f:0:{i:05d}", "source": "s", "day": None, "status": "ok", "reason": None,
                     "raw": None, "prompt": f"p{key}", "prompt_messages": None, "completion": f"c{key}",
                     "label": bool(rng.random() < 0.5), "pair_id": None, "pair_key": key, "vote_key": vote,
                     "voted_at": f"t{rng.integers(9)}" if vote else None, "served_key": None})
    block = pa.Table.from_pylist(rows, schema=NORMALISED_SCHEMA).drop_columns(["status"])  # as read from status=ok/
    for policy in ("majority", "quarantine", "keep"):
        got = {r["row_id"]: r for r in _resolve(block, policy).to_pylist()}
        groups: dict = {}
        for r in rows:
            groups.setdefault(r["pair_key"], []).append({**r, "duplicate_of": None})
        want = {r["row_id"]: r for g in groups.values() for r in resolve_group([dict(x) for x in g], policy)}
        assert len(got) == len(rows) and got.keys() == want.keys()
        fields = ("status", "reason", "duplicate_of", "label", "prompt", "pair_key")
        assert all(tuple(got[k][f] for f in fields) == tuple(want[k][f] for f in fields) for k in got), policy
        assert all((got[k]["raw"] is None) == (want[k]["status"] != "quarantined") for k in got)
        assert Counter(r["status"] for r in got.values())["deduplicated"] > 100  # the slow path ran
    assert _resolve(block, "majority").schema == STAGE2_SCHEMA


@pytest.mark.parametrize("strategy", ["sort", "hash"])
def test_the_dedup_shuffle_puts_each_key_in_one_block(ray_local, strategy):
    """What `_resolve` and UDM's distinct prompts rely on: after `co_locate` every key's rows
    are in one block, and the sort shuffle has `shuffle_partitions` blocks, not one per read
    block (its pieces, driver-owned, are blocks x blocks)."""
    import ray

    from bco_ray.storage import co_locate, shuffle_partitions

    n = 90_000
    keys = np.random.default_rng(0).integers(0, 30_000, n)
    ds = ray.data.from_arrow(pa.table({"k": keys, "i": np.arange(n)})).repartition(45)  # 2,000-row blocks
    out = co_locate(ds, "k", n, strategy)
    where: dict = {}
    blocks = [ray.get(ref) for ref in out.to_arrow_refs()]
    for b, t in enumerate(blocks):
        for k in set(t["k"].to_pylist()):
            where.setdefault(k, set()).add(b)
    assert sum(t.num_rows for t in blocks) == n and len(where) == len(set(keys.tolist()))
    assert all(len(b) == 1 for b in where.values())
    if strategy == "sort":
        assert len(blocks) == shuffle_partitions(n, "sort") == 9


def test_dedup_partitions_grow_with_the_log_under_the_hash_shuffle():
    from bco_ray.storage import shuffle_partitions

    sizes = (0, 5_000, 100_000, 1_000_000, 10**7, 10**8)
    assert [shuffle_partitions(n, "hash") for n in sizes] == [1, 1, 5, 50, 200, 800]
    assert all(n / shuffle_partitions(n, "hash") <= 125_000 for n in (10**7, 10**8, 10**9))
    # the sort shuffle's pieces (rows / partitions^2 rows each) stay >= 1,000 rows, at most 200
    assert [shuffle_partitions(n, "sort") for n in sizes] == [1, 2, 10, 31, 100, 200]
    assert all(n / shuffle_partitions(n, "sort") ** 2 >= 1000 for n in (10**4, 10**6, 10**7, 10**8))
