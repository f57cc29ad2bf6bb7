"""Metrics to MLflow (a local file store by default, any tracking server by URI), from rank 0.

A resumed run continues the same MLflow run (its id travels in the checkpoint). With
`train.tracking_uri: none`, or without mlflow installed, logging is a no-op.
"""

from __future__ import annotations

import os

from bco_ray.config import Config, redacted


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:500]
    return out


class Tracker:
    def __init__(self, cfg: Config, uri: str | None, run_id: str | None = None):
        self.run_id = run_id
        self.mlflow = None
        if uri in (None, "none"):
            return
        try:
            import mlflow
        except ImportError:
            print("[train] mlflow is not installed: metrics go to the console and the checkpoints only", flush=True)
            return
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode behind this switch; it needs no
            # server and no database, which is what a default should need.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("bco-ray")
        run = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=cfg.train.name)
        if not run_id:
            mlflow.log_params(_flatten(redacted(cfg)))
        self.run_id, self.mlflow = run.info.run_id, mlflow

    def log(self, metrics: dict, step: int) -> None:
        if self.mlflow is None:
            return
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)}
        self.mlflow.log_metrics(clean, step=step)

    def close(self) -> None:
        if self.mlflow is not None:
            self.mlflow.end_run()
