"""The OpenAI API's request side, shared by the gateway (bco_ray/serve/app.py) and the model
replicas (bco_ray/serve/model.py): OpenAI's error shape, sampling parameters, API keys."""

import hashlib
import os

from fastapi import Request

from bco_ray.serve.generate import Sampling


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def log_unavailable(what: str) -> APIError:
    """A row that could not be put on storage: 503, so the client retries (nothing was acknowledged)."""
    return APIError(503, f"{what}; retry", "server_error", code="log_unavailable")


def error_body(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


LABELS = {"up": True, "thumbs_up": True, "positive": True, "1": True, "true": True,
          "down": False, "thumbs_down": False, "negative": False, "0": False, "false": False, "-1": False}


def parse_sampling(body: dict, limit: int) -> tuple[Sampling, int]:
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


def choice_sampling(s: Sampling, i: int) -> Sampling:
    return Sampling(**{**s.__dict__, "seed": None if s.seed is None else (s.seed + i) % SEED_SPACE})


def check_text(value, where: str = "body") -> None:
    """Strings must be valid UTF-8 text: JSON may carry a lone surrogate ("\\ud800"), which no
    tokenizer and no parquet writer accepts; refused here, at the door, with a 400."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{where} holds text that is not valid UTF-8 (a lone surrogate)", param=where) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, where)
            check_text(v, k if where == "body" else where)
    elif isinstance(value, list):
        for v in value:
            check_text(v, where)


def usable_keys(configured) -> list[str]:
    """The Bearer keys a server accepts: serve.api_keys and $BCO_RAY_API_KEYS (comma-separated).
    An empty key would let an empty Authorization header in: it is an error, not skipped."""
    keys = [str(k) for k in configured] + os.environ.get("BCO_RAY_API_KEYS", "").split(",")
    keys = [k.strip() for k in keys]
    if any(not k for k in keys[:len(configured)]):
        raise ValueError("serve.api_keys holds an empty key")
    return [k for k in keys if k]


def bearer(request: Request) -> bytes:
    """The request's Bearer key (empty when there is none)."""
    auth = request.headers.get("authorization", "")
    return auth[7:].strip().encode() if auth.startswith("Bearer ") else b""


def key_digests_of(keys: list[str]) -> list[bytes]:
    return [hashlib.sha256(k.encode()).digest() for k in keys]
