"""The router's HTTP app: an OpenAI-compatible front over registered workers.

    POST /v1/completions, /v1/chat/completions   routed (see routing.py), then proxied: the body
                                                 as sent, the worker's status, headers and body
                                                 as returned (streams relayed chunk by chunk)
    GET  /v1/models, POST /tokenize, /detokenize  forwarded to the least-loaded healthy worker
    GET  /health                                  200 while a worker is healthy, else 503
    GET  /metrics                                 Prometheus text (metrics.py)
    GET|POST|DELETE /workers                      list / register {"url", "kv_events_endpoint"?,
                                                  "kv_replay_endpoint"?, "role"?} / unregister
                                                  {"url"}

Disaggregated mode (`--prefill`/`--decode`, `disagg.py`): a generation request goes to a prefill
worker, then to a decode worker with the KV parameters the prefill returned. `--api-key`:
every route but /health needs `Authorization: Bearer KEY` (forwarded to the workers).

kv mode needs the prompt's token ids: the router asks a worker's POST /tokenize (the prompt, or
the chat messages rendered with the worker's own chat template), so it tokenizes exactly as the
engine will without loading a tokenizer itself. If that fails, the request is routed by load.

A worker that refuses the connection is marked down and the request goes to the next one (the
request was not sent, so retrying is safe); a failure after the response started ends a stream
with an error event and `data: [DONE]`, or answers 502. Each response names the worker in
`X-Sluice-Worker`. Torch-free.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from sluice.entrypoints.router.metrics import (RouterStats, make_registry, render,
                                               scrape_kv_transfer)
from sluice.entrypoints.router.routing import Decision, PromptHashes, Router
from sluice.entrypoints.router.workers import (HealthChecker, Worker, WorkerPool, mark_down,
                                               normalize_url)

logger = logging.getLogger("sluice.router")

WORKER_HEADER = "X-Sluice-Worker"
_FORWARD_REQUEST_HEADERS = ("authorization", "content-type", "accept", "x-request-id",
                            "openai-organization", "openai-project", "user-agent")
_FORWARD_RESPONSE_HEADERS = ("content-type", "x-request-id", "retry-after")
_CHAT_TOKENIZE_KEYS = ("messages", "add_generation_prompt", "add_special_tokens",
                       "chat_template", "chat_template_kwargs")
TOKENIZE_TIMEOUT_S = 10.0


def error_json(status: int, message: str, param: str | None = None) -> JSONResponse:
    """An OpenAI-shaped error from the router itself."""
    from sluice.entrypoints.openai.errors import error_body
    return JSONResponse(error_body(status, message, param), status_code=status)


@dataclass
class RouterState:
    pool: WorkerPool
    router: Router
    client: httpx.AsyncClient
    health: HealthChecker
    stats: RouterStats = field(default_factory=RouterStats)
    disaggregated: bool = False   # prefill/decode roles (disagg.py)
    api_key: str | None = None    # --api-key: required on every route but /health
    public_metrics: bool = False

    def least_loaded(self) -> Worker | None:
        healthy = self.pool.healthy()
        return min(healthy, key=lambda w: w.outstanding) if healthy else None


def _request_headers(request: Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() in _FORWARD_REQUEST_HEADERS}


def _response_headers(upstream: httpx.Response, worker: Worker) -> dict[str, str]:
    headers = {k: v for k, v in upstream.headers.items()
               if k.lower() in _FORWARD_RESPONSE_HEADERS}
    headers[WORKER_HEADER] = worker.url
    return headers


# ---- tokenization for kv routing -------------------------------------------------------------
def _tokenize_body(path: str, payload: dict) -> dict | list[int] | None:
    """What to send to a worker's /tokenize for this request, or the token ids themselves
    (a prompt given as ids), or None (nothing usable: route by load)."""
    if path.endswith("/chat/completions"):
        if not isinstance(payload.get("messages"), list):
            return None
        body = {k: payload[k] for k in _CHAT_TOKENIZE_KEYS if k in payload}
        return {"model": payload.get("model"), **body}
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and prompt:   # a batch: route by its first prompt
        prompt = prompt[0] if not isinstance(prompt[0], int) else prompt
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return prompt
    if isinstance(prompt, str):
        return {"model": payload.get("model"), "prompt": prompt,
                "add_special_tokens": payload.get("add_special_tokens", True)}
    return None


async def prompt_hashes(state: RouterState, path: str, payload: dict,
                        headers: dict[str, str]) -> PromptHashes | None:
    body = _tokenize_body(path, payload)
    if body is None:
        return None
    salt = payload.get("cache_salt") if isinstance(payload.get("cache_salt"), str) else None
    if isinstance(body, list):
        return PromptHashes(body, salt)
    worker = state.least_loaded()
    if worker is None:
        return None
    try:
        response = await state.client.post(worker.url + "/tokenize", json=body,
                                           headers=headers, timeout=TOKENIZE_TIMEOUT_S)
        if response.status_code != 200:
            return None   # the worker will answer the real request with the real error
        return PromptHashes(response.json()["tokens"], salt)
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


# ---- proxying ---------------------------------------------------------------------------------
class _RelayedStream(StreamingResponse):
    """A streamed upstream response whose cleanup runs exactly once, however the client
    leaves (StreamingResponse's background task is skipped on a disconnect)."""

    def __init__(self, upstream: httpx.Response, worker: Worker, cleanup: Any):
        super().__init__(self._relay(upstream, worker), status_code=upstream.status_code,
                         headers=_response_headers(upstream, worker))
        self._cleanup = cleanup

    @staticmethod
    async def _relay(upstream: httpx.Response, worker: Worker):
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError as e:
            worker.errors["stream"] += 1
            logger.warning("stream from %s broke: %s", worker.url, e)
            from sluice.entrypoints.openai.errors import error_body
            error = error_body(502, f"The worker {worker.url} failed mid-stream "
                                    f"({type(e).__name__}).")
            yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._cleanup()


class _Lease:
    """One request in flight on `worker` (its `outstanding` count), released exactly once."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self._held = True
        worker.outstanding += 1

    def release_now(self) -> None:
        if self._held:
            self._held = False
            self.worker.outstanding -= 1

    async def release(self, upstream: httpx.Response) -> None:
        try:
            await upstream.aclose()
        finally:
            self.release_now()


def _record(state: RouterState, decision: Decision, status: int) -> None:
    decision.worker.routed[state.router.mode] += 1
    state.stats.responses[f"{status // 100}xx"] += 1
    if decision.prompt_blocks:
        state.stats.kv_prompt_blocks += decision.prompt_blocks
        state.stats.kv_overlap_blocks += decision.overlap_blocks


async def proxy_generation(state: RouterState, request: Request, path: str,
                           body: bytes | None = None, role: str | None = None) -> Response:
    """Route and proxy one generation request (`body`: instead of the request's own; `role`:
    only workers with that role, disaggregated mode's decode hop)."""
    if body is None:
        body = await request.body()
    headers = _request_headers(request)
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None   # the worker answers the 400
    payload = payload if isinstance(payload, dict) else None
    stream = bool(payload and payload.get("stream"))
    prompt = None
    if payload is not None and state.router.mode == "kv" and role is None:
        prompt = await prompt_hashes(state, path, payload, headers)
    tried: set[Worker] = set()
    while candidates := [w for w in state.pool.healthy(role) if w not in tried]:
        decision = state.router.choose(candidates, prompt)
        worker = decision.worker
        lease = _Lease(worker)
        try:
            upstream = await state.client.send(
                state.client.build_request("POST", worker.url + path, content=body,
                                           headers=headers), stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            lease.release_now()
            worker.errors["connect"] += 1
            mark_down(worker, f"connection failed ({type(e).__name__})")
            tried.add(worker)
            continue
        except httpx.HTTPError as e:
            lease.release_now()
            worker.errors["upstream"] += 1
            return error_json(502, f"The worker {worker.url} failed: {type(e).__name__}.")
        _record(state, decision, upstream.status_code)
        if stream and upstream.status_code == 200:
            return _RelayedStream(upstream, worker, lambda: lease.release(upstream))
        try:
            content = await upstream.aread()
        except httpx.HTTPError as e:
            worker.errors["upstream"] += 1
            return error_json(502, f"The worker {worker.url} failed: {type(e).__name__}.")
        finally:
            await lease.release(upstream)
        return Response(content, status_code=upstream.status_code,
                        headers=_response_headers(upstream, worker))
    state.stats.responses["5xx"] += 1
    what = "worker" if role is None else f"{role} worker"
    return error_json(503, f"No healthy {what} to route the request to "
                           f"({len(state.pool)} registered).")


async def forward(state: RouterState, request: Request, method: str, path: str) -> Response:
    """A non-generation route, sent to the least-loaded healthy worker."""
    worker = state.least_loaded()
    if worker is None:
        return error_json(503, "No healthy worker.")
    try:
        upstream = await state.client.request(method, worker.url + path,
                                              content=await request.body(),
                                              headers=_request_headers(request))
    except httpx.HTTPError as e:
        worker.errors["upstream"] += 1
        return error_json(502, f"The worker {worker.url} failed: {type(e).__name__}.")
    return Response(upstream.content, status_code=upstream.status_code,
                    headers=_response_headers(upstream, worker))


# ---- the app ----------------------------------------------------------------------------------
def build_app(state: RouterState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.health.check_all()   # admit the live workers before serving
        canary = asyncio.create_task(state.health.run())
        try:
            yield
        finally:
            canary.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await canary
            await state.client.aclose()
            state.pool.close()

    app = FastAPI(title="sluice router", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    registry = make_registry(state.pool, state.stats)
    if state.api_key:
        from sluice.entrypoints.openai.app import PUBLIC_PATHS, APIKeyMiddleware
        public = PUBLIC_PATHS | ({"/metrics"} if state.public_metrics else set())
        app.add_middleware(APIKeyMiddleware, api_key=state.api_key, public_paths=public)

    from sluice.entrypoints.router.disagg import proxy_disaggregated
    generate = proxy_disaggregated if state.disaggregated else proxy_generation

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(state, request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(state, request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await forward(state, request, "GET", "/v1/models")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await forward(state, request, "POST", "/tokenize")

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await forward(state, request, "POST", "/detokenize")

    @app.get("/health")
    async def health() -> Response:
        n = len(state.pool.healthy())
        if n:
            return Response(status_code=200)
        return error_json(503, f"No healthy worker ({len(state.pool)} registered).")

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.disaggregated:
            await scrape_kv_transfer(state.pool, state.client, state.api_key)
        return Response(render(registry), media_type="text/plain; version=0.0.4")

    @app.get("/workers")
    async def list_workers() -> dict:
        return {"mode": state.router.mode, "workers": [w.describe() for w in state.pool]}

    @app.post("/workers")
    async def register(request: Request) -> Response:
        data = await _json_object(request)
        if isinstance(data, Response):
            return data
        try:
            url = normalize_url(str(data.get("url", "")))
            events, replay = data.get("kv_events_endpoint"), data.get("kv_replay_endpoint")
            role = data.get("role", "both")
            from sluice.entrypoints.router.disagg import ROLES
            if role not in ROLES:
                raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
            for name, value in (("kv_events_endpoint", events), ("kv_replay_endpoint", replay)):
                if value is not None and (not isinstance(value, str) or "://" not in value):
                    raise ValueError(f"{name} must be a ZeroMQ endpoint such as "
                                     "tcp://HOST:PORT")
        except ValueError as e:
            return error_json(400, str(e))
        worker, created = state.pool.add(url, events, replay, role)
        await state.health.check(worker)
        return JSONResponse(worker.describe(), status_code=201 if created else 200)

    @app.delete("/workers")
    async def unregister(request: Request) -> Response:
        url = request.query_params.get("url")
        if url is None:
            data = await _json_object(request)
            if isinstance(data, Response):
                return data
            url = str(data.get("url", ""))
        try:
            removed = state.pool.remove(url)
        except ValueError as e:
            return error_json(400, str(e))
        if not removed:
            return error_json(404, f"No worker {url!r} is registered.")
        return JSONResponse({"removed": normalize_url(url)})

    return app


async def _json_object(request: Request) -> dict | Response:
    try:
        data = json.loads(await request.body() or b"{}")
    except ValueError:
        return error_json(400, "The body is not valid JSON.")
    if not isinstance(data, dict):
        return error_json(400, "The body must be a JSON object.")
    return data
