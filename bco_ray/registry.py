"""The continuous loop's state: which days of feedback the runs have read, which model is
promoted, which one is on a canary. One JSON file, `<loop.registry>/state.json`:

    {"version": 1,
     "runs":     [{"run_dir", "days": [first, last], "watermark", "model", "eval", "started_from",
                   "reference", "finished_at"}, ...],      # one per `align --since`, in order
     "promoted": {"uri", "version", "since"} | null,      # null: the base model (model.policy)
     "canary":   {"uri", "version", "share", "salt", "started_at"} | null,
     "events":   [{"at", "event", ...}, ...]}              # start / promote / rollback, for the record

`plan` turns `loop.*` into a run's settings (the days it reads, the weights it starts from,
its reference, its reward-shift seed); `record_run` writes the run's watermark once the run
has finished, so a failed or rejected run is read again by the next one.

One writer at a time: the daily job and the canary commands of one deployment (a second
loop on the same registry would race on this file).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import posixpath
import uuid

from bco_ray import storage
from bco_ray.config import Config
from bco_ray.errors import UserError

EMPTY = {"version": 1, "runs": [], "promoted": None, "canary": None, "events": []}


def registry_uri(cfg: Config) -> str:
    if cfg.loop.registry:
        return cfg.loop.registry
    parent = posixpath.dirname(cfg.run.run_dir.rstrip("/")) or "."
    return storage.join(parent, "registry")


def load(cfg: Config) -> dict:
    fs, root = storage.filesystem(registry_uri(cfg), cfg.storage)
    try:
        state = json.loads(storage.read_bytes(fs, storage.join(root, "state.json")))
    except (FileNotFoundError, OSError):
        return json.loads(json.dumps(EMPTY))
    if state.get("version") != 1:
        raise UserError(f"{registry_uri(cfg)}/state.json has version {state.get('version')!r}, not 1",
                        "point loop.registry at this bco-ray's registry")
    return state


def save(cfg: Config, state: dict) -> None:
    """Written whole: a temp file renamed into place (one PUT on S3)."""
    fs, root = storage.filesystem(registry_uri(cfg), cfg.storage)
    data = json.dumps(state, indent=1).encode()
    if storage.is_s3(registry_uri(cfg)):
        storage.write_bytes(fs, storage.join(root, "state.json"), data)
        return
    temp = storage.join(root, f".state.{uuid.uuid4().hex[:8]}.tmp")
    storage.write_bytes(fs, temp, data)
    fs.move(temp, storage.join(root, "state.json"))


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def event(state: dict, name: str, **fields) -> None:
    state["events"].append({"at": now(), "event": name, **fields})


def _day(value: str, key: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise UserError(f"{key} {value!r} is not a day (YYYY-MM-DD)", f"--{key} last, or a day such as 2026-12-01") \
            from None


def plan(cfg: Config, today: dt.date | None = None) -> tuple[Config, dict | None]:
    """This run's settings under loop.*: (the config to run, what the manifest records).
    None when loop.since is null (the run reads what ingest.date_from/date_to say)."""
    lc = cfg.loop
    if lc.since is None:
        return cfg, None
    state = load(cfg)
    today = today or dt.datetime.now(dt.UTC).date()
    if lc.since == "last":
        after = state["runs"][-1]["watermark"] if state["runs"] else None
    else:
        after = _day(lc.since, "loop.since").isoformat()
    first = _day(after, "watermark") + dt.timedelta(days=1) if after else None
    if cfg.ingest.date_from:
        floor = _day(cfg.ingest.date_from, "ingest.date_from")
        first = max(first, floor) if first else floor
    last = today - dt.timedelta(days=1) if lc.until == "yesterday" else today
    if cfg.ingest.date_to:
        last = min(last, _day(cfg.ingest.date_to, "ingest.date_to"))
    info = {"since": lc.since, "after": after, "days": [first.isoformat() if first else None, last.isoformat()],
            "watermark": last.isoformat(), "registry": registry_uri(cfg)}
    if first and first > last:
        return cfg, {**info, "nothing_new": True}

    base = cfg.model.policy
    promoted = state["promoted"]["uri"] if state["promoted"] else None
    start = promoted if lc.start_from == "promoted" and promoted else base
    reference = (cfg.model.reference or base) if lc.reference == "base" else start
    shift_from = None
    if lc.carry_reward_shift:
        if lc.reference != "base":
            raise UserError("loop.carry_reward_shift needs loop.reference base",
                            "a new reference resets every reward to 0 at step 0: the carried delta would not "
                            "apply; set --loop.reference base, or --loop.carry_reward_shift false")
        shift_from = promoted if start == promoted else None  # the base model has no run card
    export = cfg.train.export or storage.join(cfg.run.run_dir, "models", last.isoformat())
    run_cfg = dataclasses.replace(
        cfg,
        ingest=dataclasses.replace(cfg.ingest, date_from=first.isoformat() if first else None,
                                   date_to=last.isoformat()),
        model=dataclasses.replace(cfg.model, policy=start, reference=reference),
        objective=dataclasses.replace(cfg.objective, reward_shift_from=shift_from),
        train=dataclasses.replace(cfg.train, export=export))
    return run_cfg, {**info, "nothing_new": False, "started_from": start, "reference": reference,
                     "reward_shift_from": shift_from, "model": export}


def record_run(cfg: Config, info: dict, manifest: dict) -> dict:
    """The finished run in the registry: its watermark is where the next `--since last` starts."""
    state = load(cfg)
    ev = manifest["stages"].get("eval") or {}
    verdict = "disabled" if ev.get("disabled") else ("passed" if ev.get("passed") else
                                                    "rejected" if "passed" in ev else "not run")
    run = {"run_dir": cfg.run.run_dir, "days": info["days"], "watermark": info["watermark"],
           "model": info["model"] if "train" in manifest["stages"] else None, "eval": verdict,
           "started_from": info["started_from"], "reference": info["reference"], "finished_at": now()}
    state["runs"].append(run)
    save(cfg, state)
    return run


def last_candidate(state: dict) -> str | None:
    """The newest run's model that its eval passed (or that ran with the gate off)."""
    for run in reversed(state["runs"]):
        if run.get("model") and run.get("eval") in ("passed", "disabled"):
            return run["model"]
    return None
