"""`ModelServer`: one model version's replicas (the engine, batching, the served log), called
by the gateway (bco_ray/serve/app.py) through a deployment handle. A canary runs two of them,
one per version, in the same application; the gateway picks which answers a request.

The gateway has checked the key, the size and the JSON; here the body becomes tokens, the
tokens an answer, and the answer a row in the served log before it is sent: `respond` for a
whole answer, `stream` (a streaming handle method) for SSE events after a head.
"""

import asyncio
import threading
import time

from ray import serve

from bco_ray.config import Config, from_dict
from bco_ray.data.normalise import new_completion_id
from bco_ray.serve.api import APIError, choice_sampling, error_body, log_unavailable, parse_sampling
from bco_ray.serve.generate import Sampling


def _completion_choice(i, text, reason, final):
    return None if i is None else {"index": i, "text": text, "logprobs": None, "finish_reason": reason}


def _chat_choice(i, text, reason, final):
    if final:
        return {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
    if i is None:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    return {"index": i, "delta": {"content": text} if text else {}, "finish_reason": reason}


@serve.deployment
class ModelServer:
    def __init__(self, cfg: dict, model_uri: str, version: str, feedback, engine: str = "hf"):
        from bco_ray.assets import local_model_dir

        self.cfg: Config = from_dict(cfg)
        sc = self.cfg.serve
        self.name, self.version, self.feedback_log = sc.model_name, version, feedback
        # The weights' fingerprint: in every answer (system_fingerprint) and every log row.
        self.fingerprint = version.rsplit("@", 1)[-1]
        # On this replica's node: an s3:// export is downloaded here, once per node and version.
        model_dir = local_model_dir(model_uri, self.cfg)
        import torch

        dtype = self.cfg.model.dtype
        on_gpus = torch.cuda.is_available() or sc.tensor_parallel_size > 1  # a TP replica's GPUs are its group's
        if dtype == "auto":
            dtype = "bfloat16" if on_gpus else "float32"
        self.vllm = engine == "vllm"
        if self.vllm:
            from bco_ray.serve.generate_vllm import VLLMEngine

            self.engine = VLLMEngine(model_dir, dtype, sc.max_model_len, sc.vllm_gpu_memory_utilization,
                                     sc.vllm_enforce_eager, sc.vllm_cpu_kvcache_gib,
                                     self.cfg.model.trust_remote_code, self.cfg.run.seed, sc.tensor_parallel_size,
                                     sc.vllm_metrics)
        else:
            from bco_ray.serve.generate import HFEngine

            self.engine = HFEngine(model_dir, dtype, trust_remote_code=self.cfg.model.trust_remote_code,
                                   num_threads=sc.cpus_per_replica)
            if sc.max_model_len:
                self.engine.max_context = min(self.engine.max_context, sc.max_model_len)
        self._generate_batch.set_max_batch_size(sc.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(sc.batch_wait_timeout_s)
        self.created = int(time.time())

    def __del__(self):
        if getattr(self, "vllm", False):
            self.engine.shutdown()  # the engine core's child processes go with the replica

    # -- called by the gateway
    async def respond(self, route: str, body: dict) -> dict:
        """Answer one whole request (route "completions" or "chat"): {"status", "body"}. A unary
        call: cheaper through Serve than a streaming one (measured in docs/serving.md)."""
        try:
            return {"status": 200, "body": await self._answer(route, body)}
        except APIError as e:
            return {"status": e.status, "body": error_body(e)}

    async def stream(self, route: str, body: dict):
        """Answer one streaming request: the head ({"status", "body"} for an error, else
        {"status": 200, "stream": True}), then the SSE events."""
        try:
            out = await self._answer(route, body)
        except APIError as e:
            yield {"status": e.status, "body": error_body(e)}
            return
        yield {"status": 200, "stream": True}
        async for event in out:
            yield event

    def _answer(self, route: str, body: dict):
        return self.completions(body) if route == "completions" else self.chat(body)

    def info(self) -> dict:
        return {"version": self.version, "fingerprint": self.fingerprint, "created": self.created,
                "max_context": self.engine.max_context}

    # -- the routes' work
    async def completions(self, body: dict):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string", param="prompt")
        # A prompt can be a megabyte: tokenized off the event loop, which serves the other requests.
        ids = await asyncio.to_thread(self.engine.encode_text, prompt)
        return await self._respond(body, ids, prompt, "cmpl", "text_completion", _completion_choice)

    async def chat(self, body: dict):
        messages = body.get("messages")
        if (not isinstance(messages, list) or not messages or
                not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                        and isinstance(m.get("content"), str) for m in messages)):
            raise APIError(400, "'messages' must be a non-empty list of {role: system|user|assistant, "
                                "content: string}", param="messages")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            ids = await asyncio.to_thread(self.engine.encode_chat, messages)
        except ValueError as e:  # content spelling a control token under a template that rewrites content
            raise APIError(400, str(e), param="messages") from None
        return await self._respond(body, ids, messages, "chatcmpl", "chat.completion", _chat_choice)

    # -- plumbing
    def _fit(self, ids: list[int], s: Sampling) -> None:
        if len(ids) + s.max_tokens > self.engine.max_context:
            raise APIError(413, f"prompt ({len(ids)} tokens) + max_tokens ({s.max_tokens}) exceed the model's "
                           f"context of {self.engine.max_context} tokens", param="messages",
                           code="context_length_exceeded")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _generate_batch(self, items: list[tuple[list[int], Sampling]]) -> list[tuple[str, str, int]]:
        prompts, params = [i[0] for i in items], [i[1] for i in items]
        try:
            return await asyncio.to_thread(self.engine.generate, prompts, params)
        except Exception:  # noqa: BLE001 - one request's failure must not fail the others batched with it
            if len(items) == 1:
                raise
        out: list = []
        for ids, s in items:  # each alone: the failing one gets its exception, the others their answers
            try:
                out += await asyncio.to_thread(self.engine.generate, [ids], [s])
            except Exception as e:  # noqa: BLE001 - handed to its own caller by _complete
                out.append(e)
        return out

    async def _complete(self, ids: list[int], s: Sampling, n: int) -> list[tuple[str, str, int]]:
        if self.vllm:
            return await self.engine.complete(ids, s, n)
        # n choices = n batch items; a fixed seed gives choice i the seed + i.
        outs = await asyncio.gather(*[self._generate_batch((ids, choice_sampling(s, i))) for i in range(n)],
                                    return_exceptions=True)
        for o in outs:
            if isinstance(o, BaseException):
                raise APIError(500, f"the model failed on this request: {type(o).__name__}: {o}", "server_error",
                               code="engine_error")
        return outs

    async def _events(self, ids: list[int], s: Sampling, n: int):
        """(choice, new text, finish reason, tokens so far), as the engine produces them."""
        if self.vllm:
            async for e in self.engine.stream(ids, s, n):
                yield e
            return
        # hf: one batch for the n choices, decoded in a thread; its steps come back through a queue.
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        gone = threading.Event()  # the client went away: stop decoding for nobody

        def work():
            try:
                for step in self.engine.generate_iter([ids] * n, [choice_sampling(s, i) for i in range(n)]):
                    loop.call_soon_threadsafe(queue.put_nowait, step)
                    if gone.is_set():
                        break
            except Exception as e:  # noqa: BLE001 - raised again in the stream, as an error event
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        threading.Thread(target=work, daemon=True).start()
        try:
            while (step := await queue.get()) is not None:
                if isinstance(step, BaseException):
                    raise step
                for i, (delta, reason, count) in enumerate(step):
                    if delta or reason:
                        yield i, delta, reason, count
        finally:
            gone.set()

    async def _respond(self, body: dict, ids: list[int], logged_prompt, prefix: str, obj: str, choice):
        """Generate, remember the answer for feedback, and reply: the whole answer's JSON, or an
        async generator of SSE events when streaming.

        choice(i, text, reason, final) is one choice's JSON: the whole choice when final, a
        chunk's choice otherwise (i None: the opening chunk)."""
        s, n = parse_sampling(body, self.cfg.serve.max_tokens_limit)
        self._fit(ids, s)
        cid, created = new_completion_id(prefix), int(time.time())
        head = {"id": cid, "object": obj, "created": created, "model": self.name,
                "system_fingerprint": self.fingerprint}
        if not body.get("stream"):
            outs = await self._complete(ids, s, n)
            await self._remember(cid, logged_prompt, [o[0] for o in outs])
            return {**head, "choices": [choice(i, t, r, True) for i, (t, r, _) in enumerate(outs)],
                    "usage": self._usage(len(ids), [c for _, _, c in outs])}
        head["object"] = obj + (".chunk" if obj == "chat.completion" else "")
        return self._stream(head, ids, s, n, logged_prompt, choice)

    async def _stream(self, head: dict, ids: list[int], s: Sampling, n: int, logged_prompt, choice):
        import json

        texts = [""] * n
        opening = choice(None, "", None, False)
        yield f"data: {json.dumps({**head, 'choices': [opening] if opening else []})}\n\n"
        try:
            async for i, delta, reason, _ in self._events(ids, s, n):
                if not (delta or reason):
                    continue  # half a multi-byte character: nothing to send yet
                texts[i] += delta
                yield f"data: {json.dumps({**head, 'choices': [choice(i, delta, reason, False)]})}\n\n"
        except Exception as e:  # noqa: BLE001 - the headers are sent: the error goes in the stream
            # No [DONE] and nothing remembered: a cut answer is neither complete nor feedback-able.
            err = APIError(500, f"the model failed mid-stream: {type(e).__name__}: {e}", "server_error",
                           code="engine_error")
            yield f"data: {json.dumps(error_body(err))}\n\n"
            return
        try:
            await self._remember(head["id"], logged_prompt, texts)
        except APIError as e:  # not in the served log: no [DONE], the client retries
            yield f"data: {json.dumps(error_body(e))}\n\n"
            return
        yield "data: [DONE]\n\n"

    async def _remember(self, cid: str, prompt, texts: list[str]) -> None:
        """The answer on storage in the served log before it is sent: else 503."""
        try:
            durable = await self.feedback_log.record.remote(cid, prompt, texts, self.name, self.version)
        except Exception as e:  # noqa: BLE001 - the log's replica died or restarts: not sent, say so
            raise log_unavailable(f"the served log is unavailable ({type(e).__name__})") from None
        if not durable:
            raise log_unavailable("the served log's storage is not answering")

    @staticmethod
    def _usage(prompt_tokens: int, counts: list[int]) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": sum(counts),
                "total_tokens": prompt_tokens + sum(counts)}
