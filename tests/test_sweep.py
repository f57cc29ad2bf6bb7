"""`bco-ray tune`: a grid on Ray Tune, each trial trained on Ray Train and judged by the eval
stage, through the CLI on a fresh local cluster (token auth on, as shipped)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bco_ray.config import load_config
from bco_ray.sweep import grid, rank, score, trial_name
from tests.conftest import TINY

CLI = str(Path(sys.executable).parent / "bco-ray")


def test_grid_names_and_the_override_file_round_trip():
    cfg = load_config(None, ["--tune.lr", "[1e-6, 3e-5]", "--tune.beta", "[0.1, 0.5]", "--tune.steps", "[10, 40]"])
    points = grid(cfg)
    assert len(points) == 8 and points[0] == {"lr": 1e-6, "beta": 0.1, "steps": 10}
    assert len({trial_name(p) for p in points}) == 8
    assert grid(load_config(None, ["--train.max_steps", "7"]))[0]["steps"] == 7  # no steps: the config's


def _summary(passed=True, kl=0.01, diff=0.02, win=0.6):
    rate = {"candidate": {"rate": 0.0}, "reference": {"rate": 0.0}}
    return {"passed": passed, "reasons": [] if passed else ["greedy looping"],
            "metrics": {"greedy": {"degenerate": rate, "at_max_tokens": rate, "length_ratio": 1.0},
                        "kl": {"per_token": kl, "per_answer": kl * 30},
                        "judge": {"sampled": {"candidate": 0.5 + diff, "reference": 0.5, "win_rate": win,
                                              "win_rate_ci95": [0.4, 0.8],
                                              "difference": {"mean": diff, "ci95": [diff - 0.01, diff + 0.01]}}}}}


def test_a_trial_wins_only_within_the_gate_and_the_kl_budget():
    card = {"steps": 10, "exported_step": 10, "stopped_early": None, "final_eval": {"eval/loss": 0.6}}
    cfg = load_config(None, ["--tune.max_kl_per_token", "0.05"])
    ok = {"trial": "ok", **score(_summary(diff=0.02), card, cfg)}
    greedy_judge = score({**_summary(), "metrics": {**_summary()["metrics"], "judge": {}}}, card, cfg)
    assert math.isnan(greedy_judge["objective"]) and not greedy_judge["feasible"]  # no judge, no ranking
    far = {"trial": "far", **score(_summary(diff=0.09, kl=0.2), card, cfg)}  # better judged, but past the budget
    looping = {"trial": "loop", **score(_summary(passed=False, diff=0.2), card, cfg)}
    assert ok["feasible"] and not far["feasible"] and not looping["feasible"]
    assert "tune.max_kl_per_token" in far["reasons"][0]
    assert [r["trial"] for r in rank([looping, far, ok])] == ["ok", "loop", "far"]  # feasible first, then by score
    assert score(_summary(), card, load_config(None, ["--tune.objective", "win_rate"]))["objective"] == 0.6
    # Without its own budget, the sweep holds trials to the eval gate's KL limit.
    assert score(_summary(kl=0.9), card, load_config(None, []))["feasible"]
    assert not score(_summary(kl=1.1), card, load_config(None, []))["feasible"]


@pytest.mark.ray
@pytest.mark.slow
def test_bco_ray_tune_trains_and_judges_each_trial_and_keeps_the_best(prepared_tiny, scored_tiny, tmp_path):
    run_dir = tmp_path / "run"
    args = TINY + ["--run.run_dir", str(run_dir), "--ray.num_cpus", "2", "--train.input", scored_tiny,
                   "--eval.input", str(prepared_tiny / "prepared"), "--train.micro_batch_size", "2",
                   # one worker per trial (the plain module): two would test nothing more here than
                   # test_train does, and cost each trial a second process and its imports
                   "--train.num_workers", "1",
                   "--train.grad_accum", "2", "--train.max_steps", "2", "--train.eval_every", "1",
                   "--train.tracking_uri", "none", "--eval.num_prompts", "6", "--eval.max_tokens", "8",
                   "--eval.judge_sample_size", "64", "--tune.lr", "[1e-4, 1e-2]"]
    p = subprocess.run([CLI, "tune", *args], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = run_dir / "tune"
    res = json.loads((out / "results.json").read_text())
    assert not res["failed"] and len(res["trials"]) == 2
    assert {t["lr"] for t in res["trials"]} == {1e-4, 1e-2}
    for t in res["trials"]:
        # Every figure comes from that trial's own eval stage: its eval.json holds the same.
        ev = json.loads((out / "trials" / t["trial"] / "eval" / "eval.json").read_text())
        judged = ev["metrics"]["judge"]["sampled"]
        assert t["objective"] == judged["difference"]["mean"] and t["kl_per_token"] == ev["metrics"]["kl"]["per_token"]
        assert t["passed"] == ev["passed"] and t["steps"] == 2
        assert not (out / "trials" / t["trial"] / "train").exists()  # checkpoints dropped
    # Seeded, so the outcome is fixed: the tiny random model at lr 1e-2 passes the gate.
    feasible = [t for t in res["trials"] if t["feasible"]]
    assert feasible, res["trials"]
    best = res["best"]
    assert best["objective"] == max(t["objective"] for t in feasible)
    assert Path(best["model"], "model.safetensors").exists()
    assert all(not Path(t["model"]).exists() for t in res["trials"] if t["trial"] != best["trial"])
    tuned = load_config(out / "best.yaml")  # a config file the user can pass as it is
    assert tuned.train.lr == best["lr"] and tuned.objective.beta == best["beta"]
    assert "[tune] best: lr" in p.stdout and "[tune] trial 2/2" in p.stdout
    assert "| trial | lr |" in (out / "results.md").read_text()
