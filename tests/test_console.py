"""What a person reads: the console's lines and log, the summary, secrets kept out of logs."""

import io
import os
from pathlib import Path

from bco_ray.cli import redact_argv
from bco_ray.console import Console
from bco_ray.pipeline import summary_lines


def test_lines_go_to_the_console_and_the_run_log(tmp_path):
    out = io.StringIO()  # not a TTY: no status redraws, plain lines
    con = Console(str(tmp_path), verbose=False, stream=out)
    con.stage("prepare")
    con.status("pass 1/3")
    con.end_stage("[bco-ray] stage prepare done in 1.0s")
    con.log_only("only in the log")
    con.close()
    assert out.getvalue().splitlines() == ["[bco-ray] stage prepare ...", "[bco-ray] stage prepare done in 1.0s"]
    log = (tmp_path / "logs" / "bco-ray.log").read_text()
    assert "[prepare] pass 1/3" in log and "only in the log" in log and "stage prepare done" in log


def test_secret_overrides_are_redacted_from_the_logged_command_line():
    argv = ["align", "--storage.secret_access_key", "s3cr3t", "--storage.access_key_id=AKIA123",
            "--serve.api_keys", "[k1]", "--run.seed", "3"]
    red = redact_argv(argv)
    assert "s3cr3t" not in " ".join(red) and "AKIA123" not in " ".join(red) and "k1" not in " ".join(red)
    assert red == ["align", "--storage.secret_access_key", "***", "--storage.access_key_id=***",
                   "--serve.api_keys", "***", "--run.seed", "3"]


def test_workers_get_no_secret_and_config_keys_move_to_the_environment(monkeypatch):
    """What Ray tasks, actors and deployments get (to_dict) holds no secret; storage keys
    set in the config go to the environment a local cluster inherits, and are refused when
    the run joins a cluster whose workers could not get them."""
    import sys

    import pytest

    from bco_ray.config import load_config, to_dict
    from bco_ray.errors import UserError
    from bco_ray.storage import credentials_to_environment

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    # As in a CLI process before it starts Ray (this test session's cluster may be up already).
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "an-old-token")
    keys = ["--storage.access_key_id", "AKIAFAKE01", "--storage.secret_access_key", "fake/secret02"]
    cfg = load_config(None, [*keys, "--serve.api_keys", "[fake-api-03]"])
    flat = str(to_dict(cfg))
    assert not any(s in flat for s in ("AKIAFAKE01", "fake/secret02", "fake-api-03"))
    assert to_dict(cfg)["storage"]["access_key_id"] is None and to_dict(cfg)["serve"]["api_keys"] == ()

    with pytest.raises(UserError, match="reach only the workers of a local cluster"):
        credentials_to_environment(load_config(None, [*keys, "--ray.address", "127.0.0.1:6379"]))
    assert "AWS_ACCESS_KEY_ID" not in os.environ  # nothing exported on refusal
    with pytest.raises(UserError, match="go together"):
        credentials_to_environment(load_config(None, keys[:2]))

    moved = credentials_to_environment(cfg)
    assert (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]) == ("AKIAFAKE01", "fake/secret02")
    assert "AWS_SESSION_TOKEN" not in os.environ
    assert moved.storage.access_key_id is None and moved.storage.secret_access_key is None
    # Joining is fine when this environment already holds the same keys (a pod given them).
    joined = credentials_to_environment(load_config(None, [*keys, "--ray.address", "127.0.0.1:6379"]))
    assert joined.storage.secret_access_key is None


def test_submit_refuses_a_secret_on_the_jobs_command_line():
    import subprocess
    import sys

    cli = str(Path(sys.executable).parent / "bco-ray")
    p = subprocess.run([cli, "submit", "--address", "http://127.0.0.1:9", "--storage.secret_access_key", "s3cr3t"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "would travel in the job's command line" in p.stderr and "s3cr3t" not in p.stderr


def test_the_summary_names_every_figure_a_newcomer_looks_for():
    manifest = {"seconds": 301.4, "stages": {
        "prepare": {"rows_read": 682, "kept": 651, "quarantined": 30, "deduplicated": 4,
                    "udm": {"enabled": True, "heldout_auc": 0.685}},
        "train": {"steps": 20, "model": "/runs/demo/model", "final_metrics": {"loss": 0.55},
                  "final_eval": {"eval/loss": 0.64, "eval/reward_accuracy": 0.76, "eval/rewards/margin": 0.49}},
        "eval": {"passed": True, "metrics": {"greedy": {"degenerate": {"candidate": {"rate": 0.0625},
                                                                        "reference": {"rate": 0.03125}}},
                                             "kl": {"per_token": 0.0412}}},
        "serve": {"url": "http://127.0.0.1:8000/v1", "question": "Q?", "answer": "An\nanswer."}}}
    text = "\n".join(summary_lines(manifest, Path("runs/demo/report/report.md")))
    for expected in ("682 read, 651 kept, 30 quarantined, 4 deduplicated", "held-out AUC 0.685", "20 steps",
                     "eval loss 0.6400", "reward accuracy 0.760", "/runs/demo/model", "An answer.",
                     "runs/demo/report/report.md", "301 s", "passed; greedy looping 6% (reference 3%), KL 0.0412"):
        assert expected in text, expected
