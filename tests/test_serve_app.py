"""The serve app's routes as Ray Serve ships them to replicas (no cluster needed)."""

import inspect
import json

import ray.cloudpickle as cloudpickle
from fastapi import Request
from fastapi.routing import APIRoute


def test_route_annotations_survive_the_trip_to_a_replica():
    # Serve pickles the ingress routes by value; a string annotation ('Request', from
    # `from __future__ import annotations`) does not resolve there, and FastAPI >= 0.137
    # then reads `request` as a required query parameter: every route answered 422.
    from bco_ray.serve import app as serve_app

    routes = [r for r in serve_app.app.routes if isinstance(r, APIRoute)]
    assert {r.path for r in routes} >= {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/feedback"}
    for route in routes:
        shipped = cloudpickle.loads(cloudpickle.dumps(route.endpoint))
        params = inspect.signature(shipped).parameters
        if "request" in params:
            assert params["request"].annotation is Request, route.path


def test_sampling_limits_are_normalised_per_request():
    from bco_ray.serve.api import SEED_SPACE, APIError, choice_sampling, parse_sampling

    greedy = [parse_sampling({"top_p": 0}, 64)[0], parse_sampling({"temperature": 1e-45}, 64)[0]]
    assert all(s.temperature == 0.0 and s.top_p == 1.0 for s in greedy)  # greedy, not a batch-wide crash
    big = parse_sampling({"seed": 2**64 - 1, "temperature": 1}, 64)[0]
    assert 0 <= big.seed < SEED_SPACE and 0 <= choice_sampling(big, 1).seed < SEED_SPACE
    assert parse_sampling({"seed": -5}, 64)[0].seed == SEED_SPACE - 5
    for bad in ({"seed": 2**70}, {"seed": 1.5}, {"seed": True}, {"top_p": -0.1}, {"temperature": 3}):
        try:
            parse_sampling(bad, 64)
        except APIError as e:
            assert e.status == 400 and e.param == next(iter(bad)), bad
        else:
            raise AssertionError(f"{bad} was accepted")


def test_text_that_is_not_utf8_is_refused_at_the_door():
    from bco_ray.serve.api import APIError, check_text

    check_text({"messages": [{"role": "user", "content": "héllo ✓"}], "comment": None})
    for body, where in (({"comment": "ok \ud800"}, "comment"),
                        ({"messages": [{"role": "user", "content": "\udfff"}]}, "messages")):
        try:
            check_text(body)
        except APIError as e:
            assert e.status == 400 and e.param == where
        else:
            raise AssertionError(f"{body!r} was accepted")


def test_no_network_endpoint_without_keys(monkeypatch):
    import pytest

    from bco_ray.config import load_config
    from bco_ray.errors import UserError
    from bco_ray.preflight import check_auth

    monkeypatch.delenv("BCO_RAY_API_KEYS", raising=False)
    check_auth(load_config(None, []))  # 127.0.0.1, no keys: fine
    check_auth(load_config(None, ["--serve.host", "::1"]))
    for host in ("0.0.0.0", "10.1.2.3", "my-host"):
        with pytest.raises(UserError, match="no API key"):
            check_auth(load_config(None, ["--serve.host", host]))
    check_auth(load_config(None, ["--serve.host", "0.0.0.0", "--serve.allow_unauthenticated", "true"]))
    check_auth(load_config(None, ["--serve.host", "0.0.0.0", "--serve.api_keys", "[k1]"]))
    with pytest.raises(UserError, match="empty key"):
        check_auth(load_config(None, ["--serve.api_keys", "['k1', ' ']"]))
    monkeypatch.setenv("BCO_RAY_API_KEYS", "k2, k3")
    check_auth(load_config(None, ["--serve.host", "0.0.0.0"]))


def test_feedback_files_are_committed_whole_and_unwritable_rows_are_dead_lettered(tmp_path):
    import json

    import pyarrow.dataset as pads

    from bco_ray.config import StorageConfig
    from bco_ray.serve.feedback_log import FeedbackWriter

    w = FeedbackWriter(str(tmp_path / "log"), StorageConfig())
    for cid, prompt in (("c1", "hello"), ("c2", "bad \ud800 prompt"), ("c3", "bye")):  # c2 got past the door
        w.record(cid, prompt, [f"answer to {cid}"], "m", "v1")
        w.feedback(cid, cid != "c2")
    assert w.commit() == 6 and w.written == 6 and w.dead_lettered == 2  # c2's served row and its feedback
    files = [p for p in (tmp_path / "log").rglob("*") if p.is_file()]
    assert not [p for p in files if p.name.endswith(".tmp")]  # committed by rename: no temp file left
    table = pads.dataset(str(tmp_path / "log"), format="parquet", partitioning="hive",
                         ignore_prefixes=["_", "."]).to_table()
    assert sorted(table.column("completion_id").to_pylist()) == ["c1", "c3"]  # the good rows, not blocked
    dead = [json.loads(line) for p in files if "_dead_letter" in p.parts for line in p.read_text().splitlines()]
    assert [d["row"]["completion_id"] for d in dead] == ["c2", "c2"] and "UTF-8" in dead[0]["reason"]
    w.record("c4", "later", ["fine"], "m", "v1")
    w.feedback("c4", True)
    assert w.commit() == 8 and w.dead_lettered == 2  # and the next commit is clean


# ---------------------------------------------------------------------------- the replica's request paths, in process
# The replica class itself, without Ray Serve around it: a real tiny model behind it, and an
# engine that fails or is slow where the test needs it to.

class _Log:
    """The feedback log's handle: remembers what the replica asked it to record."""

    def __init__(self):
        self.recorded = []

        async def remote(*args):
            self.recorded.append(args)
        self.record = type("M", (), {"remote": staticmethod(remote)})()


def _replica(engine):
    from bco_ray.config import load_config
    from bco_ray.serve.model import ModelServer

    server = object.__new__(ModelServer.func_or_class)  # the class under Serve's deployment
    server.cfg, server.name, server.version, server.vllm = load_config(None, []), "m", "v1", False
    server.fingerprint = "v1"
    server.engine, server.feedback_log, server.keys = engine, _Log(), []
    return server


def _tiny_engine():
    from bco_ray.assets import resolve_model
    from bco_ray.serve.generate import HFEngine

    return HFEngine(str(resolve_model("tiny-llama")), "float32", device="cpu", num_threads=1)


def _chat_choice(i, text, reason, final):
    return None if i is None else {"index": i, "delta": {"content": text}, "finish_reason": reason}


def test_an_engine_error_mid_stream_is_an_error_event_without_done_and_nothing_is_remembered():
    import asyncio
    import json

    engine = _tiny_engine()

    def failing(prompts, params, outputs=None):
        for n, step in enumerate(type(engine).generate_iter(engine, prompts, params, outputs)):
            if n == 3:
                raise RuntimeError("device lost")
            yield step
    engine.generate_iter = failing
    server = _replica(engine)

    async def run():
        ids = engine.encode_chat([{"role": "user", "content": "hello"}])
        resp = await server._respond({"stream": True, "max_tokens": 20, "temperature": 0}, ids, "hello", "chatcmpl",
                                     "chat.completion.chunk", _chat_choice)
        return [c async for c in resp]

    events = asyncio.run(run())
    assert events[-1] != "data: [DONE]\n\n" and "data: [DONE]\n\n" not in events
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["error"]["code"] == "engine_error" and "device lost" in last["error"]["message"]
    assert len(events) >= 3  # the opening chunk and the tokens before the failure were sent
    assert server.feedback_log.recorded == []  # a cut answer cannot be rated


def test_the_hf_engine_stops_decoding_when_the_client_goes_away():
    import asyncio
    import time

    engine = _tiny_engine()
    steps = []

    def slow(prompts, params, outputs=None):
        for step in type(engine).generate_iter(engine, prompts, params, outputs):
            steps.append(time.monotonic())
            time.sleep(0.05)
            yield step
    engine.generate_iter = slow
    server = _replica(engine)

    async def run():
        ids = engine.encode_text("hello")
        resp = await server._respond({"stream": True, "max_tokens": 400, "temperature": 1.0, "seed": 1}, ids,
                                     "hello", "cmpl", "text_completion", _chat_choice)
        it = resp
        for _ in range(3):
            await it.__anext__()
        await it.aclose()  # what Starlette does when the client disconnects
        await asyncio.sleep(2.0)  # time for ~40 more steps, were it still decoding

    asyncio.run(run())
    time.sleep(0.2)
    assert len(steps) < 12, len(steps)  # stopped within a few steps of the disconnect, not at 400
    assert server.feedback_log.recorded == []


def test_a_megabyte_prompt_is_tokenized_off_the_event_loop():
    import asyncio
    import time

    from bco_ray.serve.api import APIError

    server = _replica(_tiny_engine())
    prompt = "word " * 190_000  # just under serve.max_request_bytes
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 4}).encode()
    gaps = []

    async def ticker(done):
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async def run():
        done = asyncio.Event()
        tick = asyncio.create_task(ticker(done))
        t0 = time.monotonic()
        try:
            await server.completions(json.loads(body))
        except APIError as e:
            assert e.status == 413 and e.code == "context_length_exceeded"  # tokenized, then refused
        else:
            raise AssertionError("a 190k-token prompt was accepted by a 2k-context model")
        took = time.monotonic() - t0
        done.set()
        await tick
        return took

    took = asyncio.run(run())
    # The event loop kept ticking while the prompt was tokenized: other requests are served.
    assert took > 0.2 and max(gaps) < min(0.5 * took, 0.25), (took, max(gaps))
