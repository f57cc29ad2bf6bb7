"""The eval stage: the quality measures by hand, `run_eval` on real models (an untouched one,
and one deliberately collapsed to answer `1.1.1.1…`), and `bco-ray eval` through the CLI on
a real Ray cluster (token auth on): the collapsed model is flagged, marked rejected beside its
weights, and `bco-ray serve` refuses it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bco_ray.config import load_config
from bco_ray.eval import quality

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "bco-ray")
PROMPTS = ["How do I reset my password?", "What is the capital of France?", "Give me a tip for sleeping better.",
           "How do I boil an egg?", "What does a VPN do?", "Name a good book for a long flight."]


# ---------------------------------------------------------------------------- the measures, by hand

def test_repeated_ngram_share_and_distinct_n_by_hand():
    # trigrams (1,2,1) (2,1,2) (1,2,1) (2,1,2): 2 distinct of 4
    assert quality.repeated_ngram_share([1, 2, 1, 2, 1, 2], 3) == 0.5
    assert quality.repeated_ngram_share([1, 2, 3, 4, 5], 3) == 0.0
    assert quality.repeated_ngram_share([1, 2], 3) == 0.0  # no trigram at all
    assert quality.distinct_n([[1, 2, 3], [1, 2]], 1) == 3 / 5
    assert quality.distinct_n([[1, 2, 3], [1, 2]], 2) == 2 / 3  # (1,2) (2,3) (1,2)
    loop = [7, 8] * 10
    assert quality.is_degenerate(loop, "1.1.")
    assert not quality.is_degenerate(loop[:10], "1.1.")  # too short to call
    assert not quality.is_degenerate(list(range(40)), "prose")
    assert quality.compression_ratio("1." * 100) > 10 > quality.compression_ratio("Open settings, then Security.")


def test_wilson_interval_matches_the_published_values():
    lo, hi = quality.wilson(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    lo, hi = quality.wilson(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775
    assert quality.wilson(0, 0) == (0.0, 1.0)


def test_paired_bootstrap_is_seeded_and_covers_the_mean():
    x = np.random.default_rng(1).normal(0.3, 1.0, 400)
    a, b = quality.bootstrap_mean(x, seed=3), quality.bootstrap_mean(x, seed=3)
    assert a == b and a[0] < x.mean() < a[1]
    assert a[1] - a[0] == pytest.approx(2 * 1.96 * x.std() / np.sqrt(len(x)), rel=0.15)


def test_kl_estimate_by_hand():
    kl = quality.kl_estimate(np.array([1.0, -1.0, 2.0]), np.zeros(3), np.array([2, 2, 2]))
    assert kl["per_answer"] == pytest.approx(2 / 3) and kl["per_token"] == pytest.approx(2 / 6)
    assert kl["n"] == 3


def _answers(texts_ids, finish="stop"):
    return [{"token_ids": ids, "text": t, "finish_reason": finish} for t, ids in texts_ids]


def test_compare_and_gate():
    good = _answers([("Open settings.", list(range(20)))] * 10)
    loops = _answers([("1.1.1.", [5, 6] * 12)] * 7 + [("ok", [1, 2])] * 3, finish="length")
    m = quality.compare(loops, good, max_tokens=24)
    assert m["degenerate"]["candidate"]["rate"] == 0.7 and m["degenerate"]["reference"]["rate"] == 0.0
    assert m["degenerate"]["difference"]["mean"] == pytest.approx(0.7)
    assert m["at_max_tokens"]["candidate"]["rate"] == 0.7  # the two-token answers stopped short of 24
    lo, hi = m["degenerate"]["candidate"]["ci95"]
    assert lo < 0.7 < hi
    limits = {"max_degenerate_increase": 0.1, "max_length_increase": 0.2, "max_empty_increase": 0.1,
              "max_kl_per_token": 1.0}
    reasons = quality.gate({"greedy": m, "kl": {"per_token": 2.5}}, limits)
    assert len(reasons) == 3 and "degenerate" in reasons[0] and "max_tokens" in reasons[1] and "KL" in reasons[2]
    same = quality.compare(good, good, max_tokens=24)
    assert quality.gate({"greedy": same, "sampled": same, "kl": {"per_token": 0.0}}, limits) == []
    off = dict.fromkeys(limits)
    assert quality.gate({"greedy": m, "kl": {"per_token": 2.5}}, off) == []
    with pytest.raises(ValueError, match="paired"):
        quality.compare(good, good[:3], 24)


# ---------------------------------------------------------------------------- real models

def collapse(model_dir: Path, out: Path) -> Path:
    """SmolLM2 made to loop `1.1.1.…` on every prompt: its blocks add nothing (the residual is
    the current token's embedding) and an untied head maps "\\n" and "." to "1", "1" to "."."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    one, dot, nl = (tok.convert_tokens_to_ids(t) for t in ("1", ".", "Ċ"))
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = m.model.embed_tokens.weight.detach().clone()
        head = emb.clone()
        head[one], head[dot] = 30 * (emb[dot] + emb[nl]), 30 * emb[one]
        m.config.tie_word_embeddings = False
        m.lm_head = torch.nn.Linear(emb.shape[1], emb.shape[0], bias=False)
        m.lm_head.weight.copy_(head)
    m.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from bco_ray.assets import resolve_model

    ref = resolve_model("smollm2-135m-instruct")
    return ref, collapse(ref, tmp_path_factory.mktemp("collapsed") / "model")


def _cfg(tmp_path: Path, *extra: str):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS[:4])
                       + "\n" + json.dumps({"messages": [{"role": "user", "content": PROMPTS[4]}]}) + "\n")
    return load_config(None, ["--eval.prompts", str(prompts), "--eval.max_tokens", "24", "--eval.samples", "1",
                              "--eval.judge", "none", "--run.seed", "1", *extra])


@pytest.mark.slow
def test_run_eval_the_reference_against_itself_passes_with_zero_kl(models, tmp_path):
    from bco_ray.eval.stage import eval_prompts, run_eval

    ref, _ = models
    cfg = _cfg(tmp_path)
    prompts, _ = eval_prompts(cfg)
    assert len(prompts) == 5 and prompts[4]["prompt_messages"] is not None
    r = run_eval(cfg, str(ref), str(ref), prompts, device="cpu")
    a = r["answers"]
    assert [x["text"] for x in a["candidate"]["greedy"]] == [x["text"] for x in a["reference"]["greedy"]]
    assert [x["text"] for x in a["candidate"]["sampled"]] == [x["text"] for x in a["reference"]["sampled"]]  # paired seeds
    assert r["kl"]["per_token"] == 0.0 and r["kl"]["n"] == 5
    assert r["greedy"]["degenerate"]["difference"]["mean"] == 0.0
    assert quality.gate(r, {"max_degenerate_increase": 0.1, "max_length_increase": 0.2,
                            "max_empty_increase": 0.1, "max_kl_per_token": 1.0}) == []
    assert all(x["text"].strip() for x in a["reference"]["greedy"])


@pytest.mark.slow
def test_run_eval_flags_the_collapsed_model(models, tmp_path):
    from bco_ray.eval.stage import eval_prompts, run_eval

    ref, collapsed = models
    cfg = _cfg(tmp_path)
    prompts, _ = eval_prompts(cfg)
    r = run_eval(cfg, str(collapsed), str(ref), prompts, device="cpu")
    cand = r["answers"]["candidate"]["greedy"]
    assert all(x["text"].startswith("1.1.1.") for x in cand), [x["text"] for x in cand]
    assert r["greedy"]["degenerate"]["candidate"]["rate"] == 1.0
    assert r["greedy"]["distinct_2"]["candidate"] < 0.1 < r["greedy"]["distinct_2"]["reference"]
    # Far from the reference on its own samples, though less than one might think: after a
    # few "1." the reference copies the loop too (0.89 nats/token measured), so the looping
    # rate, not the KL, is what catches this collapse.
    assert r["kl"]["per_token"] > 0.5
    reasons = quality.gate(r, {"max_degenerate_increase": 0.1, "max_length_increase": None,
                               "max_empty_increase": 0.1, "max_kl_per_token": 0.5})
    assert any(x.startswith("greedy degenerate") for x in reasons) and any("KL" in x for x in reasons)


# ---------------------------------------------------------------------------- the CLI, on Ray

def cli(*args, timeout=600):
    p = subprocess.run([CLI, *args], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_bco_ray_eval_rejects_the_collapsed_model_and_serve_refuses_it(models, prepared_tiny, tmp_path):
    """The prompts and the feedback judge come from a prepared log's splits, as in `align`."""
    import shutil

    ref, collapsed = models
    model = shutil.copytree(collapsed, tmp_path / "model")
    run = tmp_path / "run"
    args = ["--model.policy", "smollm2-135m-instruct", "--eval.model", str(model),
            "--eval.input", str(prepared_tiny / "prepared"), "--eval.num_prompts", "6", "--eval.max_tokens", "24",
            "--eval.judge_sample_size", "64", "--run.run_dir", str(run), "--ray.num_cpus", "2"]
    code, out, err = cli("eval", *args)
    assert code == 1, (out[-3000:], err[-3000:])
    line = [x for x in err.splitlines() if x.startswith("bco-ray: error: ")]
    assert line and "failed the eval gate" in line[0] and "degenerate" in line[0], err[-3000:]
    assert "[eval] gate: REJECTED" in out and "judge (feedback, held-out AUC" in out
    verdict = json.loads((model / "eval.json").read_text())
    assert verdict["passed"] is False and verdict["enforced"] is True and verdict["reasons"]
    full = json.loads((run / "eval" / "eval.json").read_text())
    assert full["prompts_from"].startswith("the eval split") and full["metrics"]["prompts"] == 6
    assert {"info", "greedy", "sampled"} <= full["metrics"]["judge"].keys()
    assert full["side_by_side"][0]["candidate"].startswith("1.1.1.")
    rows = [json.loads(x) for x in (run / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 6 and {r["model"] for r in rows} == {"candidate", "reference"}

    code, out, err = cli("serve", "--serve.model", str(model), "--run.run_dir", str(run), timeout=120)
    assert code == 2 and "rejected by the eval gate" in err, err[-2000:]

    # Evaluated with the gate not enforced: reported, exit 0, and servable.
    code, out, err = cli("eval", *args, "--eval.enforce", "false", "--eval.judge", "none", "--eval.samples", "0",
                         "--eval.num_prompts", "2")
    assert code == 0, err[-3000:]
    assert json.loads((model / "eval.json").read_text())["enforced"] is False


# ---------------------------------------------------------------------------- judges

def test_openai_judge_over_real_http_parses_scores_and_counts_unparsable_replies(monkeypatch):
    """A real OpenAI client against an OpenAI-compatible HTTP server on 127.0.0.1 (a stand-in
    judge model replying with fixed text); the key comes from the environment."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from bco_ray.config import JUDGE_PROMPT
    from bco_ray.eval.judge import OpenAIJudge
    from tests.conftest import free_port

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the stdlib's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.headers.get("Authorization"), body))
            text = body["messages"][0]["content"]
            reply = "Score: 10" if "good answer" in text else ("3" if "meh" in text else "I cannot rate this.")
            out = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *a):
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-123")
        judge = OpenAIJudge(f"http://127.0.0.1:{port}/v1", "judge-1", JUDGE_PROMPT, "MY_JUDGE_KEY")
        scores = judge.score(["q1", "q2", "q3"], ["a good answer", "meh", "???"])
        # Unscored pairs are left out of the comparison, and counted.
        from bco_ray.eval.stage import _judged

        cand = [{"prompt": 0, "text": "a good answer"}, {"prompt": 1, "text": "???"}]
        ref = [{"prompt": 0, "text": "meh"}, {"prompt": 1, "text": "meh"}]
        r = _judged(judge, ["q1", "q2"], cand, ref, seed=0)
    finally:
        server.shutdown()
        server.server_close()
    assert scores[0] == 1.0 and scores[1] == pytest.approx(2 / 9) and np.isnan(scores[2])
    assert judge.info["unparsable"] == 2 and "sk-test" not in json.dumps(judge.info)  # one "???" per call
    assert all(auth == "Bearer sk-test-123" for auth, _ in seen) and seen[0][1]["temperature"] == 0
    assert "Question:\nq1" in [b for _, b in seen if "good" in b["messages"][0]["content"]][0]["messages"][0]["content"]
    assert r["n"] == 1 and r["unscored"] == 1 and r["win_rate"] == 1.0


def test_reward_model_judge_scores_with_a_sequence_classifier(tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from bco_ray.assets import resolve_model
    from bco_ray.eval.judge import RewardModelJudge

    tok = AutoTokenizer.from_pretrained(resolve_model("tiny-llama"))
    torch.manual_seed(0)
    m = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                                   pad_token_id=tok.pad_token_id))
    m.save_pretrained(tmp_path / "rm", safe_serialization=True)
    tok.save_pretrained(tmp_path / "rm")
    judge = RewardModelJudge(str(tmp_path / "rm"))
    s = judge.score(["q"] * 3, ["short", "a longer answer here", "short"])
    assert s.shape == (3,) and ((0 < s) & (s < 1)).all() and s[0] == pytest.approx(s[2])
