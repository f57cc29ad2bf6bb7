"""The continuous loop end to end on the local cluster, real HTTP clients: two days of log,
`align --since last` on the first day; its model on a canary beside the base model (the
split follows the share and sticks to a user, every answer and thumb is attributed to the
version that gave it, `canary status` equals a count from the log), promoted under steady
load with no failed request; `align --since last` again reads only the second day, starts
from the promoted model, carries the reward shift and leaves the served application alone;
its model on a canary, rolled back under load; a third run finds nothing new."""

import datetime as dt
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import TINY, free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"


def _post(url: str, body: dict, user: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"x-user-id": user} if user else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {"raw": e.read().decode(errors="replace")}
    except OSError as e:  # a connection refused or cut: a failed request too
        return 0, {"raw": str(e)}


def _ask(url: str, user: str) -> tuple[int, dict]:
    return _post(f"{url}/completions", {"model": "bco-ray", "prompt": f"{user} asks", "max_tokens": 2,
                                        "temperature": 0}, user)


class Load:
    """Steady traffic from 3 clients (a new user each request) until stopped."""

    def __init__(self, url: str):
        self.url, self.stop, self.results = url, threading.Event(), []
        self.threads = [threading.Thread(target=self._client, args=(k,)) for k in range(3)]

    def _client(self, k: int) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            status, body = _ask(self.url, f"load-{k}-{i}-{time.time()}")
            self.results.append((time.monotonic(), status, body.get("system_fingerprint")))

    def __enter__(self):
        for t in self.threads:
            t.start()
        time.sleep(2)
        return self

    def __exit__(self, *exc):
        time.sleep(2)
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def _info(deployment: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name="bco-ray").info.remote().result(timeout_s=60)


def _rows(folder: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in folder.rglob("*.parquet"))


def test_plan_reads_the_days_after_the_watermark_up_to_yesterday(tmp_path):
    from bco_ray import registry
    from bco_ray.config import load_config
    from bco_ray.errors import UserError

    args = ["--run.run_dir", str(tmp_path / "runs" / "a"), "--model.policy", "tiny-llama"]
    today = dt.date(2026, 12, 5)
    cfg = load_config(None, args)
    assert registry.plan(cfg, today) == (cfg, None)  # loop.since null: the config as it is
    run_cfg, info = registry.plan(load_config(None, [*args, "--loop.since", "last"]), today)
    assert info["days"] == [None, "2026-12-04"] and run_cfg.ingest.date_to == "2026-12-04"
    assert run_cfg.ingest.date_from is None and run_cfg.model.policy == "tiny-llama"
    assert run_cfg.train.export == str(tmp_path / "runs" / "a" / "models" / "2026-12-04")
    state = registry.load(cfg)
    state["runs"].append({"watermark": "2026-12-02"})
    state["promoted"] = {"uri": "/models/v3"}
    registry.save(cfg, state)
    run_cfg, info = registry.plan(load_config(None, [*args, "--loop.since", "last", "--loop.until", "today"]), today)
    assert info["days"] == ["2026-12-03", "2026-12-05"] and info["after"] == "2026-12-02"
    assert (run_cfg.model.policy, run_cfg.model.reference) == ("/models/v3", "tiny-llama")
    run_cfg, info = registry.plan(load_config(None, [*args, "--loop.since", "last", "--loop.reference", "previous",
                                                     "--loop.start_from", "base"]), today)
    assert (run_cfg.model.policy, run_cfg.model.reference) == ("tiny-llama", "tiny-llama")
    run_cfg, info = registry.plan(load_config(None, [*args, "--loop.since", "2026-11-30", "--ingest.date_to",
                                                     "2026-12-01", "--loop.carry_reward_shift", "true"]), today)
    assert info["days"] == ["2026-12-01", "2026-12-01"] and run_cfg.objective.reward_shift_from == "/models/v3"
    _, info = registry.plan(load_config(None, [*args, "--loop.since", "2026-12-04"]), today)
    assert info["nothing_new"]  # the day after the watermark is today: not finished yet
    with pytest.raises(UserError, match="reference base"):
        registry.plan(load_config(None, [*args, "--loop.since", "last", "--loop.reference", "previous",
                                         "--loop.carry_reward_shift", "true"]), today)
    with pytest.raises(UserError, match="not a day"):
        registry.plan(load_config(None, [*args, "--loop.since", "yesterday"]), today)


def test_two_days_two_runs_with_a_canary_between_and_nothing_new_after(ray_local, tmp_path):
    """The loop, end to end: day 1's run -> its model on a canary beside the base model (split,
    stickiness, attribution, status from the log) -> promoted under load -> day 2's run from
    it -> day 2's model on a canary, rolled back under load -> no new day."""
    from bco_ray import registry
    from bco_ray.config import load_config
    from bco_ray.data.demo_data import write_log
    from bco_ray.pipeline import align
    from bco_ray.serve import canary
    from bco_ray.serve import stage as serve
    from bco_ray.serve.stage import model_version

    # Two days of feedback, yesterday and the day before (the loop reads up to yesterday).
    today = dt.datetime.now(dt.UTC).date()
    day1, day2 = (today - dt.timedelta(days=2)).isoformat(), (today - dt.timedelta(days=1)).isoformat()
    raw, log = tmp_path / "raw", tmp_path / "log"
    write_log(str(raw), 240, seed=5, days=2)
    for old, new in (("2026-11-01", day1), ("2026-11-02", day2)):
        shutil.move(raw / f"date={old}", log / f"date={new}")
    rows = {d: _rows(log / f"date={d}") for d in (day1, day2)}

    run_dir, served_log = tmp_path / "runs" / "daily", tmp_path / "served-log"
    args = [*TINY, "--ingest.input", str(log), "--run.run_dir", str(run_dir), "--train.max_steps", "2",
            "--train.eval_every", "0", "--eval.num_prompts", "4", "--eval.max_tokens", "8", "--eval.samples", "0",
            "--eval.judge", "none", "--eval.max_degenerate_increase", "null", "--eval.max_empty_increase", "null",
            "--serve.port", str(free_port()), "--serve.feedback_log", str(served_log),
            "--serve.cpus_per_replica", "0.25", "--loop.carry_reward_shift", "true", "--canary.share", "0.3",
            "--canary.min_rated", "20"]
    cfg = load_config(None, args)
    try:
        # Day 1, as the job that ran yesterday: every day up to day 1 (the first run has no watermark).
        # It stops after its eval: the serve stage's smoke test is the canary's start below.
        first = align(load_config(None, [*args, "--loop.since", "last", "--ingest.date_to", day1,
                                         "--run.stop_after", "eval"]))
        assert first["loop"]["days"] == [None, day1] and first["loop"]["started_from"] == "tiny-llama"
        assert first["stages"]["prepare"]["rows_read"] == rows[day1]
        model1 = first["loop"]["model"]
        assert model1 == str(run_dir / "models" / day1) and (Path(model1) / "run_card.json").exists()
        assert "serve" not in first["stages"]
        state = registry.load(cfg)
        assert [r["watermark"] for r in state["runs"]] == [day1] and state["runs"][0]["eval"] == "passed"
        assert registry.registry_uri(cfg) == str(tmp_path / "runs" / "registry")

        # Day 1's model on a canary beside the base model: 200 users, 8 at a time.
        started = canary.start(cfg)
        url = started["url"]
        assert started["uri"] == model1 and started["promoted"] == "tiny-llama"
        fp = {"promoted": model_version("tiny-llama", cfg)["version"].rsplit("@", 1)[-1],
              "candidate": model_version(model1, cfg)["version"].rsplit("@", 1)[-1]}
        users = [f"user-{i}" for i in range(200)]
        with ThreadPoolExecutor(8) as pool:
            answers = dict(zip(users, pool.map(lambda u: _ask(url, u), users), strict=True))
        assert {st for st, _ in answers.values()} == {200}, Counter(st for st, _ in answers.values())
        by = {u: b["system_fingerprint"] for u, (_, b) in answers.items()}
        assert set(by.values()) == set(fp.values())
        share = sum(v == fp["candidate"] for v in by.values()) / len(by)
        assert abs(share - 0.3) < 0.13, share  # 4 sd of a binomial over 200 users
        served_by = Counter(by.values())
        for u in users[:20]:  # sticky: a user asking again gets the same version
            assert _ask(url, u)[1]["system_fingerprint"] == by[u]
            served_by[by[u]] += 1
        # Thumbs: up on 70 % of the candidate's answers and 40 % of the base model's.
        sent = Counter()
        thumbs_up = {}
        for n, u in enumerate(users):
            role = "candidate" if by[u] == fp["candidate"] else "promoted"
            thumbs_up[u] = (n % 10) < (7 if role == "candidate" else 4)
            sent[(role, thumbs_up[u])] += 1
        with ThreadPoolExecutor(8) as pool:  # as users send them: at once, not one by one
            acks = list(pool.map(lambda u: _post(f"{url}/feedback", {"id": answers[u][1]["id"], "label": thumbs_up[u]}, u),
                                 users))
        for st, body in acks:
            assert st == 200 and body["joined"], body
        # Every served answer and every thumb carries the version that answered.
        version_of_id = {b["id"]: b["system_fingerprint"] for _, b in answers.values()}
        served = [r for f in sorted((served_log / "_served").rglob("*.parquet"))
                  for r in pq.read_table(f).to_pylist() if r["completion_id"] in version_of_id]
        thumbs = [r for f in sorted(served_log.glob("date=*/*.parquet"))
                  for r in pq.read_table(f).to_pylist() if r["completion_id"] in version_of_id]
        assert len(served) == len(thumbs) == len(users)
        for r in served + thumbs:
            assert r["model_version"].rsplit("@", 1)[-1] == version_of_id[r["completion_id"]]
        # `canary status` equals a count from the log; the CLI reads the registry and the logs only.
        from_log = Counter((r["model_version"].rsplit("@", 1)[-1], r["label"]) for r in thumbs)
        s = canary.status(cfg)
        for role in ("promoted", "candidate"):
            v = s["versions"][role]
            assert v["up"] == from_log[(fp[role], "thumbs_up")] == sent[(role, True)], (role, v)
            assert v["rated"] - v["up"] == from_log[(fp[role], "thumbs_down")] == sent[(role, False)], (role, v)
            assert v["answers"] == served_by[fp[role]], (role, v)
        cli = subprocess.run([str(BIN / "bco-ray"), "canary", "status", *args], capture_output=True, text=True,
                             timeout=300)
        assert cli.returncode == 0, cli.stderr[-2000:]
        print("\n" + cli.stdout.rsplit("\n{", 1)[0])
        assert json.loads(cli.stdout.splitlines()[-1])["versions"] == s["versions"]

        # Promoted under steady load: no failed request, the candidate's replica kept (not
        # reloaded), and every answer after it from the candidate.
        kept = _info(f"model-{fp['candidate']}")["created"]
        with Load(url) as load:
            canary.promote(cfg)
            t_done = time.monotonic()
        assert load.results and {st for _, st, _ in load.results} == {200}, Counter(st for _, st, _ in load.results)
        assert {f for t, _, f in load.results if t > t_done + 0.5} == {fp["candidate"]}
        assert _info(f"model-{fp['candidate']}")["created"] == kept
        print(f"promote under load: {len(load.results)} requests, all 200")

        # Day 2: `bco-ray align --since last`, while the promoted model is served (its eval
        # is off here only to save CI time: day 1's run went through the gate).
        second = align(load_config(None, [*args, "--loop.since", "last", "--eval.enabled", "false"]))
        lp = second["loop"]
        assert lp["days"] == [day2, day2] and lp["after"] == day1
        assert second["stages"]["prepare"]["rows_read"] == rows[day2]  # only the new day
        assert lp["started_from"] == model1 and lp["reference"] == "tiny-llama" and lp["reward_shift_from"] == model1
        card1 = json.loads((Path(model1) / "run_card.json").read_text())
        card2 = json.loads((Path(lp["model"]) / "run_card.json").read_text())
        assert card2["base_model"] == model1 and card2["reference"] == "tiny-llama"
        # The reward shift went on from day 1's: its counts include day 1's rewards.
        for label in ("desirable", "undesirable"):
            assert card2["delta"]["counts"][label] > card1["delta"]["counts"][label] > 0
        assert "skipped_because" in second["stages"]["serve"]  # the served application was left alone
        state = registry.load(cfg)
        assert [r["watermark"] for r in state["runs"]] == [day1, day2]
        assert state["promoted"]["uri"] == model1 and registry.last_candidate(state) == lp["model"]

        # Day 2's model on a canary, rolled back under steady load.
        assert canary.start(load_config(None, [*args, "--canary.share", "0.5"]))["uri"] == lp["model"]
        with Load(url) as load:
            canary.rollback(cfg)
            t_done = time.monotonic()
        assert {st for _, st, _ in load.results} == {200}, Counter(st for _, st, _ in load.results)
        assert {f for t, _, f in load.results if t > t_done + 0.5} == {fp["candidate"]}  # day 1's, promoted
        print(f"rollback under load: {len(load.results)} requests, all 200")
        state = registry.load(cfg)
        assert state["promoted"]["uri"] == model1 and state["canary"] is None
        assert [e["event"] for e in state["events"]] == ["canary_start", "promote", "canary_start", "rollback"]

        # Nothing new until tomorrow: the run says so and does nothing.
        third = align(load_config(None, [*args, "--loop.since", "last"]))
        assert third["loop"]["nothing_new"] and third["stages"] == {}
        assert len(registry.load(cfg)["runs"]) == 2
        assert not os.path.exists(run_dir / "models" / today.isoformat())
    finally:
        serve.stop()
