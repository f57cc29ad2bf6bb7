"""`bco-ray canary start|status|promote|rollback`: a candidate model beside the promoted one
in the running application, on a share of the users, judged by their thumbs.

    bco-ray canary start    --config prod.yaml --canary.share 0.1   # the registry's last passing run
    bco-ray canary status   --config prod.yaml                      # thumbs-up rate per version, 95 % CI
    bco-ray canary promote  --config prod.yaml                      # the candidate answers everyone
    bco-ray canary rollback --config prod.yaml                      # the promoted model answers everyone

Every change is a new routing of one application (bco_ray/serve/stage.py `deploy`): a version
kept by the change keeps its replicas; the gateway's routes change in place; a version
dropped is first routed no traffic, then drained and removed. So no request is dropped and
the promoted model is never reloaded. The state (promoted, candidate, share, start time) is
in the loop's registry (bco_ray/registry.py); `status` reads only the registry and the logs.
"""

from __future__ import annotations

import uuid

from bco_ray import registry, storage
from bco_ray.config import Config
from bco_ray.errors import UserError
from bco_ray.serve import stage


def promoted_uri(cfg: Config, state: dict) -> str:
    """The registry's promoted model; before any promotion, serve.model or the base model."""
    if state["promoted"]:
        return state["promoted"]["uri"]
    return cfg.serve.model or cfg.model.policy


def _require_app() -> None:
    if not stage.running():
        raise UserError("no bco-ray application is served on this cluster",
                        "start one with `bco-ray canary start` (or `bco-ray serve`), and give --ray.address "
                        "(or RAY_ADDRESS) of the cluster that runs it")


def start(cfg: Config) -> dict:
    """The candidate on canary.share of the users. Starts Serve when the cluster has no
    application yet; otherwise loads the candidate first, unrouted, then routes its share."""
    state = registry.load(cfg)
    if state["canary"]:
        raise UserError(f"a canary is running already ({state['canary']['uri']}, since {state['canary']['started_at']})",
                        "`bco-ray canary promote` or `bco-ray canary rollback` it first")
    share = cfg.canary.share
    if not 0.0 < share < 1.0:
        raise UserError(f"canary.share {share} is not in (0, 1)", "--canary.share 0.1 sends a tenth of the users")
    candidate = cfg.canary.candidate or registry.last_candidate(state)
    if not candidate:
        raise UserError("no candidate: the registry has no run whose eval passed",
                        "run `bco-ray align --since last`, or give --canary.candidate MODEL_DIR")
    promoted = promoted_uri(cfg, state)
    salt, started = uuid.uuid4().hex[:12], registry.now()  # before the first answer it may give
    routes = [{"role": "candidate", "uri": candidate, "share": share},
              {"role": "promoted", "uri": promoted, "share": 1.0 - share}]
    if stage.running():
        stage.deploy(cfg, [{**routes[1], "share": 1.0}, {**routes[0], "share": 0.0}], salt)
        stage.deploy(cfg, routes, salt)
        url = stage.base_url(cfg)
    else:
        url = stage.start(cfg, routes, salt)
    state["canary"] = {"uri": candidate, "version": stage.model_version(candidate, cfg)["version"], "share": share,
                       "salt": salt, "started_at": started, "promoted": promoted}
    registry.event(state, "canary_start", candidate=candidate, promoted=promoted, share=share)
    registry.save(cfg, state)
    return {"url": url, **state["canary"]}


def promote(cfg: Config) -> dict:
    """The candidate answers everyone and becomes the promoted model."""
    state, canary = _canary(cfg)
    _require_app()
    old = promoted_uri(cfg, state)
    stage.deploy(cfg, [{"role": "promoted", "uri": canary["uri"], "share": 1.0},
                       {"role": "previous", "uri": old, "share": 0.0}], canary["salt"])
    stage.deploy(cfg, [{"role": "promoted", "uri": canary["uri"], "share": 1.0}], canary["salt"])
    state["promoted"] = {"uri": canary["uri"], "version": canary["version"], "since": registry.now()}
    state["canary"] = None
    registry.event(state, "promote", model=canary["uri"], previous=old)
    registry.save(cfg, state)
    return state["promoted"]


def rollback(cfg: Config) -> dict:
    """The promoted model answers everyone again; the candidate is removed."""
    state, canary = _canary(cfg)
    _require_app()
    promoted = promoted_uri(cfg, state)
    stage.deploy(cfg, [{"role": "promoted", "uri": promoted, "share": 1.0},
                       {"role": "candidate", "uri": canary["uri"], "share": 0.0}], canary["salt"])
    stage.deploy(cfg, [{"role": "promoted", "uri": promoted, "share": 1.0}], canary["salt"])
    state["canary"] = None
    registry.event(state, "rollback", model=canary["uri"], promoted=promoted)
    registry.save(cfg, state)
    return {"uri": promoted}


def _canary(cfg: Config) -> tuple[dict, dict]:
    state = registry.load(cfg)
    if not state["canary"]:
        raise UserError(f"no canary is running (registry {registry.registry_uri(cfg)})",
                        "`bco-ray canary start` first")
    return state, state["canary"]


# ---------------------------------------------------------------------------- status

def _read(fs, files: list[str], columns: list[str]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for f in files:
        with fs.open_input_file(f) as h:
            tables.append(pq.read_table(h, columns=columns))
    return pa.concat_tables(tables) if tables else None


def _days_from(fs, root: str, day: str) -> list[str]:
    return [f for f in storage.list_parquet(fs, root)
            if (d := storage.partition_value(f, "date")) is not None and d >= day]


def tally(cfg: Config, canary: dict) -> dict:
    """Per version, over the answers served since the canary started: answers served, rated
    answers, thumbs up. A caller's latest vote on an answer counts (as in `prepare`)."""
    import pyarrow.compute as pc

    from bco_ray.data.normalise import SERVED

    log = cfg.serve.feedback_log or storage.join(cfg.run.run_dir, "feedback")
    fs, root = storage.filesystem(log, cfg.storage)
    start_day = canary["started_at"][:10]
    started = canary["started_at"]
    served = _read(fs, _days_from(fs, storage.join(root, SERVED), start_day),
                   ["completion_id", "choice_index", "model_version", "served_at"])
    version_of, answers = {}, {}
    if served is not None:
        import datetime as dt

        import pyarrow as pa

        since = pa.scalar(dt.datetime.fromisoformat(started), type=served.schema.field("served_at").type)
        cutoff = pc.greater_equal(served.column("served_at"), since)
        for cid, i, v in zip(*(served.filter(cutoff).column(c).to_pylist()
                               for c in ("completion_id", "choice_index", "model_version")), strict=True):
            version_of[(cid, i)] = v
            answers[v] = answers.get(v, 0) + 1
    files = [f for f in _days_from(fs, root, start_day) if f"/{SERVED}/" not in f and "/_dead_letter/" not in f]
    rows = _read(fs, files, ["completion_id", "choice_index", "label", "caller", "feedback_at"])
    votes: dict = {}
    if rows is not None:
        for cid, i, label, caller, _at in sorted(zip(*(rows.column(c).to_pylist() for c in
                                                      ("completion_id", "choice_index", "label", "caller",
                                                       "feedback_at")), strict=True), key=lambda r: r[4]):
            if (cid, i) in version_of:  # an answer served since the canary started
                votes[(cid, i, caller)] = (version_of[(cid, i)], label == "thumbs_up")
    out = {v: {"answers": n, "rated": 0, "up": 0} for v, n in answers.items()}
    for version, up in votes.values():
        o = out.setdefault(version, {"answers": 0, "rated": 0, "up": 0})
        o["rated"] += 1
        o["up"] += int(up)
    return out


def status(cfg: Config) -> dict:
    """The canary's numbers, from the logs: per version its thumbs-up rate with a 95 % Wilson
    interval, and the candidate's difference to the promoted model with a 95 % interval."""
    from bco_ray.eval.quality import wilson

    state, canary = _canary(cfg)
    counts = tally(cfg, canary)
    promoted_version = state["promoted"]["version"] if state["promoted"] else stage.model_version(
        canary["promoted"], cfg)["version"]
    rows = {}
    for role, version in (("promoted", promoted_version), ("candidate", canary["version"])):
        c = counts.get(version, {"answers": 0, "rated": 0, "up": 0})
        lo, hi = wilson(c["up"], c["rated"]) if c["rated"] else (0.0, 1.0)
        rows[role] = {**c, "version": version, "rate": c["up"] / c["rated"] if c["rated"] else None,
                      "ci95": [round(lo, 4), round(hi, 4)]}
    verdict = _verdict(rows, cfg.canary.min_rated)
    return {"started_at": canary["started_at"], "share": canary["share"], "versions": rows, **verdict}


def _verdict(rows: dict, min_rated: int) -> dict:
    """The difference candidate - promoted with a 95 % interval (Newcombe's, from the two
    Wilson intervals), and what it says once each version has min_rated rated answers."""
    import math

    p, c = rows["promoted"], rows["candidate"]
    if min(p["rated"], c["rated"]) < min_rated:
        return {"difference": None, "verdict": f"wait: fewer than {min_rated} rated answers on a version "
                                               f"(promoted {p['rated']}, candidate {c['rated']})"}
    d = c["rate"] - p["rate"]
    (l1, u1), (l2, u2) = c["ci95"], p["ci95"]
    lo = d - math.sqrt((c["rate"] - l1) ** 2 + (u2 - p["rate"]) ** 2)
    hi = d + math.sqrt((u1 - c["rate"]) ** 2 + (p["rate"] - l2) ** 2)
    verdict = "promote: the candidate is rated higher" if lo > 0 else \
        "roll back: the candidate is rated lower" if hi < 0 else "no difference shown yet: keep collecting"
    return {"difference": {"candidate_minus_promoted": round(d, 4), "ci95": [round(lo, 4), round(hi, 4)]},
            "verdict": verdict}


def status_lines(s: dict) -> list[str]:
    lines = [f"canary since {s['started_at']}, candidate share {s['share']:.0%}",
             f"  {'version':<10} {'fingerprint':<13} {'answers':>8} {'rated':>7} {'thumbs up':>10}  95 % CI"]
    for role, r in s["versions"].items():
        rate = f"{r['rate']:.1%}" if r["rate"] is not None else "-"
        lines.append(f"  {role:<10} {r['version'].rsplit('@', 1)[-1]:<13} {r['answers']:>8} {r['rated']:>7} "
                     f"{rate:>10}  [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]")
    if s["difference"]:
        d = s["difference"]
        lines.append(f"  candidate - promoted: {d['candidate_minus_promoted']:+.1%} "
                     f"[{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}]")
    lines.append(f"  verdict: {s['verdict']}")
    return lines
