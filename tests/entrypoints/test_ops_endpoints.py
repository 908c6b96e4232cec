"""The operations endpoints: GET|POST /ping, POST /reset_prefix_cache and, with
--enable-sleep-mode, POST /sleep?level=1|2, POST /wake_up, GET /is_sleeping.

Against a live `sluice serve` (a model large enough that freeing its weights shows in the
engine's RSS, and a 64 MiB KV cache): the prefix cache really forgets (a repeated prompt stops
hitting it), sleep really shrinks the engine process (read from /proc/<pid>/status), a sleeping
server refuses generation with 503 and says why on /health, and waking up gives the same greedy
output as before. In process, with a fake engine whose requests wait for the test: sleep is
refused (409) while a request is in flight.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from _sluice_fake_engine import FakeAsyncLLM
from _sluice_server_helpers import API_KEY
from sluice.config_sources import build_engine_config
from sluice.entrypoints.openai.app import build_app
from sluice.errors import EngineSleepingError
from sluice.frontend.tokenizer import load_tokenizer
from sluice.testing.tiny_models import TinyModelSpec

AUTH = {"Authorization": f"Bearer {API_KEY}"}
KV_CACHE_BYTES = 64 << 20
# 4 layers x 2 KV heads x 64 dims: 256 KiB per 64-token block, so 64 sequences of 256 tokens
# fill the whole 64 MiB; ~19 MiB of float32 weights.
SLEEPY_SPEC = TinyModelSpec(hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
PROMPT = " ".join(f"item{i} of the list" for i in range(40))  # well over one 64-token block
GREEDY = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.0,
          "ignore_eos": True}


@pytest.fixture(scope="module")
def sleepy_dir(tiny_model_factory) -> Path:
    return tiny_model_factory("llama-sleepy", SLEEPY_SPEC)


@pytest.fixture(scope="module")
def sleepy(start_server, sleepy_dir):
    return start_server(sleepy_dir, "--api-key", API_KEY, "--enable-sleep-mode",
                        "--max-num-seqs", "64", "--kv-cache-memory", "64MiB",
                        "--served-model-name", "sleepy")


@pytest.fixture
def http(sleepy):
    with httpx.Client(base_url=sleepy.url, timeout=120.0, headers=AUTH) as client:
        yield client


def _metric(http: httpx.Client, name: str, **labels: str) -> float:
    total = 0.0
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _greedy_text(http: httpx.Client) -> str:
    response = http.post("/v1/completions", json=GREEDY)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_ping_answers_get_and_post_without_the_key(sleepy):
    for method in ("GET", "POST"):
        assert httpx.request(method, sleepy.url + "/ping").status_code == 200


def test_ops_routes_need_the_key(sleepy):
    for method, path in (("POST", "/reset_prefix_cache"), ("POST", "/sleep?level=1"),
                         ("POST", "/wake_up"), ("GET", "/is_sleeping")):
        response = httpx.request(method, sleepy.url + path)
        assert response.status_code == 401, (method, path)
        assert response.json()["error"]["type"] == "AuthenticationError"
    assert not httpx.get(sleepy.url + "/is_sleeping", headers=AUTH).json()["is_sleeping"]


def test_reset_prefix_cache_forgets_cached_prompts(http):
    body = {"prompt": PROMPT, "max_tokens": 2}
    hits = lambda: _metric(http, "vllm:prefix_cache_hits_total")  # noqa: E731
    queries = lambda: _metric(http, "vllm:prefix_cache_queries_total")  # noqa: E731
    assert http.post("/v1/completions", json=body).status_code == 200
    before = hits()
    assert http.post("/v1/completions", json=body).status_code == 200
    assert hits() > before, "the repeated prompt should hit the prefix cache"

    reset = http.post("/reset_prefix_cache")
    assert reset.status_code == 200 and reset.json() == {"success": True}
    before_hits, before_queries = hits(), queries()
    assert http.post("/v1/completions", json=body).status_code == 200
    assert queries() > before_queries  # it was looked up …
    assert hits() == before_hits       # … and found nothing


def test_sleep_frees_memory_refuses_generation_and_wakes_to_the_same_output(http, sleepy,
                                                                            sleepy_dir):
    [engine_pid] = sleepy.engine_pids()
    reference = _greedy_text(http)
    weights_bytes = (sleepy_dir / "model.safetensors").stat().st_size

    awake = _rss_bytes(engine_pid)
    assert http.post("/sleep", params={"level": 1}).status_code == 200
    level1_drop = awake - _rss_bytes(engine_pid)
    _assert_asleep(http, sleepy, level=1)
    assert http.post("/wake_up").status_code == 200
    assert not http.get("/is_sleeping").json()["is_sleeping"]
    assert _greedy_text(http) == reference

    awake = _rss_bytes(engine_pid)
    assert http.post("/sleep", params={"level": 2}).status_code == 200
    level2_drop = awake - _rss_bytes(engine_pid)
    _assert_asleep(http, sleepy, level=2)
    assert http.post("/wake_up").status_code == 200
    assert _greedy_text(http) == reference  # weights reloaded from disk
    assert _metric(http, "vllm:engine_sleep_state", sleep_state="awake") == 1

    mib = 2 ** 20
    print(f"engine RSS drop: level 1 {level1_drop / mib:.1f} MiB (KV cache "
          f"{KV_CACHE_BYTES / mib:.0f} MiB), level 2 {level2_drop / mib:.1f} MiB "
          f"(+ weights {weights_bytes / mib:.1f} MiB)")
    assert level1_drop >= KV_CACHE_BYTES // 2, level1_drop / mib
    assert level2_drop >= level1_drop + weights_bytes // 2, (level1_drop / mib,
                                                             level2_drop / mib)


def _assert_asleep(http: httpx.Client, server, level: int) -> None:
    assert http.get("/is_sleeping").json() == {"is_sleeping": True}
    for path, body in (("/v1/completions", GREEDY),
                       ("/v1/chat/completions",
                        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})):
        refused = http.post(path, json=body)
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["type"] == "ServiceUnavailableError" and error["code"] == 503
        assert "sleeping" in error["message"] and "/wake_up" in error["message"]
    health = httpx.get(server.url + "/health")  # public, alive: 200, saying why
    assert health.status_code == 200 and health.headers["x-engine-state"] == "sleeping"
    assert health.json()["status"] == "sleeping" and health.json()["sleep_level"] == level
    assert http.post("/tokenize", json={"prompt": "hi"}).status_code == 200  # no model needed
    state = "weights_offloaded" if level == 1 else "discard_all"
    assert _metric(http, "vllm:engine_sleep_state", sleep_state=state) == 1
    assert _metric(http, "vllm:engine_sleep_state", sleep_state="awake") == 0


def test_bad_sleep_level_is_400(http):
    for level in ("0", "3", "deep"):
        response = http.post("/sleep", params={"level": level})
        assert response.status_code == 400, level
        assert response.json()["error"]["param"] == "level"


def test_sleep_routes_only_with_sleep_mode(tiny_tokenizer_dir):
    cfg = build_engine_config(overrides={"model": "/unused"}, env={})
    app = build_app(FakeAsyncLLM(load_tokenizer(tiny_tokenizer_dir)), cfg)
    paths = set(app.openapi()["paths"])
    assert "/reset_prefix_cache" in paths
    assert not paths & {"/sleep", "/wake_up", "/is_sleeping"}


class _SleepyFake(FakeAsyncLLM):
    """A fake engine with sleep mode whose generations wait for `release`."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.sleep_level = 0
        self.release = asyncio.Event()

    def sleeping_error(self) -> EngineSleepingError:
        return EngineSleepingError("The model is sleeping; POST /wake_up.")

    async def sleep(self, level: int) -> None:
        self.sleep_level = level

    async def wake_up(self) -> None:
        self.sleep_level = 0

    async def generate(self, *args, **kwargs):
        await self.release.wait()
        async for output in super().generate(*args, **kwargs):
            yield output


def test_sleep_is_refused_while_a_request_is_in_flight(tiny_tokenizer_dir):
    engine = _SleepyFake(load_tokenizer(tiny_tokenizer_dir))
    cfg = build_engine_config(overrides={"model": "/unused", "enable_sleep_mode": True}, env={})
    app = build_app(engine, cfg)
    body = {"prompt": "x", "max_tokens": 2}

    async def go() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            pending = asyncio.create_task(client.post("/v1/completions", json=body))
            while app.state.sluice.num_in_flight == 0:
                await asyncio.sleep(0.01)
            busy = await client.post("/sleep")
            assert busy.status_code == 409 and "in flight" in busy.json()["error"]["message"]
            assert engine.sleep_level == 0
            engine.release.set()
            assert (await pending).status_code == 200
            assert (await client.post("/sleep", params={"level": 2})).status_code == 200
            refused = await client.post("/v1/completions", json=body)
            assert refused.status_code == 503 and "sleeping" in refused.json()["error"]["message"]
            assert (await client.post("/wake_up")).status_code == 200
            assert (await client.post("/v1/completions", json=body)).status_code == 200

    asyncio.run(asyncio.wait_for(go(), 60.0))
