"""`build_app(engine, config)`: the OpenAI-compatible FastAPI application.

Routes (one module each): /v1/models (models.py), /v1/completions (completions.py),
/v1/chat/completions (chat.py), /tokenize + /detokenize (tokenize.py), /health, /version,
/metrics (health.py). Errors use OpenAI's shape (errors.py).

Middleware, outermost first: CORS (only with --allowed-origins), X-Request-Id (taken from the
request or generated, echoed on the response, available as `request.state.request_id`), API key
(Bearer auth on /v1/* when --api-key / SLUICE_API_KEY is set, compared in constant time).
The engine's stats feed a Prometheus registry owned by this app and, unless
--disable-log-stats, a periodic log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from sluice import __version__
from sluice.config import EngineConfig
from sluice.entrypoints.openai import chat, completions, health, models, tokenize
from sluice.entrypoints.openai.errors import error_body, install_exception_handlers
from sluice.entrypoints.openai.protocol import random_id
from sluice.entrypoints.openai.serving import ServerState
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


class APIKeyMiddleware:
    """401 (OpenAI's error shape) on /v1/* unless `Authorization: Bearer <api_key>`."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope.get("method") == "OPTIONS"
                or not scope.get("path", "").startswith("/v1")):
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if hmac.compare_digest(given, self._expected):
            await self.app(scope, receive, send)
            return
        message = ("Missing API key: send 'Authorization: Bearer <key>'." if not given
                   else "Incorrect API key provided.")
        body = json.dumps(error_body(401, message)).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def build_app(engine: Any, config: EngineConfig) -> FastAPI:
    """The FastAPI app serving `engine` (an `AsyncLLM`, already started) under `config`."""
    ready = engine.ready
    metrics = PrometheusMetrics(ready.model_name, ready.max_model_len)
    engine.add_stats_listener(metrics.record)
    stat_logger: LoggingStatLogger | None = None
    if not config.observability.disable_log_stats:
        stat_logger = LoggingStatLogger()
        engine.add_stats_listener(stat_logger.record)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(stat_logger.run_periodically()) if stat_logger else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()

    app = FastAPI(title="sluice", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.sluice = ServerState(engine=engine, config=config, model_name=ready.model_name,
                                   max_model_len=ready.max_model_len, metrics=metrics)
    install_exception_handlers(app)
    for module in (models, completions, chat, tokenize, health):
        app.include_router(module.router)

    # add_middleware wraps: the last one added runs first.
    if config.server.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.server.api_key)
    app.add_middleware(RequestIdMiddleware)
    if config.server.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.server.allowed_origins),
                           allow_credentials=True, allow_methods=["*"], allow_headers=["*"])
    return app
