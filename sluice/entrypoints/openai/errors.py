"""Every failure of the HTTP API as OpenAI's error body `{"error": {message, type, param, code}}`.

| cause                                           | status | type                      |
|-------------------------------------------------|--------|---------------------------|
| malformed JSON, wrong field type/value          | 400    | BadRequestError           |
| `InvalidRequestError` (sampling, context length) | 400    | BadRequestError           |
| missing/wrong API key                           | 401    | AuthenticationError       |
| unknown model, unknown route                    | 404    | NotFoundError             |
| request body over --max-request-body-bytes      | 413    | RequestTooLargeError      |
| too many queued sequences (with Retry-After)    | 429    | RateLimitError            |
| client went away before the response            | 499    | ClientDisconnected        |
| `EngineDeadError`, server shutting down         | 503    | ServiceUnavailableError   |
| anything else (traceback logged)                | 500    | InternalServerError       |

`code` is the HTTP status. `install_exception_handlers(app)` registers the mapping on an app
(call it before adding other middleware, so that the catch-all sits innermost);
`error_from_exception` is the same mapping as a pure function (used by SSE streams, which can
no longer change their status code and send the error as a `data:` event instead).
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sluice.entrypoints.openai.protocol import ErrorInfo, ErrorResponse
from sluice.errors import EngineDeadError, InvalidRequestError, NotFoundError

logger = logging.getLogger(__name__)

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
          405: "MethodNotAllowedError", 413: "RequestTooLargeError", 429: "RateLimitError",
          499: "ClientDisconnected", 500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    """An error the API answers with `status` (raise it from endpoints and helpers)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _TYPES.get(status) or _phrase(status)
        self.headers = headers


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.replace(" ", "") + "Error"
    except ValueError:
        return "Error"


def error_body(status: int, message: str, param: str | None = None,
               type: str | None = None) -> dict[str, Any]:
    """The JSON body of an error response."""
    err_type = type or _TYPES.get(status) or _phrase(status)
    return ErrorResponse(error=ErrorInfo(message=message, type=err_type, param=param,
                                         code=status)).model_dump()


def error_response(status: int, message: str, param: str | None = None,
                   type: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, type), status_code=status)


async def send_error(send: Any, status: int, message: str, param: str | None = None,
                     headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Send a complete error response on a raw ASGI `send` (for middleware that answers
    before the app runs)."""
    payload = json.dumps(error_body(status, message, param)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})


def error_from_exception(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(status, body) for any exception; unexpected ones are logged with their traceback."""
    if isinstance(exc, APIError):
        return exc.status, error_body(exc.status, exc.message, exc.param, exc.type)
    if isinstance(exc, InvalidRequestError):
        return 400, error_body(400, exc.message, exc.param)
    if isinstance(exc, NotFoundError):
        return 404, error_body(404, exc.message, exc.param)
    if isinstance(exc, EngineDeadError):
        return 503, error_body(503, str(exc))
    if isinstance(exc, (BaseExceptionGroup)) and exc.exceptions:
        return error_from_exception(exc.exceptions[0])
    logger.error("Unexpected error while serving a request", exc_info=exc)
    return 500, error_body(500, "Internal server error; see the server log for details.")


_UNION_TAGS = ("str", "int", "float", "bool", "function-after", "function-before")


def _loc_param(loc: Sequence[Any]) -> str | None:
    """The request field a pydantic error location points at ('body' prefix dropped):
    ('body', 'messages', 0, 'role') -> 'messages.0.role'. Inside a union (e.g. `prompt`,
    whose members show up as 'list[int]', 'str' …) the union field itself is named."""
    parts: list[str] = []
    for part in loc:
        text = str(part)
        if text in ("body", "query", "path", "header") and not parts:
            continue
        if "[" in text or text in _UNION_TAGS:
            break
        parts.append(text)
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """(message, param) for FastAPI's request validation error (bad JSON or bad fields)."""
    errors = exc.errors()
    if not errors:
        return "Invalid request body.", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        detail = ctx.get("error", "")
        return f"The request body is not valid JSON: {detail}".rstrip(": "), None
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return "The request body is missing; send a JSON object.", None
    param = _loc_param(first.get("loc", ()))
    # A union (e.g. prompt) reports one error per member: say it once.
    same_param = [e for e in errors if _loc_param(e.get("loc", ())) == param]
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if len(same_param) > 1:
        msg = "has the wrong type or shape"
    extra = "" if len(errors) == len(same_param) else \
        f" (and {len(errors) - len(same_param)} more problems)"
    what = f"{param}: " if param else ""
    return f"Invalid request: {what}{msg}{extra}.", param


def install_exception_handlers(app: FastAPI) -> None:
    """Map every exception to an OpenAI-shaped error response."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_error(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return error_response(exc.status_code, detail)

    async def _known(_: Request, exc: Exception) -> JSONResponse:
        status, body = error_from_exception(exc)
        return JSONResponse(body, status_code=status, headers=getattr(exc, "headers", None))

    for cls in (APIError, InvalidRequestError, NotFoundError, EngineDeadError):
        app.add_exception_handler(cls, _known)
    app.add_middleware(UnexpectedErrorMiddleware)


class UnexpectedErrorMiddleware:
    """Answers any other exception with a generic 500 (traceback logged once), instead of
    Starlette's plain-text 500 and re-raise. A streamed response that already started cannot
    change its status; there the error is logged and the connection closed."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 - the last line of defence
            status, body = error_from_exception(exc)
            if started:
                return
            error = body["error"]
            await send_error(send, status, error["message"], error["param"])
