"""Error mapping of the FastAPI app, in process, with `FakeAsyncLLM` standing in for the engine
(conditions a real engine cannot easily be put in: an internal error, a dead engine, a full
queue)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from _sluice_fake_engine import FakeAsyncLLM
from sluice.config_sources import build_engine_config
from sluice.entrypoints.openai.app import build_app
from sluice.frontend.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)


def _call(engine, method: str, path: str, json=None, headers=None, **config):
    cfg = build_engine_config(overrides={"model": "/unused", **config}, env={})
    app = build_app(engine, cfg)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, json=json, headers=headers)
    return asyncio.run(go())


def _error(response: httpx.Response, status: int, err_type: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == err_type and error["code"] == status
    return error


def test_internal_error_is_500_without_details(tokenizer):
    engine = FakeAsyncLLM(tokenizer)

    async def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")
        yield  # pragma: no cover

    engine.generate = broken
    error = _error(_call(engine, "POST", "/v1/completions", {"prompt": "x"}), 500,
                   "InternalServerError")
    assert "secret" not in error["message"]


def test_dead_engine_is_503(tokenizer):
    engine = FakeAsyncLLM(tokenizer)
    engine.is_dead = True
    _error(_call(engine, "GET", "/health"), 503, "ServiceUnavailableError")
    _error(_call(engine, "POST", "/v1/completions", {"prompt": "x"}), 503,
           "ServiceUnavailableError")
    _error(_call(engine, "POST", "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": "x"}]}), 503,
           "ServiceUnavailableError")


def test_queue_limit_is_429(tokenizer):
    engine = FakeAsyncLLM(tokenizer)
    engine.num_unfinished_requests = 3
    refused = _call(engine, "POST", "/v1/completions", {"prompt": "x"},
                    max_num_queued_requests=3)
    _error(refused, 429, "RateLimitError")
    assert refused.headers["retry-after"] == "1"
    ok = _call(engine, "POST", "/v1/completions", {"prompt": "x"}, max_num_queued_requests=4)
    assert ok.status_code == 200


def test_queue_limit_counts_sequences(tokenizer):
    """The bound counts prompts x n, not requests: one request of 2 prompts x n=3 is 6."""
    engine = FakeAsyncLLM(tokenizer)
    body = {"prompt": ["x", "y"], "n": 3, "max_tokens": 2}
    _error(_call(engine, "POST", "/v1/completions", body, max_num_queued_requests=5), 429,
           "RateLimitError")
    ok = _call(engine, "POST", "/v1/completions", body, max_num_queued_requests=6)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 6


def _routes(app) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves (its OpenAPI paths, which every router
    route joins by default, plus the schema itself), path parameters filled in."""
    found = [("GET", app.openapi_url)]
    for path, operations in app.openapi()["paths"].items():
        for method in operations:
            found.append((method.upper(), path.replace("{", "").replace("}", "")))
    return found


def test_api_key_walk_over_every_route(tokenizer):
    """Every route of the app needs the key except /health and /ping (and /metrics with
    --public-metrics): a route added later is covered without anyone remembering to."""
    cfg = build_engine_config(overrides={"model": "/unused", "api_key": "k"}, env={})
    app = build_app(FakeAsyncLLM(tokenizer), cfg)
    routes = _routes(app)
    assert ("POST", "/tokenize") in routes and ("GET", "/metrics") in routes
    assert len(routes) >= 10, routes
    public = {"/health", "/ping"}

    async def walk(headers: dict) -> dict[tuple[str, str], int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return {(m, p): (await client.request(m, p, json={}, headers=headers)).status_code
                    for m, p in [*routes, ("GET", "/no-such-route")]}

    without_key = asyncio.run(walk({}))
    wrong_key = asyncio.run(walk({"Authorization": "Bearer wrong"}))
    for (method, path), status in without_key.items():
        if path in public:
            assert status == 200, (method, path, status)
        else:
            assert status == 401, (method, path, status)
            assert wrong_key[(method, path)] == 401, (method, path)
    open_metrics = _call(FakeAsyncLLM(tokenizer), "GET", "/metrics", api_key="k",
                         public_metrics=True)
    assert open_metrics.status_code == 200


def test_request_limits_come_from_config(tokenizer):
    engine = FakeAsyncLLM(tokenizer)
    _error(_call(engine, "POST", "/v1/completions", {"prompt": "x", "n": 3}, max_n=2), 400,
           "BadRequestError")
    assert _call(engine, "POST", "/v1/completions", {"prompt": "x", "n": 2, "max_tokens": 1},
                 max_n=2).status_code == 200
    error = _error(_call(engine, "POST", "/v1/completions", {"prompt": "x" * 11},
                         max_prompt_chars=10), 400, "BadRequestError")
    assert error["param"] == "prompt" and "--max-prompt-chars" in error["message"]
    _error(_call(engine, "POST", "/v1/completions", {"prompt": "x" * 2000},
                 max_request_body_bytes="1KiB"), 413, "RequestTooLargeError")


def test_draining_server_answers_503(tokenizer):
    cfg = build_engine_config(overrides={"model": "/unused"}, env={})
    app = build_app(FakeAsyncLLM(tokenizer), cfg)
    app.state.sluice.draining = True

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.post("/v1/completions", json={"prompt": "x"}),
                    await client.get("/health"), await client.get("/metrics")]

    completion, health, metrics = asyncio.run(go())
    assert "shutting down" in _error(completion, 503, "ServiceUnavailableError")["message"]
    _error(health, 503, "ServiceUnavailableError")
    assert metrics.status_code == 200


def test_api_key(tokenizer):
    engine = FakeAsyncLLM(tokenizer)
    _error(_call(engine, "GET", "/v1/models", api_key="k"), 401, "AuthenticationError")
    ok = _call(engine, "GET", "/v1/models", headers={"Authorization": "Bearer k"}, api_key="k")
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "tiny"
    assert _call(engine, "GET", "/health", api_key="k").status_code == 200


def test_streaming_error_after_start_is_an_sse_event(tokenizer):
    engine = FakeAsyncLLM(tokenizer)
    original = engine.generate

    async def dies_midway(*args, **kwargs):
        async for output in original(*args, **kwargs):
            yield output
            from sluice.errors import EngineDeadError
            raise EngineDeadError("engine core died (test)")

    engine.generate = dies_midway
    response = _call(engine, "POST", "/v1/completions",
                     {"prompt": "x", "stream": True, "max_tokens": 5})
    assert response.status_code == 200
    events = [line for line in response.text.splitlines() if line.startswith("data:")]
    assert '"ServiceUnavailableError"' in events[-2] and events[-1] == "data: [DONE]"
