"""Hostile input and chaos against one Serve app whose logs go to a real S3-compatible server
(moto, behind a TCP gate the test can shut):
- wrong types in every field, 1 MB comments, a flood of feedback posts on one id: never a 5xx but 503;
- under traffic, the log replica killed, S3 unreachable for 30 s, a model replica killed:
  afterwards every completion answered 200 is in the served log and every feedback answered
  200 is in the feedback log (counted)."""

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import pyarrow.parquet as pq
import pytest

from bco_ray import storage
from bco_ray.config import load_config
from tests.conftest import TcpGate, free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]
# Posts in the flood on one id. 10,000 (the figure) were measured once on 2 cores: all
# 200, in 110 s (90 posts/s through Serve's proxy); CI sends 2,000, the same path, 22 s.
FLOOD = 2_000


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read()
            if r.headers.get_content_type() == "text/event-stream":  # a stream: whole if it ends with [DONE]
                return (r.status if raw.rstrip().endswith(b"data: [DONE]") else 599), None
            return r.status, json.loads(raw)
    except urllib.error.HTTPError as e:
        return e.code, None
    except OSError:  # the connection cut: no answer is no acknowledgement
        return 0, None


def _replica(deployment: str) -> str:
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if f"#{deployment}#" in a["name"] or (deployment == "model" and "#model-" in a["name"])]
    assert names, ray.util.list_named_actors(all_namespaces=True)
    return names[0]


@pytest.fixture(scope="module")
def app(ray_local, s3_endpoint):
    from bco_ray.serve import stage as serve

    gate = TcpGate(int(s3_endpoint.rsplit(":", 1)[1]))
    s3 = ["--storage.endpoint_url", f"http://127.0.0.1:{gate.port}", "--storage.access_key_id", "testing",
          "--storage.secret_access_key", "testing", "--storage.region", "us-east-1"]
    cfg = load_config(None, ["--model.policy", "tiny-llama", "--serve.model", "tiny-llama", "--serve.port",
                             str(free_port()), "--serve.feedback_log", "s3://logs/chaos", "--serve.num_replicas", "2",
                             "--serve.cpus_per_replica", "0.25", "--serve.max_queued_requests", "64",
                             "--serve.log_commit_timeout_s", "60", *s3])
    url = serve.start(cfg)
    yield url, cfg, gate
    serve.stop()


def test_hostile_input_never_gets_a_5xx_other_than_503(app):
    from concurrent.futures import ThreadPoolExecutor

    url, _, _ = app
    status, body = _post(f"{url}/completions", {"model": "bco-ray", "prompt": "hi", "max_tokens": 2})
    assert status == 200
    cid = body["id"]
    wrong = [None, 5, -1, 1.5, True, "x", "", [], [1], {}, {"a": 1}, 10**30, "\u0000"]
    bodies = []
    for field in ("model", "prompt", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream"):
        bodies += [("completions", {"model": "bco-ray", "prompt": "hi", "max_tokens": 2, field: v}) for v in wrong]
    for field in ("model", "messages", "max_tokens", "temperature"):
        bodies += [("chat/completions", {"model": "bco-ray", "messages": [{"role": "user", "content": "hi"}],
                                         "max_tokens": 2, field: v}) for v in wrong]
    bodies += [("chat/completions", {"model": "bco-ray", "messages": [{"role": v, "content": v}]}) for v in wrong]
    for field in ("id", "label", "comment", "index"):
        bodies += [("feedback", {"id": cid, "label": "up", field: v}) for v in wrong]
    bodies += [("feedback", {"id": cid, "label": "up", "comment": "x" * 1_000_000}),  # 413: over the body limit
               ("feedback", {"id": cid, "label": "up", "comment": "y" * 900_000})]   # under it: logged
    results = [(path, b, _post(f"{url}/{path}", b)[0]) for path, b in bodies]
    bad = [(path, {k: str(v)[:40] for k, v in b.items()}, st) for path, b, st in results if st >= 500 and st != 503]
    assert not bad, bad
    assert {st for *_, st in results} <= {200, 400, 404, 413, 503}, Counter(st for *_, st in results)
    assert results[-1][2] == 200 and results[-2][2] == 413

    # A flood of feedback posts on one id, 32 at a time: each answered 200 (or shed with 503);
    # `prepare` later counts one vote per caller.
    with ThreadPoolExecutor(32) as pool:
        flood = Counter(pool.map(lambda i: _post(f"{url}/feedback", {"id": cid, "label": i % 2 == 0})[0],
                                 range(FLOOD)))
    print(f"\nhostile: {len(bodies)} malformed requests {dict(Counter(st for *_, st in results))}; "
          f"{FLOOD} feedback posts on one id {dict(flood)}")
    assert set(flood) <= {200, 503} and flood[200] > 0, flood


def test_every_acknowledged_answer_and_thumb_survives_crashes_and_a_storage_outage(app):
    import ray

    from bco_ray.serve import stage as serve

    url, cfg, gate = app
    served, thumbs, statuses, stop = [], [], Counter(), threading.Event()

    def client(k):
        i = 0
        while not stop.is_set():
            i += 1
            status, body = _post(f"{url}/completions", {"model": "bco-ray", "prompt": f"client {k} asks {i}",
                                                        "max_tokens": 2, "temperature": 0})
            statuses[status] += 1
            if status != 200:
                time.sleep(0.2)
                continue
            served.append(body["id"])
            status, body = _post(f"{url}/feedback", {"id": body["id"], "label": i % 2 == 0})
            statuses[status] += 1
            if status == 200:
                thumbs.append(body["id"])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        phases = {}

        def phase(name, seconds, recover=True):
            """Traffic for `seconds`; with `recover`, then on until a thumb is acknowledged again
            (up to 90 s more: a killed replica is back after Serve's health check and a restart,
            which on 2 busy cores takes longer than on an idle machine)."""
            n, t0 = len(thumbs), time.time()
            time.sleep(seconds)
            while recover and len(thumbs) == n and time.time() - t0 < seconds + 90:
                time.sleep(0.5)
            phases[name] = len(thumbs) - n

        phase("before", 5)
        ray.kill(ray.get_actor(_replica("FeedbackLog"), namespace="serve"), no_restart=False)
        phase("log replica killed", 8)
        gate.shut()
        phase("S3 unreachable", 30, recover=False)
        gate.reopen()
        phase("S3 back", 6)
        ray.kill(ray.get_actor(_replica("model"), namespace="serve"), no_restart=False)
        phase("model replica killed", 6)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=180)
        serve.stop()  # graceful; every acknowledged row was on storage before its 200

    fs, root = storage.filesystem("s3://logs/chaos", cfg.storage)

    def ids(prefix):
        out = []
        for f in storage.list_parquet(fs, storage.join(root, *prefix)):
            with fs.open_input_file(f) as h:
                out += pq.read_table(h, columns=["completion_id"]).column("completion_id").to_pylist()
        return out

    logged_served, logged_thumbs = set(ids(["_served"])), [i for i in ids([]) if i in set(served)]
    print(f"\nchaos: {len(served)} answers and {len(thumbs)} thumbs acknowledged; statuses {dict(statuses)}; "
          f"thumbs per phase {phases}; logged: {len(logged_served)} answers, {len(logged_thumbs)} thumbs")
    # Traffic got through every phase; while S3 is unreachable the requests wait for their
    # commit (log_commit_timeout_s 60 > 30 s) and are acknowledged once it is back.
    assert served and all(n > 0 for name, n in phases.items() if name != "S3 unreachable"), phases
    assert not set(served) - logged_served, len(set(served) - logged_served)
    assert not Counter(thumbs) - Counter(logged_thumbs), len(Counter(thumbs) - Counter(logged_thumbs))
    # 503: shed or not logged in time. 500: in flight on the killed model replica (at most
    # its ongoing requests); 0: a connection cut by it.
    assert set(statuses) <= {200, 503, 500, 0} and statuses[500] + statuses[0] <= 3, statuses
