"""`bco-ray`: one subcommand per stage, plus the whole pipeline (`align`).

Every subcommand takes `--config FILE` and dotted overrides (`--objective.beta 0.2`).
A mistake the user can fix (a wrong column name, path, port, credentials) is one line with
what to do, exit status 2 (1 when a stage ran and kept nothing); anything else is one line
naming the error, exit status 1. Full tracebacks go to <run_dir>/logs/bco-ray.log, and to
the console with --verbose, which also shows Ray's own logs.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from bco_ray.config import ConfigError, docs_markdown, dump_yaml, load_config, secret_keys
from bco_ray.errors import UserError, first_line

PIPELINE = "assets -> prepare -> udm -> score-ref -> train -> eval -> serve"


def _config_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", metavar="FILE", help="YAML config; dotted overrides follow, e.g. --run.seed 3")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own logs and full tracebacks on the console (they are always in <run_dir>/logs)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bco-ray",
        description="Align an LLM from thumbs-up / thumbs-down feedback with Binary Classifier "
                    f"Optimization, on Ray. Pipeline: {PIPELINE}.",
        epilog="Config keys: `bco-ray config docs`. Example: bco-ray align --config configs/demo.yaml "
               "--objective.beta 0.2",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parent = _config_parent()
    al = sub.add_parser("align", parents=[parent], help="run the whole pipeline (every stage below, in order)")
    al.add_argument("--since", metavar="last|DAY", default=None,
                    help="the continuous loop: read only the log's days after the last run's watermark (or after "
                         "DAY), starting from the promoted model (= --loop.since)")
    sub.add_parser("assets", parents=[parent], help="stage: materialise the bundled models into the cache")
    sub.add_parser("prepare", parents=[parent],
                   help="stage: feedback logs (local/S3 parquet) -> cleaned, tokenized, split, UDM-weighted data")
    sub.add_parser("score-ref", parents=[parent],
                   help="stage: reference model's log-prob of every prepared completion (vLLM or transformers)")
    sub.add_parser("train", parents=[parent],
                   help="stage: BCO (or KTO/DPO) on Ray Train from the scored data; exports the aligned model")
    sub.add_parser("eval", parents=[parent],
                   help="stage: the trained model vs its reference on held-out prompts (looping, length, KL, a "
                        "judge); exit 1 when the gate rejects it")
    sub.add_parser("tune", parents=[parent],
                   help="sweep lr, beta and steps on Ray Tune: each trial trains and is judged by the eval stage; "
                        "writes the table and the best trial's overrides")
    sub.add_parser("serve", parents=[parent],
                   help="stage: the aligned model behind an OpenAI-compatible HTTP API (Ray Serve), with feedback")
    ca = sub.add_parser("canary", help="a candidate model on a share of the users beside the promoted one: "
                                       "start | status | promote | rollback")
    ca.add_argument("action", choices=("start", "status", "promote", "rollback"))
    ca.add_argument("--config", metavar="FILE", help="YAML config; dotted overrides follow, e.g. --canary.share 0.2")
    ca.add_argument("--verbose", action="store_true", help="show Ray's own logs and full tracebacks on the console")
    sub.add_parser("compact", parents=[parent],
                   help="merge the feedback log's small files into one file per day and kind (no row lost)")
    sm = sub.add_parser("submit", parents=[parent],
                        help="run `align` as a Ray job on a cluster (Jobs API); streams its logs, exits with its status")
    sm.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265")
    sm.add_argument("--working-dir", default=".", help="project directory uploaded with the job (default: .)")
    sm.add_argument("--pip", action="append", default=None, metavar="REQ",
                    help="extra pip requirement for the job's environment (repeatable), e.g. bco-ray[lora]")
    sm.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment variable for the job (repeatable), e.g. AWS_REGION=eu-west-1")
    sm.add_argument("--no-follow", action="store_true", help="print the job id and return")
    cfg = sub.add_parser("config", help="print the resolved config, or the config reference")
    cfg_sub = cfg.add_subparsers(dest="action", required=True, metavar="ACTION")
    cfg_sub.add_parser("show", parents=[parent], help="print the resolved config as YAML")
    cfg_sub.add_parser("docs", help="print the configuration reference (markdown)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "config" and args.action == "docs":
            if rest:
                parser.error(f"unexpected arguments: {' '.join(rest)}")
            print(docs_markdown())
            return 0
        if getattr(args, "since", None):
            rest = [*rest, "--loop.since", args.since]
        cfg = load_config(args.config, rest)  # validated here, before anything is submitted
    except (ConfigError, FileNotFoundError) as e:
        print(f"bco-ray: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(dump_yaml(cfg), end="")
        return 0
    if args.command == "submit":
        from bco_ray.submit import submit

        bad = [e for e in args.env if "=" not in e]
        if bad:
            parser.error(f"--env needs KEY=VALUE, got {bad[0]!r}")
        if secret := next((a for a in rest if a.lstrip("-").split("=", 1)[0] in SECRET_KEYS), None):
            # A job's entrypoint is shown by `ray job list` and the dashboard to anyone who can reach it.
            print(f"bco-ray: config error: {secret.split('=', 1)[0]} would travel in the job's command line; give "
                  "the cluster the secret instead (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or BCO_RAY_API_KEYS "
                  "from a Kubernetes secret, or an IAM role)", file=sys.stderr)
            return 2
        return submit(args.address, args.config, rest, args.working_dir, args.pip,
                      env=dict(e.split("=", 1) for e in args.env), follow=not args.no_follow)
    from bco_ray import console

    con = console.activate(cfg.run.run_dir, args.verbose)
    con.log_only("bco-ray " + " ".join(redact_argv(sys.argv[1:] if argv is None else argv)))
    try:
        return _run(args.command if args.command != "canary" else f"canary-{args.action}", cfg)
    except KeyboardInterrupt:
        con.line("bco-ray: interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns errors into a line and a status
        return _report_error(con, args.command, e, args.verbose)
    finally:
        _finish(con, cfg)


SECRET_KEYS = secret_keys()


def redact_argv(argv: list[str]) -> list[str]:
    """The command line without the values of secret overrides (for logs)."""
    out, hide = [], False
    for a in argv:
        if hide:
            out.append("***")
            hide = False
        elif a.lstrip("-").split("=", 1)[0] in SECRET_KEYS:
            out.append(a.split("=", 1)[0] + ("=***" if "=" in a else ""))
            hide = "=" not in a
        else:
            out.append(a)
    return out


def _user_error(e: BaseException) -> UserError | None:
    """The UserError behind `e`: itself, a storage error we can explain, or the cause of a
    Ray task / Train error that wraps one."""
    from bco_ray import storage

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        if isinstance(e, OSError) and (explained := storage.explain(e, "the storage")):
            return explained
        e = getattr(e, "cause", None) or e.__cause__
    return None


def _report_error(con, command: str, e: Exception, verbose: bool) -> int:
    trace = "".join(traceback.format_exception(e))
    con.log_only(trace)
    if verbose:
        print(trace, file=sys.stderr)
    user = _user_error(e)
    if user is not None:
        print(f"bco-ray: error: {user.problem}; {user.fix}", file=sys.stderr)
        con.log_only(f"bco-ray: error: {user.problem}; {user.fix}")
        return user.exit_code
    print(f"bco-ray: {command} failed: {type(e).__name__}: {first_line(e)}\n"
          f"  the full trace is in {con.log_path}{'' if verbose else '; --verbose shows it here'}", file=sys.stderr)
    return 1


def _finish(con, cfg) -> None:
    """Ray's session logs next to ours; the console's threads stop."""
    import ray

    if ray.is_initialized():
        try:
            from bco_ray.console import copy_ray_logs

            copy_ray_logs(cfg.run.run_dir)
        except OSError as e:
            con.log_only(f"could not copy Ray's logs: {e}")
    con.close()


def _run(command: str, cfg) -> int:
    import json

    from bco_ray import preflight, storage
    from bco_ray.raycluster import init_ray

    cfg = storage.credentials_to_environment(cfg)  # before Ray starts: its workers inherit the environment
    if command == "assets":
        from bco_ray import assets

        for role in ("policy", "reference", "embedder"):
            name = getattr(cfg.model, role) or cfg.model.policy
            print(f"{role}: {assets.resolve_model(name, cfg.model.cache_dir)}")
        return 0
    if command.startswith("canary-"):
        return _canary(command.removeprefix("canary-"), cfg)
    preflight.check_before_ray(cfg, command)
    init_ray(cfg.ray)
    preflight.check_after_ray(cfg, command)
    if command == "prepare":
        from bco_ray.data.ingest import prepare

        manifest = prepare(cfg)
        print(json.dumps({k: v for k, v in manifest.items() if k != "config"}, indent=1))
        return 0
    if command == "score-ref":
        from bco_ray.score.stage import score_reference

        manifest = score_reference(cfg)
        print(json.dumps({k: v for k, v in manifest.items() if k != "config"}, indent=1))
        return 0
    if command == "train":
        from bco_ray.train.stage import train

        card = train(cfg)
        print(f"[bco-ray] model: {card['model']} (run card: {card['model']}/run_card.json)")
        return 0
    if command == "eval":
        from bco_ray.eval.stage import evaluate

        evaluate(cfg)  # prints its summary; a rejected model raises (exit 1)
        return 0
    if command == "tune":
        from bco_ray.sweep import sweep

        sweep(cfg)
        return 0
    if command == "serve":
        from bco_ray.serve import stage as serve

        url = serve.start(cfg)
        print(f"[bco-ray] serving {cfg.serve.model_name} at {url} (Ctrl-C stops; feedback is flushed)", flush=True)
        return _serve_until_interrupted()
    if command == "compact":
        from bco_ray.data.compact import compact

        report = compact(cfg)
        return 1 if report["unreadable"] else 0
    if command == "align":
        from bco_ray.pipeline import align

        align(cfg)
        return 0
    raise ValueError(f"unknown command {command}")


def _serve_until_interrupted() -> int:
    import time

    from bco_ray.serve import stage as serve

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.stop()
    return 0


def _canary(action: str, cfg) -> int:
    import json

    from bco_ray.errors import UserError
    from bco_ray.raycluster import init_ray, joins_cluster
    from bco_ray.serve import canary

    if action == "status":  # the registry and the logs: no cluster needed
        s = canary.status(cfg)
        print("\n".join(canary.status_lines(s)))
        print(json.dumps(s))
        return 0
    local = not joins_cluster(cfg.ray)
    if local and action != "start":
        raise UserError(f"`canary {action}` changes the application a running cluster serves",
                        "give that cluster: --ray.address HOST:6379 (or RAY_ADDRESS); locally, `ray start --head` "
                        "first and run every canary command with --ray.address auto")
    init_ray(cfg.ray)
    if action == "start":
        out = canary.start(cfg)
        print(f"[bco-ray] canary: {out['uri']} answers {out['share']:.0%} of the users at {out['url']}, beside "
              f"{out['promoted']}", flush=True)
        if local:  # this process's cluster goes with it: keep serving, as `bco-ray serve` does
            print("[bco-ray] serving until Ctrl-C (a local cluster lives as long as this command)", flush=True)
            return _serve_until_interrupted()
        return 0
    out = canary.promote(cfg) if action == "promote" else canary.rollback(cfg)
    print(f"[bco-ray] {'promoted' if action == 'promote' else 'rolled back'}: {out['uri']} answers every user",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
