"""bench/alignment.py at toy size: the benchmark keeps working (real judge data from PyPI,
real pipeline stages, TRL 1.13's real BCOTrainer), and what it writes is consistent. Two of
the eight variants: bco-ray's BCO + UDM and TRL's BCOTrainer on the same rows. KTO and DPO
differ from BCO only in their objective, which test_objectives checks by hand-computed values
and test_train trains on two workers (DPO on the pairs `prepare` keeps, as the benchmark's
paired rows are); the BCO variants without UDM or with delta = 0 differ by one objective flag,
each tested numerically in test_trainstep; the shifted log is the same pipeline on other rows
(and test_ingest checks UDM on a shifted log). Each variant left out saves CI about 25 s.
bench/convergence.py runs on the same run's log (its --data-from), as a user would after it.

The full-size figures come from `python bench/alignment.py` (docs/alignment-benchmark.md)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


SUBSET = ["BCO + UDM", "TRL 1.13 BCOTrainer"]


def test_toy_alignment_benchmark_runs_its_variants_and_the_convergence_curve_on_its_log(ray_local, tmp_path,
                                                                                    monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_alignment", ROOT / "bench" / "alignment.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "align"
    monkeypatch.setattr(sys, "argv", ["alignment.py", "--toy", "--out", str(out), "--variants", ",".join(SUBSET)])
    bench.main()

    res = json.loads((out / "results.json").read_text())
    meta, summary, runs = res["meta"], res["summary"], res["runs"]
    assert 0.6 < meta["judge_accuracy"] <= 1.0  # a real classifier on real review sentences
    assert set(SUBSET) <= set(bench.VARIANTS)
    assert [r["variant"] for r in summary] == ["reference", *SUBSET]
    for r in runs:
        assert 0.0 <= r["positive_rate"] <= 1.0 and math.isfinite(r["kl"]), r
    ref = [r for r in runs if r["variant"] == "reference"]
    assert all(r["kl"] == 0.0 for r in ref)  # the reference against itself, same dtype: exactly 0
    trained = [r for r in runs if r["variant"] != "reference"]
    assert all(r["kl"] != 0.0 for r in trained)  # they did train
    ours = [r for r in trained if r["variant"] != bench.TRL]
    assert all(r["eval_reward_accuracy"] is not None for r in ours)
    (trl,) = [r["trl"] for r in trained if r["variant"] == bench.TRL]
    # TRL trained on bco-ray's train split, for the same number of steps
    split = sum(n for k, n in meta["data"]["balanced"]["prepare"]["kept_by_split_label"].items()
                if k.startswith("train/"))
    assert trl["steps"] == meta["size"]["steps"] and trl["rows"] == split, (trl, split)
    for r in summary:  # paired answers: every variant answered the same prompts, as many times
        assert r["answers"] == summary[0]["answers"] and r["positive_ci95"][0] <= r["positive_rate"] <= r["positive_ci95"][1]
        if r["variant"] != "reference":
            lo, hi = r["positive_diff_ci95"]
            assert lo <= r["positive_diff"] <= hi and r["answers_for_5_points"] > 0
    for name, d in meta["data"].items():  # the pipeline's own accounting held on both logs
        p = d["prepare"]
        assert p["rows_read"] == meta["logs"][name]["rows"] - meta["logs"][name].get("pairs", 0), (name, p)
        assert p["examples"] == meta["logs"][name]["rows"] == p["kept"] + p["quarantined"] + p["deduplicated"]
        assert d["score"]["scored"] + d["score"]["quarantined"] == d["score"]["rows_in"]
    table = (out / "results.md").read_text()
    assert all(f"| {v} |" in table for v in SUBSET)
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "logs" / "balanced").is_dir() and (out / "logs" / "shifted").is_dir()

    # the per-genre split (UDM's experiment): every held-out answer is on one side, and the
    # pooled rate is the answer-weighted mean of the two sides' rates
    side_a = meta["heldout_side_a"]
    assert any(side_a) and not all(side_a)
    for r in summary:
        a, b = r["side_A"], r["side_B"]
        assert a["answers"] + b["answers"] == r["answers"]
        pooled = (a["positive_rate"] * a["answers"] + b["positive_rate"] * b["answers"]) / r["answers"]
        assert math.isclose(pooled, r["positive_rate"], abs_tol=1e-9)
    assert "By held-out prompt genre" in table
    # head to head, paired: bco-ray's default against TRL, its interval around its estimate
    (head,) = res["contrasts"]
    assert (head["variant"], head["against"]) == ("BCO + UDM", bench.TRL) and head["seeds"] == meta["seeds"]
    lo, hi = head["positive_diff_ci95"]
    assert lo <= head["positive_diff"] <= hi and "Head to head" in table
    ours_kl = [r["kl"] for r in runs if r["variant"] == "BCO + UDM"]
    trl_kl = [r["kl"] for r in runs if r["variant"] == bench.TRL]
    assert head["kl_diff"][0] == pytest.approx(sum(ours_kl) / len(ours_kl) - sum(trl_kl) / len(trl_kl))

    # --from-partial rebuilds the same summary from what a crashed run leaves behind
    first = (out / "results.json").read_text()
    monkeypatch.setattr(sys, "argv", ["alignment.py", "--toy", "--out", str(out), "--from-partial"])
    bench.main()
    again = json.loads((out / "results.json").read_text())
    assert again["summary"] == json.loads(first)["summary"] and again["meta"]["partial"] == "1 whole seed(s) of 1"
    # --rebuild rewrites the tables from a finished run's results.json
    (out / "results.md").unlink()
    monkeypatch.setattr(sys, "argv", ["alignment.py", "--toy", "--out", str(out), "--rebuild"])
    bench.main()
    assert json.loads((out / "results.json").read_text())["contrasts"] == again["contrasts"]
    assert (out / "results.md").read_text().startswith("| variant |")

    # bench/convergence.py on this run's balanced log (--data-from: not sampled, prepared and
    # scored again, ~1 min of CI): one run checkpointed every 2 steps, every checkpoint's weights
    # judged against step 0 on the same paired answers, beside the train stage's eval curve.
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_convergence", ROOT / "bench" / "convergence.py")
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    curve_out = tmp_path / "conv"
    monkeypatch.setattr(sys, "argv", ["convergence.py", "--toy", "--out", str(curve_out), "--epochs", "0.5",
                                      "--every", "2", "--data-from", str(out)])
    conv.main()

    res = json.loads((curve_out / "curve.json").read_text())
    train_rows = sum(n for k, n in meta["data"]["balanced"]["prepare"]["kept_by_split_label"].items()
                     if k.startswith("train/"))
    assert res["train_rows"] == train_rows  # the alignment run's split, not a new log's
    steps = [c["step"] for c in res["curve"]]
    assert steps == list(range(0, res["steps"] + 1, 2)) and res["steps"] >= 4, steps
    first, *trained = res["curve"]
    assert first["kl"] == 0.0 and first["vs_reference"] is None  # the reference against itself
    assert all(c["kl"] != 0.0 and c["eval/loss"] is not None for c in trained)  # each point is its own weights
    assert all(c["vs_reference"][1][0] <= c["vs_reference"][0] <= c["vs_reference"][1][1] for c in trained)
    assert [c["epoch"] for c in trained] == sorted(c["epoch"] for c in trained)
    assert "| step | epoch |" in (curve_out / "curve.md").read_text()
    assert not list(curve_out.rglob("rank0-*.safetensors"))  # the checkpoints (GBs at full size) are removed
    assert not (curve_out / "logs").exists()
