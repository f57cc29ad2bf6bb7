"""The bundled models materialise offline as safetensors HF directories."""

import json
from pathlib import Path

import pytest
import torch

from bco_ray import assets


def test_tiny_llama_is_vllm_cpu_compatible_and_deterministic(tiny_llama):
    model, tok = tiny_llama
    path = assets.tiny_llama_dir()
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["hidden_size"] // cfg["num_attention_heads"] >= 32  # vLLM CPU attention
    assert (path / "model.safetensors").exists() and not list(path.glob("*.bin"))
    assert model.config.vocab_size == len(tok)
    assert tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    # Rebuilding gives the same weights (seeded), so tests are reproducible anywhere.
    emb = model.get_input_embeddings().weight
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM
    again = LlamaForCausalLM(LlamaConfig.from_pretrained(path))
    assert torch.equal(again.get_input_embeddings().weight, emb)


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(assets.AssetError, match="neither a bundled alias"):
        assets.resolve_model("Qwen/Qwen2-0.5B")
    with pytest.raises(assets.AssetError):
        assets.resolve_model(str(tmp_path))  # a directory without config.json


def test_minilm_embedder_is_bundled():
    d = assets.minilm_dir()
    assert (d / "model.safetensors").exists() and (d / "tokenizer.json").exists()


@pytest.mark.slow
def test_smollm2_materialises_and_generates():
    model, tok = assets.load_causal_lm("smollm2-135m-instruct")
    path = assets.smollm2_dir()
    assert (path / "model.safetensors").exists()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def _build_tiny(cache: str) -> str:
    from bco_ray.assets import tiny_llama_dir

    return str(tiny_llama_dir(cache))


def test_concurrent_materialisation_builds_once_and_every_caller_gets_it(tmp_path):
    """Ray Train workers on one node all resolve the model at once into a fresh cache."""
    import multiprocessing as mp

    from transformers import AutoConfig

    with mp.get_context("spawn").Pool(4) as pool:
        paths = pool.map(_build_tiny, [str(tmp_path)] * 4)
    assert len(set(paths)) == 1
    assert AutoConfig.from_pretrained(paths[0]).model_type == "llama"
    leftovers = [p.name for p in Path(paths[0]).parent.iterdir() if p.name.startswith("tiny-llama.")]
    assert leftovers == []  # no half-built temp directories left behind


def _build_on_rank_1(rank: int, cache: str, init_file: str):
    from tests.distributed import gloo_group

    with gloo_group(rank, 2, init_file):
        if rank == 1:  # rank 1 builds; rank 0 waits at the barrier, as a slower worker would
            assets.tiny_llama_dir(cache)
        import torch.distributed as dist

        dist.barrier()


def test_a_worker_of_rank_1_builds_a_complete_model(tmp_path):
    """transformers' save_pretrained writes nothing on a rank other than 0 of an initialised
    process group. A Ray Train worker of rank 1 that built the cache first left a model with
    no config.json or weights (every worker then failed to load it)."""
    import torch.multiprocessing as tmp
    from transformers import AutoModelForCausalLM

    tmp.spawn(_build_on_rank_1, args=(str(tmp_path / "cache"), str(tmp_path / "init")), nprocs=2)
    path = assets.tiny_llama_dir(str(tmp_path / "cache"))
    assert {"config.json", "model.safetensors"} <= {p.name for p in path.iterdir()}
    assert AutoModelForCausalLM.from_pretrained(path).config.model_type == "llama"
