"""`bco-ray train` on real Ray Train (2 CPU workers, tiny model), from a scored dataset."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bco_ray.config import load_config
from tests.conftest import TINY

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# 2 workers x micro 2 x accum 2 = 8 rows per step; 4 steps.
TRAIN = ["--train.micro_batch_size", "2", "--train.grad_accum", "2", "--train.max_steps", "4",
         "--train.lr", "1e-3", "--train.warmup_ratio", "0", "--train.checkpoint_every", "2",
         "--train.tracking_uri", "none", "--objective.beta", "0.5",
         "--train.eval_every", "2",  # an eval right before each checkpoint (FSDP2's root stays unsharded)
         # These tests compare the last weights across runs (2 workers vs 1, resumed vs not), so
         # they export the final weights and never stop early; the generation check still runs
         # at every eval (2 workers decode in lockstep). Its verdict and early stop are tested
         # below and in test_gencheck.
         "--train.export_which", "final", "--train.early_stop_patience", "0"]


@pytest.fixture(scope="module")
def scored(scored_tiny):
    return scored_tiny


@pytest.fixture(scope="module")
def full(scored, tmp_path_factory):
    """2 workers, 4 steps, uninterrupted: what the tests below compare against (run once)."""
    return run(scored, tmp_path_factory.mktemp("full"), name="full")


def run(scored, tmp_path, *extra, name="t", **hooks):
    from bco_ray.train.stage import train

    cfg = load_config(None, TINY + TRAIN + ["--train.input", scored, "--run.run_dir", str(tmp_path),
                                            "--train.name", name, *extra])
    return train(cfg, **hooks)


def weights(model_dir):
    return load_file(os.path.join(model_dir, "model.safetensors"))


def test_two_fsdp_workers_equal_one_process_and_a_one_worker_checkpoint_resumes_on_two(scored, full, tmp_path):
    """1 worker accumulating 4 micro-batches trains what 2 FSDP workers train, and its
    checkpoint resumes on 2 workers: cut at step 3 (a worker dies, no retry), rerun with the
    same name on 2 workers, every step and the last weights match the uninterrupted 2-worker
    run within the rounding that separates 1 worker from 2. (One cut run for both checks:
    an uninterrupted 1-worker run costs CI about 30 s of Ray Train start and stop.)"""
    from transformers import AutoModelForCausalLM

    two = full
    marker = str(tmp_path / "killed")
    with pytest.raises(Exception):  # noqa: B017 - Ray's error type for a dead worker group varies
        run(scored, tmp_path, "--train.num_workers", "1", "--train.grad_accum", "4", "--train.max_failures", "0",
            name="w", _fail_at_step=3, _fail_marker=marker)
    assert os.path.exists(marker)
    one = run(scored, tmp_path, "--train.num_workers", "2", name="w")
    assert two["steps"] == one["steps"] == 4 and [h["step"] for h in one["history"]] == [1, 2, 3, 4]
    # Reward accuracy is left out: it thresholds each reward at delta, so a row whose reward
    # sits within rounding of delta flips it (test_trainstep checks it on exact equivalence).
    for a, b in zip(two["history"], one["history"], strict=True):
        assert a["rows"] == b["rows"] == 8
        for key in ("loss", "delta", "rewards/chosen", "rewards/rejected"):
            if a["step"] == 1:  # same weights: only the forward's rounding (padding differs) separates them
                assert a[key] == pytest.approx(b[key], abs=2e-6), key
            else:  # reduce-scatter and local accumulation round differently; Adam's m/sqrt(v) magnifies it
                assert a[key] == pytest.approx(b[key], rel=2e-3, abs=2e-5), (a["step"], key)
    assert two["history"][0]["delta"] == 0.0 and two["history"][-1]["delta"] != 0.0  # delta moved, identically
    assert two["history"][-1]["loss"] != two["history"][0]["loss"]
    wa, wb = weights(two["model"]), weights(one["model"])
    assert wa.keys() == wb.keys()
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    print(f"2 FSDP workers vs 1 process (resumed on 2 at step 3) after 4 steps: max abs weight diff {diff:.2e}")
    assert diff < 1e-4
    # The export is a plain HF model directory with its tokenizer and a run card.
    model = AutoModelForCausalLM.from_pretrained(two["model"])
    assert model.config.use_cache and os.path.exists(os.path.join(two["model"], "tokenizer.json"))
    card = json.loads(open(os.path.join(two["model"], "run_card.json")).read())
    assert card["steps"] == 4 and card["final_eval"]["eval/rows"] > 0
    # Each worker read its own rows only: 4 steps x its 4 of each global batch of 8 (the
    # split has more: the old path had every worker read all of it, every epoch); resumed,
    # steps 3 and 4 only.
    assert two["rows_read"]["train"] == [16, 16] and one["rows_read"]["train"] == [8, 8]
    assert two["data"]["train"]["rows"] > 32
    # Where the time went: every phase timed, none negative, and together they are the stage.
    # (The resumed run's steps 1-2 and its step-2 checkpoint are the cut run's.)
    for c, first_step, mid_checkpoint in ((two, 1, {"checkpoint"}), (one, 3, set())):
        ph = c["phase_seconds"]
        assert {"splits in the global order", "worker setup", "reading batches", "optimizer steps", "eval",
                "export", "worker group start and stop, final checkpoint"} | mid_checkpoint <= set(ph), ph
        stepped = sum(h["seconds"] for h in c["history"] if h["step"] >= first_step)
        assert min(ph.values()) >= 0 and ph["optimizer steps"] >= stepped - 0.06  # rounded to 0.1 s
        assert sum(ph.values()) == pytest.approx(c["seconds"], abs=1.0), (ph, c["seconds"])


@pytest.mark.parametrize("loss", ["kto", "dpo"])
def test_baselines_train_on_two_workers_and_a_failing_generation_check_stops_kto_early(scored, tmp_path, loss):
    """KTO and DPO on two workers. The KTO run is also the early-stop check (one Ray Train
    run for both: each costs CI about 30 s of start and stop): the generation check's verdict
    stops every worker at the same eval, and the report says why. The tiny random model
    cannot be made to collapse on cue, so the gate is made to fail by a limit no model meets
    (a negative allowed increase of cut answers); test_gencheck checks the verdict on real
    looping answers, test_eval the gate on a collapsed model; the CI demo run trains through
    passing checks and exports the best of them."""
    from bco_ray.report import generation_check_section

    # The test log has few complete pairs: DPO takes one pair per worker per step.
    extra = (["--train.micro_batch_size", "1", "--train.grad_accum", "1", "--train.max_steps", "2"] if loss == "dpo"
             else ["--train.export_which", "best", "--train.early_stop_patience", "1", "--eval.max_length_increase",
                   "-1", "--train.gen_check_prompts", "3", "--train.gen_check_max_tokens", "8"])  # 4 steps, eval at 2
    # Each eval reads the first 6 units of the eval split only (train.eval_max_rows).
    card = run(scored, tmp_path, "--objective.loss", loss, "--train.eval_max_rows", "6", *extra)
    assert card["steps"] == 2 and all(np.isfinite(h["loss"]) for h in card["history"])
    assert card["final_eval"]["eval/rows"] == min(6, card["data"]["eval"]["units"])
    assert card["history"][0]["loss"] == pytest.approx(np.log(2) if loss == "dpo" else 0.5, abs=1e-5)  # at init
    if loss == "dpo":
        assert card["history"][0]["rows"] == 2  # pairs, one per worker
        assert card["data"]["train"]["units"] < card["data"]["train"]["rows"] / 2  # pairs only
        return
    assert [h["step"] for h in card["history"]] == [1, 2]  # of 4
    assert card["stopped_early"]["step"] == 2 and "max_tokens" in card["stopped_early"]["reasons"][0]
    ev = card["eval_history"]
    assert len(ev) == 1 and ev[0]["gen/prompts"] == 3 and ev[0]["gen/passed"] is False
    assert card["exported_step"] == 2  # no eval passed: the last weights, for the eval stage to judge
    assert os.path.exists(os.path.join(card["model"], "model.safetensors"))
    section = "\n".join(generation_check_section(card))
    assert "**failed**" in section and "stopped early" in section


def test_a_cut_run_resumes_on_another_number_of_workers_and_ends_like_the_uninterrupted_one(scored, full, tmp_path):
    """A 2-worker run whose worker dies at step 3, no retry allowed: it fails after its step-2
    checkpoint. Rerun with the same name it resumes from there, here on 1 worker (the same
    global batch of 8 rows): each worker reads its rows of every tensor from the old workers'
    files, no row of steps 1-2 is read again, and the run ends as the uninterrupted 2-worker
    run does, within the rounding that separates 1 worker from 2
    (test_two_fsdp_workers_equal_one_process_and_a_one_worker_checkpoint_resumes_on_two). A
    resume on the same number of workers is exact: test_a_killed_worker_is_replaced (1e-5). One cut run serves both checks: each
    costs CI about 30 s of Ray Train start and stop."""
    marker = str(tmp_path / "killed")
    with pytest.raises(Exception):  # noqa: B017 - Ray's error type for a dead worker group varies
        run(scored, tmp_path, "--train.max_failures", "0", name="cut", _fail_at_step=3, _fail_marker=marker)
    assert os.path.exists(marker)
    # The same name with another lr is another run: refused (before any sorting or training),
    # not silently resumed.
    from bco_ray.errors import UserError

    with pytest.raises(UserError, match=r"step 2\) of a different run.*train\.lr 0\.001 -> 0\.0005.*--train\.resume force"):
        run(scored, tmp_path, "--train.lr", "5e-4", name="cut")
    resumed = run(scored, tmp_path, "--train.num_workers", "1", "--train.grad_accum", "4", name="cut")
    assert [h["step"] for h in resumed["history"]] == [1, 2, 3, 4]
    assert resumed["rows_read"]["train"] == [16]  # steps 3 and 4 only: no replay of steps 1-2
    for a, b in zip(resumed["history"], full["history"], strict=True):
        for key in ("loss", "delta", "rewards/chosen", "rewards/rejected"):
            if a["step"] <= 2:  # the cut run's own steps (2 workers, as `full`), carried in its checkpoint
                assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
            else:
                assert a[key] == pytest.approx(b[key], rel=2e-3, abs=2e-5), (a["step"], key)
    wa, wb = weights(full["model"]), weights(resumed["model"])
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


def test_a_killed_worker_is_replaced_and_the_run_resumes_from_its_checkpoint(scored, full, tmp_path):
    marker = str(tmp_path / "killed")
    faulty = run(scored, tmp_path / "faulty", name="faulty", _fail_at_step=3, _fail_marker=marker)
    assert os.path.exists(marker)  # a worker process really died at step 3
    assert faulty["steps"] == 4
    assert [h["step"] for h in faulty["history"]] == [1, 2, 3, 4]  # step 3 redone from the step-2 checkpoint
    assert faulty["history"][-1]["delta"] == pytest.approx(full["history"][-1]["delta"], abs=1e-6)
    assert faulty["history"][-1]["loss"] == pytest.approx(full["history"][-1]["loss"], abs=1e-5)
    wa, wb = weights(full["model"]), weights(faulty["model"])
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5


def test_lora_on_s3_trains_adapters_only_and_the_merged_export_serves_from_there(scored, tmp_path, s3_endpoint):
    """LoRA, with its checkpoint and the exported model on a real S3 server (moto): only the
    adapted projections change, the export is a plain merged model, and it is downloaded the
    way `bco-ray serve --serve.model s3://...` does, and loads. (One run for both: each Ray
    Train run costs CI about 30 s of start and stop.)"""
    import pyarrow.fs as pafs
    from transformers import AutoModelForCausalLM

    from bco_ray.assets import local_model_dir, resolve_model

    s3 = ["--storage.endpoint_url", s3_endpoint, "--storage.access_key_id", "testing",
          "--storage.secret_access_key", "testing", "--storage.region", "us-east-1"]
    # checkpoint_every 0: only the final checkpoint (it divided by zero once)
    card = run(scored, tmp_path, *s3, "--train.storage", "s3://logs/ckpt", "--train.export", "s3://logs/models/m1",
               "--train.lora_r", "4", "--train.lora_targets", "[q_proj, v_proj]", "--train.max_steps", "2",
               "--train.checkpoint_every", "0", "--model.cache_dir", str(tmp_path / "cache"))
    assert card["steps"] == 2 and card["history"][0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # B = 0: log 2
    assert card["model"] == "s3://logs/models/m1" and card["checkpoint"].startswith("logs/ckpt/")
    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint.removeprefix("http://"), scheme="http",
                           access_key="testing", secret_key="testing", region="us-east-1")
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector("logs/models/m1"))}
    assert {"model.safetensors", "config.json", "tokenizer.json", "run_card.json", "README.md"} <= names
    ckpt = {i.base_name for i in fs.get_file_info(pafs.FileSelector(card["checkpoint"]))}
    assert {"rank0.json", "rank1.json", "rank0-00000.safetensors", "rank1-00000.safetensors", "state.json"} <= ckpt
    cfg = load_config(None, TINY + s3 + ["--model.cache_dir", str(tmp_path / "cache")])
    local = local_model_dir("s3://logs/models/m1", cfg)
    assert AutoModelForCausalLM.from_pretrained(local) is not None
    assert local_model_dir("s3://logs/models/m1", cfg) == local  # downloaded once
    base, tuned = weights(str(resolve_model("tiny-llama"))), weights(local)
    assert tuned.keys() == base.keys()  # merged: a plain model, no adapter keys
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed), changed


@pytest.mark.parametrize("loss", ["bco", "dpo"])
def test_the_driver_sort_and_ray_datas_sort_write_the_same_global_order(scored, ray_local, tmp_path, loss):
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    from bco_ray.train import shards
    from bco_ray.train.stage import TRAIN_COLUMNS, complete_pairs, write_order

    fs = pafs.LocalFileSystem()
    data = os.path.join(scored, "data")
    meta = pads.dataset(data, format="parquet").to_table(columns=["split", "label", "pair_id"])
    pairs = complete_pairs(meta, "train") if loss == "dpo" else None

    def order(driver_sort_rows):
        cfg = load_config(None, TINY + ["--train.driver_sort_rows", str(driver_sort_rows),
                                        "--objective.loss", loss])
        out = str(tmp_path / f"{loss}-{driver_sort_rows}")
        index = write_order(data, fs, "train", TRAIN_COLUMNS, 10**6, cfg, fs, out, 4, {"k": 1}, pairs)
        return shards.SplitReader(fs, out, index).rows(0, index["rows"])

    in_driver, distributed = order(10**7), order(0)
    assert len(in_driver) > 50 if loss == "bco" else len(in_driver) >= 4  # the log has few complete pairs
    assert [r["row_id"] for r in in_driver] == [r["row_id"] for r in distributed]  # the same rows, same order
    if loss == "dpo":  # complete pairs only, each as two adjacent rows, the chosen one first
        assert len(in_driver) == 2 * len(pairs)
        for chosen, rejected in zip(in_driver[::2], in_driver[1::2], strict=True):
            assert chosen["pair_id"] == rejected["pair_id"] and chosen["label"] and not rejected["label"]
