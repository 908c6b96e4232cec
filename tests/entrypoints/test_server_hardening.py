"""Requests that must not knock the server over, on a live server: each gets its 4xx in OpenAI's
shape within a bound while a concurrent poller sees /health keep answering (a bound of seconds
on a busy 2-core machine, not a timing benchmark)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Iterator

import httpx
import pytest

from _sluice_server_helpers import API_KEY
from test_http_errors import assert_error, assert_still_serving

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ANSWER_BOUND_S = 20.0
"""Every bad request is answered within this (the slow cases took 8-37 s or never answered
before the bounds; now they take milliseconds, plus whatever a busy machine adds)."""
HEALTH_STALL_BOUND_S = 2.0
"""The longest /health may take while a heavy request is processed (it stalled 8-20 s)."""


class HealthPoller:
    """Polls /health every 50 ms in a thread (entering waits for the first answer);
    `max_latency_s` is the slowest answer seen, `failures` the polls that were not a 200."""

    def __init__(self, url: str):
        self.url = url + "/health"
        self.max_latency_s = 0.0
        self.num_polls = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30.0) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    status = client.get(self.url).status_code
                    if status != 200:
                        self.failures.append(str(status))
                except httpx.HTTPError as e:
                    self.failures.append(repr(e))
                self.max_latency_s = max(self.max_latency_s, time.monotonic() - start)
                self.num_polls += 1
                self._first.set()
                self._stop.wait(0.05)

    def __enter__(self) -> "HealthPoller":
        self._thread.start()
        self._first.wait(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


@contextlib.contextmanager
def health_kept(url: str) -> Iterator[HealthPoller]:
    """Run the block with a /health poller; afterwards assert /health never stalled or failed."""
    with HealthPoller(url) as poller:
        yield poller
    assert not poller.failures, poller.failures
    assert poller.max_latency_s < HEALTH_STALL_BOUND_S, poller.max_latency_s


def timed_post(client: httpx.Client, path: str, **kwargs) -> httpx.Response:
    start = time.monotonic()
    response = client.post(path, **kwargs)
    assert time.monotonic() - start < ANSWER_BOUND_S, (path, time.monotonic() - start)
    return response


BIG = 2**70
USER = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    # unbounded fan-out
    ("/v1/completions", {"prompt": "x", "n": 1180591620717411303424}, "n"),
    ("/v1/completions", {"prompt": "x", "n": 100000, "max_tokens": 1}, "n"),
    ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 1000}, "best_of"),
    ("/v1/completions", {"prompt": ["x"] * 600, "n": 2, "max_tokens": 1}, "prompt"),
    ("/v1/chat/completions", {"messages": USER, "n": 129}, "n"),
    # integers outside int64
    ("/v1/completions", {"prompt": "x", "seed": BIG}, "seed"),
    ("/v1/completions", {"prompt": "x", "top_k": BIG}, "top_k"),
    ("/v1/completions", {"prompt": "x", "priority": BIG}, "priority"),
    ("/v1/completions", {"prompt": "x", "min_tokens": BIG}, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [BIG]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": [BIG]}, "prompt"),
    ("/v1/chat/completions", {"messages": USER, "seed": -BIG}, "seed"),
    # text that is not valid Unicode
    ("/v1/completions", {"prompt": "ab \ud800 cd"}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": ["\udfff"]}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ab \ud800 cd"}]},
     "messages"),
    ("/tokenize", {"prompt": "ab \ud800 cd"}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
    # per-request bounds
    ("/v1/completions", {"prompt": "x", "stop": [f"s{i}" for i in range(33)]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["y" * 257]}, "stop"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {str(i): 1 for i in range(1025)}},
     "logit_bias"),
    ("/v1/completions", {"prompt": "x " * 5000}, "prompt"),  # > 32 x max_model_len chars
    ("/tokenize", {"prompt": "x " * 5000}, "prompt"),
    # chat template options
    ("/v1/chat/completions", {"messages": USER, "chat_template": "{{ 'x' }}"},
     "chat_template"),
    ("/v1/chat/completions", {"messages": USER, "chat_template_kwargs":
                              {"chat_template": "{{ 'x' }}"}}, "chat_template"),
    ("/v1/chat/completions", {"messages": USER, "chat_template_kwargs": {"tokenize": True}},
     "chat_template_kwargs"),
    ("/tokenize", {"messages": USER, "chat_template_kwargs": {"messages": []}},
     "chat_template_kwargs"),
    # malformed or unsupported tools / response_format
    ("/v1/chat/completions", {"messages": USER, "tools": "garbage"}, "tools"),
    ("/v1/chat/completions", {"messages": USER, "tool_choice": {"type": 5}}, "tool_choice"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "nonsense"}},
     "response_format.type"),
    ("/v1/chat/completions", {"messages": USER, "response_format": "json"},
     "response_format"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ("/v1/chat/completions", {"messages": USER, "tools": [
        {"type": "function", "function": {"name": "get_weather"}}]}, "tools"),
    ("/v1/chat/completions", {"messages": USER, "tool_choice": "required"}, "tool_choice"),
]


@pytest.mark.parametrize("path,body,param", BAD_REQUESTS,
                         ids=[f"{i}-{p}" for i, (_, _, p) in enumerate(BAD_REQUESTS)])
def test_bad_request_is_a_prompt_400(server, http, path, body, param):
    with health_kept(server.url):
        # json.dumps escapes lone surrogates as \ud800, as a JavaScript client would
        response = timed_post(http, path, content=json.dumps(body),
                              headers={"Content-Type": "application/json"})
    assert_error(response, 400, "BadRequestError", param)


def test_nested_json_is_400(server, http):
    for path in ("/tokenize", "/v1/completions", "/detokenize"):
        response = timed_post(http, path, content=b"[" * 100_000,
                              headers={"Content-Type": "application/json"})
        assert_error(response, 400, "BadRequestError")
    assert_still_serving(http)


def test_chat_template_kwargs_override_like_vllm(http):
    """A kwarg that is also a request field is not a duplicate-keyword 500: as in vLLM,
    chat_template_kwargs win."""
    body = {"messages": USER, "max_tokens": 2, "add_generation_prompt": False}
    plain = http.post("/tokenize", json=body).json()
    overridden = http.post("/tokenize", json={
        **body, "chat_template_kwargs": {"add_generation_prompt": True}}).json()
    assert overridden["count"] > plain["count"]
    response = http.post("/v1/chat/completions", json={
        **body, "chat_template_kwargs": {"add_generation_prompt": True}})
    assert response.status_code == 200, response.text


def test_tools_with_tool_choice_none_are_rendered_not_called(http):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    response = http.post("/v1/chat/completions", json={
        "messages": USER, "tools": tools, "tool_choice": "none", "max_tokens": 2})
    assert response.status_code == 200, response.text
    text = http.post("/v1/chat/completions", json={
        "messages": USER, "response_format": {"type": "text"}, "max_tokens": 2})
    assert text.status_code == 200, text.text


def test_oversized_bodies_are_413_unread(server, http):
    with health_kept(server.url):
        declared = timed_post(http, "/v1/completions",
                              json={"prompt": "x" * (20 * 2**20)})
        assert_error(declared, 413, "RequestTooLargeError")

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts streamed bytes
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"y" * 2**20
            yield b'"}'

        streamed = timed_post(http, "/v1/completions", content=chunks(),
                              headers={"Content-Type": "application/json"})
        assert_error(streamed, 413, "RequestTooLargeError")
    assert_still_serving(http)


def test_api_key_guards_every_costly_route(server):
    """The live server's side of the route walk in test_app_errors: /tokenize, /detokenize,
    /metrics and unknown paths need the key; /health and /ping do not."""
    for method, path in (("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/metrics"),
                         ("GET", "/version"), ("GET", "/v1/models"), ("GET", "/nope"),
                         ("GET", "/openapi.json")):
        response = httpx.request(method, server.url + path, json={"prompt": "x"})
        assert_error(response, 401, "AuthenticationError")
    for method, path in (("GET", "/health"), ("GET", "/ping"), ("POST", "/ping")):
        assert httpx.request(method, server.url + path).status_code == 200


# ---- work kept off the event loop (limited_server: 4 M-character prompts, trusted templates)

def test_large_tokenize_keeps_health_answering(limited_server):
    text = "The quick brown fox jumps over the lazy dog. " * 40_000  # 1.8 M characters
    with health_kept(limited_server.url) as poller, httpx.Client(
            base_url=limited_server.url, timeout=120.0) as client:
        response = client.post("/tokenize", json={"prompt": text})
    assert response.status_code == 200, response.text[:300]
    assert response.json()["count"] > 100_000
    assert poller.num_polls >= 3  # /health was polled while the tokenizer ran


def test_large_prompt_over_context_is_400_and_health_answers(limited_server):
    text = "word " * 700_000  # 3.5 M characters: tokenized off the loop, then too long
    with health_kept(limited_server.url), httpx.Client(base_url=limited_server.url,
                                                       timeout=120.0) as client:
        response = timed_post(client, "/v1/completions", json={"prompt": text})
    error = assert_error(response, 400, "BadRequestError", "prompt")
    assert "maximum context length" in error["message"]


def test_request_template_bomb_is_cut_off(limited_server):
    bomb = ("{% for i in range(3000) %}{% for j in range(3000) %}x{% endfor %}{% endfor %}")
    with health_kept(limited_server.url), httpx.Client(base_url=limited_server.url,
                                                       timeout=120.0) as client:
        response = timed_post(client, "/v1/chat/completions",
                              json={"messages": USER, "chat_template": bomb, "max_tokens": 1})
        error = assert_error(response, 400, "BadRequestError", "chat_template")
        assert "render" in error["message"]
        fine = client.post("/v1/chat/completions", json={
            "messages": USER, "max_tokens": 2,
            "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"})
    assert fine.status_code == 200, fine.text
