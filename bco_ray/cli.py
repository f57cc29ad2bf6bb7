"""`bco-ray`: one subcommand per stage, plus the whole pipeline (`align`).

Every subcommand takes `--config FILE` and dotted overrides (`--objective.beta 0.2`).
"""

from __future__ import annotations

import argparse
import sys

from bco_ray.config import ConfigError, docs_markdown, dump_yaml, load_config

PIPELINE = "assets -> prepare -> udm -> score-ref -> train -> serve"


def _config_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", metavar="FILE", help="YAML config; dotted overrides follow, e.g. --run.seed 3")
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
    sub.add_parser("align", parents=[parent], help="run the whole pipeline (every stage below, in order)")
    sub.add_parser("assets", parents=[parent], help="stage: materialise the bundled models into the cache")
    sub.add_parser("prepare", parents=[parent],
                   help="stage: feedback logs (local/S3 parquet) -> cleaned, tokenized, split, UDM-weighted data")
    sub.add_parser("score-ref", parents=[parent],
                   help="stage: reference model's log-prob of every prepared completion (vLLM or transformers)")
    sub.add_parser("train", parents=[parent],
                   help="stage: BCO (or KTO/DPO) on Ray Train from the scored data; exports the aligned model")
    sub.add_parser("serve", parents=[parent],
                   help="stage: the aligned model behind an OpenAI-compatible HTTP API (Ray Serve), with feedback")
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
        cfg = load_config(args.config, rest)  # validated here, before anything is submitted
    except (ConfigError, FileNotFoundError) as e:
        print(f"bco-ray: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(dump_yaml(cfg), end="")
        return 0
    if args.command == "assets":
        from bco_ray import assets

        for role in ("policy", "reference", "embedder"):
            name = getattr(cfg.model, role) or cfg.model.policy
            print(f"{role}: {assets.resolve_model(name, cfg.model.cache_dir)}")
        return 0
    if args.command == "prepare":
        import json

        from bco_ray.ingest import prepare
        from bco_ray.raycluster import init_ray

        init_ray(cfg.ray)
        manifest = prepare(cfg)
        print(json.dumps({k: v for k, v in manifest.items() if k != "config"}, indent=1))
        return 0
    if args.command == "score-ref":
        import json

        from bco_ray.raycluster import init_ray
        from bco_ray.refscore_stage import score_reference

        init_ray(cfg.ray)
        manifest = score_reference(cfg)
        print(json.dumps({k: v for k, v in manifest.items() if k != "config"}, indent=1))
        return 0
    if args.command == "submit":
        from bco_ray.submit import submit

        bad = [e for e in args.env if "=" not in e]
        if bad:
            parser.error(f"--env needs KEY=VALUE, got {bad[0]!r}")
        return submit(args.address, args.config, rest, args.working_dir, args.pip,
                      env=dict(e.split("=", 1) for e in args.env), follow=not args.no_follow)
    if args.command == "train":
        from bco_ray.raycluster import init_ray
        from bco_ray.train import train

        init_ray(cfg.ray)
        card = train(cfg)
        print(f"[bco-ray] model: {card['model']} (run card: {card['model']}/run_card.json)")
        return 0
    if args.command == "serve":
        import time

        from bco_ray import serve
        from bco_ray.raycluster import init_ray

        init_ray(cfg.ray)
        url = serve.start(cfg)
        print(f"[bco-ray] serving {cfg.serve.model_name} at {url} (Ctrl-C stops; feedback is flushed)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.stop()
        return 0
    if args.command == "align":
        from bco_ray.pipeline import align

        align(cfg)
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
