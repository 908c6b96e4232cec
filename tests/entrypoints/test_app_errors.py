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
    _error(_call(engine, "POST", "/v1/completions", {"prompt": "x"},
                 max_num_queued_requests=3), 429, "RateLimitError")
    ok = _call(engine, "POST", "/v1/completions", {"prompt": "x"}, max_num_queued_requests=4)
    assert ok.status_code == 200


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
