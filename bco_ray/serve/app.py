"""The OpenAI-compatible HTTP API on Ray Serve: `Gateway`, the application's ingress (FastAPI),
in front of one `ModelServer` deployment per model version (bco_ray/serve/model.py) and the
`FeedbackLog` deployment (bco_ray/serve/log_replica.py) that logs every answer and thumb.

The gateway checks the key, the body's size and JSON, picks the version that answers (the
routes: the promoted model alone, or a canary's share of the users on the candidate), and
hands the request to that version's replicas through a deployment handle. The routes are the
deployment's `user_config`, so a canary's start, promotion or rollback reconfigures the
running gateway in place (bco_ray/serve/canary.py): no request is dropped and no model
reloaded. The request/response shapes are OpenAI's; errors use OpenAI's JSON error body.

No `from __future__ import annotations` here: Serve ships the routes to replicas with
cloudpickle, by value, keeping only the globals a function body uses. A string annotation
'Request' then no longer resolves in the replica, and FastAPI >= 0.137 (which no longer
re-analyses routes on include_router) reads `request` as a required query parameter:
every route answered 422. Real annotations travel with the function.
"""

import hashlib
import hmac
import json
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from bco_ray.config import Config, from_dict
from bco_ray.serve.api import (
    LABELS,
    APIError,
    bearer,
    check_text,
    error_body,
    key_digests_of,
    log_unavailable,
    usable_keys,
)

app = FastAPI(title="bco-ray", docs_url=None, redoc_url=None)


@app.exception_handler(APIError)
async def _api_error(_: Request, e: APIError):
    return JSONResponse(error_body(e), status_code=e.status)


def bucket(salt: str, key: str) -> float:
    """A caller's place in [0, 1): the same caller lands in the same place for one canary
    (sticky), and a new canary (a new salt) draws a new slice of the users."""
    return int.from_bytes(hashlib.sha256(f"{salt}\0{key}".encode()).digest()[:8], "big") / 2**64


def pick(versions: list[dict], place: float) -> dict:
    """The version whose share covers `place`: the shares are laid end to end, in order."""
    edge = 0.0
    for v in versions:
        edge += v["share"]
        if place < edge:
            return v
    return versions[-1]


@serve.deployment
@serve.ingress(app)
class Gateway:
    def __init__(self, cfg: dict, feedback, key_digests: tuple[str, ...] = (), *models):
        # `models` binds the versions' deployments into this application; they are reached
        # by name from the routes (reconfigure), so a new routing needs no new gateway.
        self.cfg: Config = from_dict(cfg)
        sc = self.cfg.serve
        # Digests, not keys: the init args live in Serve's controller state. The replica's own
        # $BCO_RAY_API_KEYS (a pod's secret) counts too.
        self.keys = sorted({bytes.fromhex(d) for d in key_digests} | set(key_digests_of(usable_keys(sc.api_keys))))
        self.name, self.feedback_log = sc.model_name, feedback
        self.created = int(time.time())
        self.versions: list[dict] = []
        self.handles: dict = {}
        self.salt = ""
        from ray.serve.metrics import Counter

        self.requests = Counter("bco_ray_requests", "Generation requests by model version, role and status.",
                                tag_keys=("version", "role", "status"))

    def reconfigure(self, routes: dict) -> None:
        """The routes: {"versions": [{role, deployment, version, share}], "salt"}; shares sum to 1."""
        self.handles = {v["deployment"]: self.handles.get(v["deployment"]) or
                        serve.get_deployment_handle(v["deployment"], _check_exists=False)
                        for v in routes["versions"]}
        self.versions, self.salt = routes["versions"], routes["salt"]

    # -- plumbing
    async def _body(self, request: Request) -> dict:
        if self.keys:
            given = bearer(request)
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
        check_text(body)
        return body

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(400, "'model' is required", param="model")
        if model != self.name:
            raise APIError(404, f"the model '{model}' does not exist (this server serves '{self.name}')",
                           param="model", code="model_not_found")

    def _version_for(self, request: Request) -> dict:
        """Sticky: the caller's user id header, else its API key; a caller with neither gets a
        fresh draw per request."""
        if len(self.versions) == 1:
            return self.versions[0]
        key = request.headers.get(self.cfg.canary.sticky_header.lower())
        if not key:
            given = bearer(request)
            key = "key:" + hashlib.sha256(given).hexdigest() if given else secrets.token_hex(8)
        return pick(self.versions, bucket(self.salt, key))

    async def _generate(self, request: Request, route: str):
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError

        body = await self._body(request)
        self._check_model(body)
        if not self.versions:
            raise APIError(503, "no model is routed yet; retry", "server_error", code="not_ready")
        v = self._version_for(request)
        tags = {"version": v["version"].rsplit("@", 1)[-1], "role": v["role"]}
        handle, gen = self.handles[v["deployment"]], None
        try:
            if body.get("stream"):
                gen = handle.options(stream=True).stream.remote(route, body)
                head = await gen.__anext__()
            else:
                head = await handle.respond.remote(route, body)
        except BackPressureError:
            self.requests.inc(tags={**tags, "status": "503"})
            raise APIError(503, "the model's replicas are at capacity; retry", "server_error",
                           code="overloaded") from None
        except RayActorError as e:
            self.requests.inc(tags={**tags, "status": "500"})
            raise APIError(500, f"the model replica failed on this request ({type(e).__name__}); retry",
                           "server_error", code="replica_failed") from None
        self.requests.inc(tags={**tags, "status": str(head["status"])})
        if not head.get("stream"):
            return JSONResponse(head["body"], status_code=head["status"])
        assert gen is not None

        async def events():
            try:
                async for event in gen:
                    yield event
            finally:
                gen.cancel()  # the client went away: the replica stops decoding for nobody
        return StreamingResponse(events(), media_type="text/event-stream")

    # -- routes
    @app.get("/health")
    async def health(self):
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self):
        # The weights' fingerprints only: the versions' storage URIs stay in the feedback log.
        fps = [{"role": v["role"], "version": v["version"].rsplit("@", 1)[-1], "share": v["share"]}
               for v in self.versions]
        promoted = next((f["version"] for f in fps if f["role"] == "promoted"), None)
        return {"status": "ready" if self.versions else "starting", "model": self.name, "version": promoted,
                "versions": fps}

    @app.get("/v1/models")
    async def models(self, request: Request):
        await self._body(request)
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "bco-ray"}]}

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._generate(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._generate(request, "chat")

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
        key = bearer(request)
        caller = hashlib.sha256(key).hexdigest()[:16] if key and self.keys else "anonymous"
        try:
            res = await self.feedback_log.feedback.remote(cid, label, comment, index, caller)
        except Exception as e:  # noqa: BLE001 - the log's replica died or restarts: not recorded
            raise log_unavailable(f"the feedback log is unavailable ({type(e).__name__})") from None
        if res.get("error") == "unknown":
            raise APIError(404, f"'{cid[:80]}' is not a completion id this server issued", param="id",
                           code="completion_not_found")
        if res.get("error") == "storage":
            raise log_unavailable("the feedback log's storage is not answering")
        if res.get("error"):
            raise APIError(400, res["message"], param="index")
        # joined false: the server no longer remembers the answer; `prepare` joins it by id.
        return {"object": "feedback", "id": cid, "label": res["label"], "recorded": True, "joined": res["joined"]}
