"""The OpenAI-compatible HTTP API on Ray Serve: `OpenAIServer` (FastAPI ingress + the model;
replicas scale together), bound to the `FeedbackLog` deployment (bco_ray/serve/log_replica.py)
that logs every answer and every thumbs. The request/response shapes are OpenAI's; errors use
OpenAI's JSON error body.

No `from __future__ import annotations` here: Serve ships the routes to replicas with
cloudpickle, by value, keeping only the globals a function body uses. A string annotation
'Request' then no longer resolves in the replica, and FastAPI >= 0.137 (which no longer
re-analyses routes on include_router) reads `request` as a required query parameter:
every route answered 422. Real annotations travel with the function.
"""

import asyncio
import hashlib
import hmac
import json
import os
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from bco_ray.config import Config, from_dict
from bco_ray.data.normalise import new_completion_id
from bco_ray.serve.generate import Sampling


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _log_unavailable(what: str) -> APIError:
    """A row that could not be put on storage: 503, so the client retries (nothing was acknowledged)."""
    return APIError(503, f"{what}; retry", "server_error", code="log_unavailable")


def error_body(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


app = FastAPI(title="bco-ray", docs_url=None, redoc_url=None)


@app.exception_handler(APIError)
async def _api_error(_: Request, e: APIError):
    return JSONResponse(error_body(e), status_code=e.status)


# ---------------------------------------------------------------------------- the API

LABELS = {"up": True, "thumbs_up": True, "positive": True, "1": True, "true": True,
          "down": False, "thumbs_down": False, "negative": False, "0": False, "false": False, "-1": False}


def _sampling(body: dict, limit: int) -> tuple[Sampling, int]:
    def num(key, default, lo, hi, kind=float):
        v = body.get(key, default)
        if v is None:
            v = default
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi or (kind is int and v != int(v)):
            raise APIError(400, f"'{key}' must be a number in [{lo}, {hi}]", param=key)
        return kind(v)

    max_tokens = num("max_tokens", 16, 1, limit, int) if "max_completion_tokens" not in body \
        else num("max_completion_tokens", 16, 1, limit, int)
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**64):
        raise APIError(400, "'seed' must be a 64-bit integer", param="seed")
    temperature, top_p = num("temperature", 1.0, 0.0, 2.0), num("top_p", 1.0, 0.0, 1.0)
    if temperature < GREEDY_BELOW or top_p == 0.0:
        # The API's limits of sampling: greedy. A temperature of 1e-45 divides the logits into
        # inf, and top_p 0 keeps no token at all; either would fail its whole decoding batch.
        temperature, top_p = 0.0, 1.0
    s = Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=tuple(stop),
                 seed=None if seed is None else seed % SEED_SPACE)
    return s, num("n", 1, 1, 8, int)


GREEDY_BELOW = 1e-4  # temperatures under this decode greedily
SEED_SPACE = 2**63   # seeds are taken modulo this: torch's and vLLM's generators take a signed 64-bit int


def _choice_sampling(s: Sampling, i: int) -> Sampling:
    return Sampling(**{**s.__dict__, "seed": None if s.seed is None else (s.seed + i) % SEED_SPACE})


def _check_text(value, where: str = "body") -> None:
    """Strings must be valid UTF-8 text: JSON may carry a lone surrogate ("\\ud800"), which no
    tokenizer and no parquet writer accepts; refused here, at the door, with a 400."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{where} holds text that is not valid UTF-8 (a lone surrogate)", param=where) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k, where)
            _check_text(v, k if where == "body" else where)
    elif isinstance(value, list):
        for v in value:
            _check_text(v, where)


def usable_keys(configured) -> list[str]:
    """The Bearer keys a server accepts: serve.api_keys and $BCO_RAY_API_KEYS (comma-separated).
    An empty key would let an empty Authorization header in: it is an error, not skipped."""
    keys = [str(k) for k in configured] + os.environ.get("BCO_RAY_API_KEYS", "").split(",")
    keys = [k.strip() for k in keys]
    if any(not k for k in keys[:len(configured)]):
        raise ValueError("serve.api_keys holds an empty key")
    return [k for k in keys if k]


def _bearer(request: Request) -> bytes:
    """The request's Bearer key (empty when there is none)."""
    auth = request.headers.get("authorization", "")
    return auth[7:].strip().encode() if auth.startswith("Bearer ") else b""


def key_digests_of(keys: list[str]) -> list[bytes]:
    return [hashlib.sha256(k.encode()).digest() for k in keys]


@serve.deployment
@serve.ingress(app)
class OpenAIServer:
    def __init__(self, cfg: dict, model_uri: str, version: str, feedback, engine: str = "hf",
                 key_digests: tuple[str, ...] = ()):
        from bco_ray.assets import local_model_dir

        self.cfg: Config = from_dict(cfg)
        sc = self.cfg.serve
        # Digests, not keys: the init args live in Serve's controller state. The replica's own
        # $BCO_RAY_API_KEYS (a pod's secret) counts too.
        self.keys = sorted({bytes.fromhex(d) for d in key_digests} | set(key_digests_of(usable_keys(sc.api_keys))))
        self.name, self.version, self.feedback_log = sc.model_name, version, feedback
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
                                   num_threads=max(1, int(sc.cpus_per_replica)))
            if sc.max_model_len:
                self.engine.max_context = min(self.engine.max_context, sc.max_model_len)
        self._generate_batch.set_max_batch_size(sc.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(sc.batch_wait_timeout_s)
        self.created = int(time.time())

    def __del__(self):
        if getattr(self, "vllm", False):
            self.engine.shutdown()  # the engine core's child processes go with the replica

    # -- plumbing
    async def _body(self, request: Request) -> dict:
        if self.keys:
            given = _bearer(request)
            digest = hashlib.sha256(given).digest()
            ok = False
            for k in self.keys:  # every key compared, in constant time: no timing tells a key's prefix
                ok |= hmac.compare_digest(digest, k)
            if not given or not ok:
                raise APIError(401, "missing or invalid API key (Authorization: Bearer KEY)", "authentication_error",
                               code="invalid_api_key")
        limit = self.cfg.serve.max_request_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise APIError(413, f"request body over {limit} bytes", code="request_too_large")
        # Counted while it arrives: a chunked body has no Content-Length to refuse it by.
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body over {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            body = json.loads(raw or b"{}")
        except ValueError as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        _check_text(body)
        return body

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(400, "'model' is required", param="model")
        if model != self.name:
            raise APIError(404, f"the model '{model}' does not exist (this server serves '{self.name}')",
                           param="model", code="model_not_found")

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
        outs = await asyncio.gather(*[self._generate_batch((ids, _choice_sampling(s, i))) for i in range(n)])
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
                for step in self.engine.generate_iter([ids] * n, [_choice_sampling(s, i) for i in range(n)]):
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
        """Generate, remember the answer for feedback, and reply: JSON, or SSE chunks when streaming.

        choice(i, text, reason, final) is one choice's JSON: the whole choice when final, a
        chunk's choice otherwise (i None: the opening chunk)."""
        s, n = _sampling(body, self.cfg.serve.max_tokens_limit)
        self._fit(ids, s)
        cid, created = new_completion_id(prefix), int(time.time())
        head = {"id": cid, "object": obj, "created": created, "model": self.name}
        if not body.get("stream"):
            outs = await self._complete(ids, s, n)
            await self._remember(cid, logged_prompt, [o[0] for o in outs])
            return {**head, "choices": [choice(i, t, r, True) for i, (t, r, _) in enumerate(outs)],
                    "usage": self._usage(len(ids), [c for _, _, c in outs])}
        head["object"] = obj + (".chunk" if obj == "chat.completion" else "")

        async def events():
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
                await self._remember(cid, logged_prompt, texts)
            except APIError as e:  # not in the served log: no [DONE], the client retries
                yield f"data: {json.dumps(error_body(e))}\n\n"
                return
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    async def _remember(self, cid: str, prompt, texts: list[str]) -> None:
        """The answer on storage in the served log before it is sent: else 503."""
        try:
            durable = await self.feedback_log.record.remote(cid, prompt, texts, self.name, self.version)
        except Exception as e:  # noqa: BLE001 - the log's replica died or restarts: not sent, say so
            raise _log_unavailable(f"the served log is unavailable ({type(e).__name__})") from None
        if not durable:
            raise _log_unavailable("the served log's storage is not answering")

    @staticmethod
    def _usage(prompt_tokens: int, counts: list[int]) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": sum(counts),
                "total_tokens": prompt_tokens + sum(counts)}

    # -- routes
    @app.get("/health")
    async def health(self):
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self):
        # The weights' fingerprint only: the version's storage URI stays in the feedback log.
        return {"status": "ready", "model": self.name, "version": self.version.rsplit("@", 1)[-1]}

    @app.get("/v1/models")
    async def models(self, request: Request):
        await self._body(request)
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "bco-ray"}]}

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        body = await self._body(request)
        self._check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string", param="prompt")

        def choice(i, text, reason, final):
            return None if i is None else {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
        # A prompt can be a megabyte: tokenized off the event loop, which serves the other requests.
        ids = await asyncio.to_thread(self.engine.encode_text, prompt)
        return await self._respond(body, ids, prompt, "cmpl", "text_completion", choice)

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        body = await self._body(request)
        self._check_model(body)
        messages = body.get("messages")
        if (not isinstance(messages, list) or not messages or
                not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                        and isinstance(m.get("content"), str) for m in messages)):
            raise APIError(400, "'messages' must be a non-empty list of {role: system|user|assistant, "
                                "content: string}", param="messages")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]

        def choice(i, text, reason, final):
            if final:
                return {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            if i is None:
                return {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            return {"index": i, "delta": {"content": text} if text else {}, "finish_reason": reason}
        try:
            ids = await asyncio.to_thread(self.engine.encode_chat, messages)
        except ValueError as e:  # content spelling a control token under a template that rewrites content
            raise APIError(400, str(e), param="messages") from None
        return await self._respond(body, ids, messages, "chatcmpl", "chat.completion", choice)

    @app.post("/v1/feedback")
    async def feedback(self, request: Request):
        body = await self._body(request)
        cid = body.get("id") or body.get("completion_id")
        if not isinstance(cid, str) or not cid:
            raise APIError(400, "'id' (the completion id) is required", param="id")
        label = body.get("label", body.get("rating"))
        label = LABELS.get(str(label).strip().lower()) if not isinstance(label, bool) else label
        if label is None:
            raise APIError(400, "'label' must be thumbs_up / thumbs_down (or up/down, true/false)", param="label")
        comment = body.get("comment")
        if comment is not None and not isinstance(comment, str):
            raise APIError(400, "'comment' must be a string", param="comment")
        index = body.get("index", 0)
        if isinstance(index, bool) or not isinstance(index, int):
            raise APIError(400, "'index' must be an integer", param="index")
        # Who voted, as a hash of the key: one vote per caller and answer counts (`prepare`).
        key = _bearer(request)
        caller = hashlib.sha256(key).hexdigest()[:16] if key and self.keys else "anonymous"
        try:
            res = await self.feedback_log.feedback.remote(cid, label, comment, index, caller)
        except Exception as e:  # noqa: BLE001 - the log's replica died or restarts: not recorded
            raise _log_unavailable(f"the feedback log is unavailable ({type(e).__name__})") from None
        if res.get("error") == "unknown":
            raise APIError(404, f"'{cid[:80]}' is not a completion id this server issued", param="id",
                           code="completion_not_found")
        if res.get("error") == "storage":
            raise _log_unavailable("the feedback log's storage is not answering")
        if res.get("error"):
            raise APIError(400, res["message"], param="index")
        # joined false: the server no longer remembers the answer; `prepare` joins it by id.
        return {"object": "feedback", "id": cid, "label": res["label"], "recorded": True, "joined": res["joined"]}
