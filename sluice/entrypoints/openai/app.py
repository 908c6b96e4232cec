"""`build_app(engine, config)`: the OpenAI-compatible FastAPI application.

Routes (one module each): /v1/models (models.py), /v1/completions (completions.py),
/v1/chat/completions (chat.py), /tokenize + /detokenize (tokenize.py), /health, /ping,
/version, /metrics (health.py), /reset_prefix_cache and, with --enable-sleep-mode, /sleep,
/wake_up, /is_sleeping (ops.py); with SLUICE_ALLOW_RUNTIME_LORA_UPDATING=1,
/v1/load_lora_adapter and /v1/unload_lora_adapter (lora.py). Errors use OpenAI's shape
(errors.py).

Middleware, outermost first:
1. CORS (only with --allowed-origins);
2. X-Request-Id (taken from the request or generated, echoed on the response, available as
   `request.state.request_id`);
3. drain: 503 on every route but /metrics once a shutdown signal arrived (serve_cmd.py);
4. API key (with --api-key / SLUICE_API_KEY): Bearer auth on every route, unknown ones included,
   except `PUBLIC_PATHS` (/health, /ping; /metrics with --public-metrics), compared in constant
   time — a new route is protected without anyone remembering to;
5. sleeping (with --enable-sleep-mode): 503 on the generation routes while the engine sleeps;
6. body size: 413 for a body over --max-request-body-bytes, before any of it is parsed.
The engine's stats feed a Prometheus registry owned by this app and, unless
--disable-log-stats, a periodic log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from sluice import __version__
from sluice.config import EngineConfig
from sluice.entrypoints.openai import chat, completions, health, lora, models, ops, tokenize
from sluice.entrypoints.openai.errors import (error_response, install_exception_handlers,
                                              send_error)
from sluice.entrypoints.openai.limits import RequestLimits
from sluice.entrypoints.openai.protocol import random_id
from sluice.entrypoints.openai.serving import SHUTTING_DOWN, ServerState, sampling_defaults
from sluice.errors import EngineBusyError, EngineSleepingError
from sluice.gc_heap import freeze_startup_heap, thaw_heap
from sluice.metrics.loggers import LoggingStatLogger
from sluice.metrics.prometheus import PrometheusMetrics

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = b"x-request-id"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

ASGIApp = Any


class RequestIdMiddleware:
    """Puts the X-Request-Id header (or a fresh id) in `request.state.request_id` and on the
    response. An id with unusual characters is replaced (it ends up in logs and response ids).
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER, b"").decode("latin-1")
        request_id = given if _SAFE_ID.match(given) else random_id()
        scope.setdefault("state", {})["request_id"] = request_id
        header = (REQUEST_ID_HEADER, request_id.encode("latin-1"))

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def route_path(scope: dict) -> str:
    """The request's path as the routes see it: without the ASGI root_path prefix
    (--root-path; uvicorn puts it in front of `path`)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


PUBLIC_PATHS = frozenset(("/health", "/ping"))
"""Routes that answer without the API key (load balancers' probes)."""


class APIKeyMiddleware:
    """401 (OpenAI's error shape) unless `Authorization: Bearer <api_key>`, on every path but
    `public_paths` (and CORS preflights)."""

    def __init__(self, app: ASGIApp, api_key: str, public_paths: frozenset[str]):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()
        self._public = public_paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope.get("method") == "OPTIONS"
                or route_path(scope) in self._public):
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if hmac.compare_digest(given, self._expected):
            await self.app(scope, receive, send)
            return
        message = ("Missing API key: send 'Authorization: Bearer <key>'." if not given
                   else "Incorrect API key provided.")
        await send_error(send, 401, message, headers=[(b"www-authenticate", b"Bearer")])


class BodySizeLimitMiddleware:
    """413 for a request body over `max_bytes`: at once when Content-Length says so, else as
    soon as the streamed body passes it. The body is read here in full and replayed to the app
    as one message, so no endpoint ever sees part of an oversized body; later `receive` calls
    (disconnect detection) go to the server as usual."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replay: list[dict] = [{"type": "http.request", "body": b"".join(chunks),
                               "more_body": False}]

        async def replaying_receive() -> dict:
            return replay.pop() if replay else await receive()

        await self.app(scope, replaying_receive, send)

    async def _too_large(self, send: Any) -> None:
        await send_error(send, 413, f"The request body is larger than {self.max_bytes} bytes "
                         "(--max-request-body-bytes).", headers=[(b"connection", b"close")])


class DrainMiddleware:
    """503 on every route but /metrics once the server drains for shutdown."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.state.draining and route_path(scope) != "/metrics":
            await send_error(send, 503, SHUTTING_DOWN, headers=[(b"connection", b"close")])
            return
        await self.app(scope, receive, send)


GENERATION_PATHS = frozenset(("/v1/completions", "/v1/chat/completions"))
"""Routes that need the model: 503 while it sleeps (/tokenize, /v1/models … still answer)."""


class SleepingMiddleware:
    """503 (OpenAI's error shape, saying why) on `GENERATION_PATHS` while the engine sleeps, as
    vLLM's sleep mode; the engine's `generate` refuses too (`EngineSleepingError`, also 503),
    for a request admitted just before a sleep began."""

    def __init__(self, app: ASGIApp, engine: Any):
        self.app = app
        self.engine = engine

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (scope["type"] == "http" and self.engine.sleep_level
                and route_path(scope) in GENERATION_PATHS):
            await send_error(send, 503, str(self.engine.sleeping_error()))
            return
        await self.app(scope, receive, send)


def build_app(engine: Any, config: EngineConfig, lora_registry: Any = None) -> FastAPI:
    """The FastAPI app serving `engine` (an `AsyncLLM`, already started) under `config`.
    `lora_registry` (`sluice.lora.registry.LoRARegistry`): the adapters served by name; with
    --enable-lora and none given, one is built from --lora-modules."""
    ready = engine.ready
    metrics = PrometheusMetrics(ready.model_name, ready.max_model_len,
                                engine_indexes=getattr(engine, "engine_indexes", (0,)),
                                max_loras=(config.lora.max_loras if config.lora.enable_lora
                                           else None),
                                speculative=config.scheduler.speculative_config is not None)
    engine.add_stats_listener(metrics.record)
    stat_logger: LoggingStatLogger | None = None
    if not config.observability.disable_log_stats:
        stat_logger = LoggingStatLogger()
        engine.add_stats_listener(stat_logger.record)

    state = ServerState(engine=engine, config=config, model_name=ready.model_name,
                        max_model_len=ready.max_model_len, metrics=metrics,
                        limits=RequestLimits.from_config(config, ready.max_model_len))
    if lora_registry is None and config.lora.enable_lora:
        from sluice.lora.registry import registry_from_config
        lora_registry = registry_from_config(config, state.served_model_names)
    state.lora = lora_registry
    sampling_defaults(state)  # a bad --generation-config fails here, not on the first request

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(stat_logger.run_periodically()) if stat_logger else None
        freeze_startup_heap()   # the server's own startup objects (routes, tokenizer …)
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            state.offloader.shutdown()
            thaw_heap()

    app = FastAPI(title="sluice", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.sluice = state
    install_exception_handlers(app)

    async def sleeping(_: Any, exc: Exception) -> Any:
        return error_response(503, str(exc))

    async def busy(_: Any, exc: Exception) -> Any:
        return error_response(409, str(exc))
    app.add_exception_handler(EngineSleepingError, sleeping)
    app.add_exception_handler(EngineBusyError, busy)
    for module in (models, completions, chat, tokenize, health, ops):
        app.include_router(module.router)
    if config.model.enable_sleep_mode:
        app.include_router(ops.sleep_router)
    if lora.runtime_updating_allowed():
        app.include_router(lora.router)

    # add_middleware wraps: the last one added runs first.
    server = config.server
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=server.max_request_body_bytes)
    if config.model.enable_sleep_mode:
        app.add_middleware(SleepingMiddleware, engine=engine)
    if server.api_key:
        public = PUBLIC_PATHS | ({"/metrics"} if server.public_metrics else set())
        app.add_middleware(APIKeyMiddleware, api_key=server.api_key, public_paths=public)
    app.add_middleware(DrainMiddleware, state=state)
    app.add_middleware(RequestIdMiddleware)
    if config.server.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.server.allowed_origins),
                           allow_credentials=True, allow_methods=["*"], allow_headers=["*"])
    return app
