"""The generation check that runs during training (bco_ray.train.gencheck): the sharded policy
decodes exactly what the plain engine decodes, with its weights kept gathered or not, the verdict applies the eval gate's limits, and
'best' never picks a failed eval. Ray Train's early stop is in test_train."""

import json
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from bco_ray.config import load_config
from bco_ray.train.gencheck import generation_check, generation_verdict
from bco_ray.train.loop import _improved

QUESTIONS = ["How do I reset my password?", "What is two plus two?", "Name a colour.",
             "Write one sentence about the sea and the long grey winter light over it.", "Hi"]


def _prompts(tok) -> list[list[int]]:
    return [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)) for q in QUESTIONS]


def _plain_greedy(lm, tok, prompts, max_tokens, inner=None):
    """Greedy answers of `lm`, or of a module wrapping the LM `inner` (the training policy)."""
    from bco_ray.serve.generate import HFEngine, Sampling

    engine = HFEngine.wrap(lm, tok, torch.device("cpu"), config=getattr(inner, "config", None),
                           generation_config=getattr(inner, "generation_config", None))
    got: list = []
    for _ in engine.generate_iter(prompts, [Sampling(max_tokens=max_tokens, temperature=0.0)] * len(prompts), got):
        pass
    return [{"token_ids": list(o.token_ids), "text": o.text, "finish_reason": o.finish_reason} for o in got]


def _fsdp_worker(rank, world, init_file, out_dir):
    from distributed import gloo_group
    from torch.distributed.fsdp import fully_shard

    from bco_ray.assets import load_causal_lm
    from bco_ray.train.step import PolicyLogps

    with gloo_group(rank, world, init_file):
        torch.set_num_threads(1)
        lm, tok = load_causal_lm("tiny-llama", "float32")
        lm.config.use_cache = False  # as training builds it
        policy = PolicyLogps(lm)
        for layer in lm.get_decoder().layers:
            fully_shard(layer)
        fully_shard(policy)
        answers = generation_check(policy, lm, tok, torch.device("cpu"), _prompts(tok), 12, rank, world)
        # gather_share 0: the weights never fit, each decode step gathers them again (a 70B's path)
        regathered = generation_check(policy, lm, tok, torch.device("cpu"), _prompts(tok), 12, rank, world,
                                      gather_share=0.0)
        # Either way the weights are back in shards afterwards, each rank holding its half.
        sharded = all(p._local_tensor.numel() < p.numel() for p in policy.parameters() if p.numel() > 1)
        # Training goes on afterwards on the same shards: a step's forward and backward work.
        ids = torch.tensor([_prompts(tok)[0] + [5, 6, 7]])
        mask = torch.zeros_like(ids)
        mask[0, -3:] = 1
        policy(ids, torch.ones_like(ids), mask).sum().backward()
        grads = all(p.grad is not None for p in policy.parameters())
        with open(os.path.join(out_dir, f"r{rank}.json"), "w") as f:
            json.dump({"answers": answers, "regathered": regathered, "grads": grads, "sharded": sharded}, f)


@pytest.mark.dist
def test_two_fsdp_ranks_decode_what_the_plain_model_decodes():
    from bco_ray.assets import load_causal_lm

    lm, tok = load_causal_lm("tiny-llama", "float32")
    want = _plain_greedy(lm.eval(), tok, _prompts(tok), 12)
    with tempfile.TemporaryDirectory() as d:
        # 5 prompts over 2 ranks: rank 1 decodes a padding prompt, dropped after the gather.
        mp.spawn(_fsdp_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        got = [json.load(open(os.path.join(d, f"r{r}.json"))) for r in range(2)]
    assert got[0]["answers"] == got[1]["answers"]  # every rank holds all answers, in prompt order
    assert [a["token_ids"] for a in got[0]["answers"]] == [a["token_ids"] for a in want]
    assert all(len(a["token_ids"]) > 0 for a in want)
    assert got[0]["grads"] and got[1]["grads"]
    assert got[0]["regathered"] == got[0]["answers"] and got[0]["sharded"] and got[1]["sharded"]


def test_one_process_check_matches_the_plain_engine_and_keeps_training_mode(tiny_llama):
    from bco_ray.train.step import PolicyLogps

    lm, tok = tiny_llama
    policy = PolicyLogps(lm).train()
    answers = generation_check(policy, lm, tok, torch.device("cpu"), _prompts(tok)[:3], 10, 0, 1)
    assert policy.training  # back to training mode
    assert answers == _plain_greedy(lm.eval(), tok, _prompts(tok)[:3], 10)


def test_the_engine_decodes_what_transformers_generate_does_from_the_last_logits_only(tiny_llama):
    """Batched and left-padded, the engine's greedy tokens are transformers' generate() on each
    prompt alone (position ids reach the model through the training policy too), and the
    prefill asks for the last position's logits only (not prompt x vocabulary floats)."""
    from bco_ray.train.step import PolicyLogps

    lm, tok = tiny_llama
    lm = lm.eval()
    prompts = _prompts(tok)
    shapes: list = []
    hook = lm.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.logits.shape)))
    got = _plain_greedy(lm, tok, prompts, 10)
    via_policy = _plain_greedy(PolicyLogps(lm).eval(), tok, prompts, 10, inner=lm)
    hook.remove()
    assert shapes[0] == (len(prompts), 1, lm.config.vocab_size) and len({len(p) for p in prompts}) > 1
    assert via_policy == got
    eos = lm.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for p, answer in zip(prompts, got, strict=True):
        out = lm.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=10,
                          do_sample=False, pad_token_id=tok.pad_token_id or 0)[0, len(p):].tolist()
        want = out[:next((i for i, t in enumerate(out) if t in eos), len(out))]
        assert answer["token_ids"] == want, (answer, out)


def _answer(ids, finish="stop"):
    return {"token_ids": ids, "text": " ".join(map(str, ids)), "finish_reason": finish}


def test_verdict_fails_a_policy_that_starts_looping_and_passes_one_that_does_not():
    cfg = load_config(None, ["--train.gen_check_max_tokens", "24"])
    start = [_answer(list(range(i, i + 20))) for i in range(10)]  # varied, stopped answers
    looping = [_answer([7, 8] * 12, "length") for _ in range(3)] + start[3:]  # 3 of 10 loop, cut at 24
    v = generation_verdict(looping, start, cfg)
    assert not v["gen/passed"]
    assert v["gen/degenerate"] == pytest.approx(0.3) and v["gen/degenerate_start"] == 0.0
    assert v["gen/at_max_tokens"] == pytest.approx(0.3)
    assert any("looping" in r for r in v["gen/reasons"]) and any("max_tokens" in r for r in v["gen/reasons"])
    one = [_answer([7, 8] * 12, "length")] + start[1:]  # 10 % more: within eval.max_degenerate_increase
    assert generation_verdict(one, start, load_config(None, ["--eval.max_length_increase", "null"]))["gen/passed"]
    assert generation_verdict(start, start, cfg) == {**generation_verdict(start, start, cfg), "gen/passed": True}


def test_best_ignores_evals_whose_generation_check_failed():
    state: dict = {}
    assert _improved(state, {"eval/rows": 10, "eval/loss": 0.6, "gen/passed": True})
    assert not _improved(state, {"eval/rows": 10, "eval/loss": 0.1, "gen/passed": False})  # lower, but collapsed
    assert state["best_eval_loss"] == 0.6
    assert _improved(state, {"eval/rows": 10, "eval/loss": 0.5})  # no check: the loss decides
