"""UDM's embedder (`bco_ray.data.udm.PromptEmbedder`) on a GPU and on one CPU thread, without Ray.

    PYTHONPATH=. python bench/gpu_embed.py [--out results.json]

The encoder has all-MiniLM-L6-v2's shape (6 layers, hidden 384, 22.7M parameters) with random
weights (throughput does not depend on them) and a word-level tokenizer built here, so
nothing is downloaded. Prompts are 8-160 words (about that many tokens), as feedback prompts
are. Prints prompts/s per actor: on the GPU (fp16) for several batch sizes, and on one CPU
thread for the default batch size, in fp32 and in udm.embed_dtype auto (bf16 where the CPU
computes it natively).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch


def make_encoder(path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path, safe_serialization=True)
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(30520)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)


def prompts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{x}" for x in rng.integers(0, 30520, int(rng.integers(8, 161)))) for _ in range(n)]


def rate(embedder, texts: list[str]) -> float:
    embedder.embed(texts[:embedder.batch_size])  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = embedder.embed(texts)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    assert out.shape == (len(texts), 384) and np.isfinite(out).all()
    return len(texts) / (time.perf_counter() - t0)


def main() -> None:
    from bco_ray.data.udm import PromptEmbedder

    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu-prompts", type=int, default=16384)
    ap.add_argument("--cpu-prompts", type=int, default=256)
    ap.add_argument("--out")
    args = ap.parse_args()
    report: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    with tempfile.TemporaryDirectory() as d:
        make_encoder(d)
        texts = prompts(args.gpu_prompts)
        if torch.cuda.is_available():
            for bs in (64, 256, 1024):
                e = PromptEmbedder(d, max_length=256, batch_size=bs)
                report[f"gpu_fp16_batch{bs}_prompts_per_s"] = round(rate(e, texts))
                print(f"GPU fp16, batch {bs}: {report[f'gpu_fp16_batch{bs}_prompts_per_s']} prompts/s", flush=True)
        torch.set_num_threads(1)
        cuda = torch.cuda.is_available
        torch.cuda.is_available = lambda: False  # the CPU actor's view
        try:
            for dtype in ("float32", "auto"):
                e = PromptEmbedder(d, max_length=256, batch_size=64, dtype=dtype)
                key = f"cpu_1thread_batch64_{str(e.dtype).removeprefix('torch.')}_prompts_per_s"
                report[key] = round(rate(e, texts[:args.cpu_prompts]), 1)
                print(f"CPU, 1 thread, batch 64, {e.dtype}: {report[key]} prompts/s", flush=True)
        finally:
            torch.cuda.is_available = cuda
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
