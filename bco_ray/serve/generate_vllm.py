"""Text generation with vLLM's AsyncLLM: continuous batching for the serving replicas on GPUs.

The same contract as `bco_ray.serve.generate.HFEngine` (token ids in, `(index, delta, finish
reason, tokens so far)` out), so the API layer does not know which engine it drives:
- tokenization and the chat template are ours (the transformers tokenizer of the exported
  model), and vLLM gets exact token ids, so both engines see the same prompt;
- the n choices of a request are n vLLM requests, choice i seeded with seed + i, so a
  seeded request gives the same choices whatever else is in flight;
- no `@serve.batch`: vLLM's scheduler batches across requests on its own.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator

from bco_ray.data.tokenization import chat_prompt_ids
from bco_ray.serve.generate import Sampling

Event = tuple[int, str, "str | None", int]  # (choice index, new text, finish reason once finished, tokens so far)


class VLLMEngine:
    """An AsyncLLM over a local HF model directory; its engine core runs in a child process."""

    def __init__(self, model_dir: str, dtype: str = "auto", max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.85, enforce_eager: bool = False, cpu_kvcache_gib: int = 1,
                 trust_remote_code: bool = False, seed: int = 0, tensor_parallel_size: int = 1,
                 metrics: bool = True):
        import torch

        from bco_ray.placement import vllm_parallel_args
        from bco_ray.score.refscore import vllm_cpu_environment, vllm_stat_loggers

        # With tensor parallelism the replica sees no GPU: vLLM's workers in its placement group do.
        if not torch.cuda.is_available() and tensor_parallel_size == 1:
            for k, v in vllm_cpu_environment(cpu_kvcache_gib).items():
                os.environ.setdefault(k, v)
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(model=model_dir, tokenizer=model_dir, dtype=dtype, max_model_len=max_model_len,
                               gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                               trust_remote_code=trust_remote_code, seed=seed, disable_log_stats=True,
                               **vllm_parallel_args(tensor_parallel_size))
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=vllm_stat_loggers(metrics))
        self.tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        self.max_context = int(self.llm.model_config.max_model_len)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return chat_prompt_ids(self.tok, messages)  # content as text, as prepare encodes it

    def encode_text(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=True)["input_ids"]

    @staticmethod
    def _params(s: Sampling, seed: int | None):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # top_p 0 means "only the top token" in the API; vLLM wants it in (0, 1].
        return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=max(s.top_p, 1e-6),
                              stop=list(s.stop) or None, seed=seed, skip_special_tokens=True,
                              output_kind=RequestOutputKind.DELTA)

    async def _one(self, ids: list[int], s: Sampling, seed: int | None, index: int) -> AsyncIterator[Event]:
        from vllm.inputs import TokensPrompt

        count, request_id = 0, uuid.uuid4().hex
        try:
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=list(ids)), self._params(s, seed),
                                               request_id):
                o = out.outputs[0]
                count += len(o.token_ids)
                yield index, o.text, (o.finish_reason if out.finished else None), count
        except (asyncio.CancelledError, GeneratorExit):
            await self.llm.abort(request_id)  # a client that hung up frees its KV cache at once
            raise

    async def stream(self, ids: list[int], s: Sampling, n: int) -> AsyncIterator[Event]:
        """The n choices' deltas, interleaved as vLLM produces them."""
        if n == 1:
            async for e in self._one(ids, s, s.seed, 0):
                yield e
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for e in self._one(ids, s, None if s.seed is None else s.seed + i, i):
                    await queue.put(e)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(i)) for i in range(n)]
        try:
            done = 0
            while done < n:
                e = await queue.get()
                if e is None:
                    done += 1
                else:
                    yield e
            for t in tasks:
                t.result()  # a failed choice fails the request
        finally:
            for t in tasks:
                t.cancel()

    async def complete(self, ids: list[int], s: Sampling, n: int) -> list[tuple[str, str, int]]:
        """(text, finish reason, completion tokens) per choice."""
        text, finish, count = [""] * n, ["length"] * n, [0] * n
        async for i, delta, reason, c in self.stream(ids, s, n):
            text[i] += delta
            count[i] = c
            if reason:
                finish[i] = "stop" if reason == "stop" else "length"
        return list(zip(text, finish, count, strict=True))

    def shutdown(self) -> None:
        self.llm.shutdown()
