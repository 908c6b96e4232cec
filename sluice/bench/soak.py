"""A soak load for a live OpenAI-compatible server: rounds of concurrent clients, with the
resident memory of the server's processes read after each round.

    results = event_loop.run(soak(base_url, server_pid, SoakConfig(rounds=5, seconds=20)))

Each of `clients` asyncio clients loops until the round's deadline, sending one request at a
time: /v1/completions or /v1/chat/completions, streamed or not, a prompt of random words and
a random `max_tokens`. A `disconnect_fraction` of the requests are abandoned early (a stream
closed after a few chunks, a plain request cancelled after a random delay), which the server
sees as a client disconnect. When the deadline passes, no new request starts; the round ends
once the requests in flight have finished, and then the RSS of the API-server process
(`server_pid`) and of its engine-core child(ren) is read.

Contract: a round's numbers never depend on the machine's speed except `done` and
`disconnected` (a slow machine finishes fewer requests per round). `errors_5xx` counts 5xx
answers, including an error event inside a stream; `errors_other` counts any other failure
that was not a deliberate disconnect (4xx, a refused or dropped connection, a bad stream).
No torch; `httpx` and `psutil` only.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly brew strong "
         "coffee near an old river bank under grey autumn clouds and tell long stories about "
         "ships maps stars kings bread iron salt wind snow gold glass").split()
SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly and stay on topic."


@dataclass(frozen=True)
class SoakConfig:
    """The load: `rounds` rounds of `seconds` each, `clients` concurrent clients."""
    rounds: int = 5
    seconds: float = 20.0
    clients: int = 64
    prompt_words: tuple[int, int] = (1, 200)
    """Prompt length in words, uniform in [lo, hi]."""
    max_tokens: tuple[int, int] = (1, 128)
    """`max_tokens` of each request, uniform in [lo, hi]."""
    stream_fraction: float = 0.5
    chat_fraction: float = 0.5
    disconnect_fraction: float = 0.15
    """Requests abandoned early by their client."""
    seed: int = 0
    request_timeout_s: float = 120.0


@dataclass
class RoundResult:
    """One round's counts and the RSS (bytes) read after it."""
    index: int
    done: int = 0
    disconnected: int = 0
    errors_5xx: int = 0
    errors_other: int = 0
    seconds: float = 0.0
    api_rss: int = 0
    engine_rss: int = 0
    error_samples: list[str] = field(default_factory=list)

    def record_error(self, is_5xx: bool, what: str) -> None:
        if is_5xx:
            self.errors_5xx += 1
        else:
            self.errors_other += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what[:300])

    def line(self) -> str:
        """One printable line: counts and RSS in MiB."""
        return (f"round {self.index:3d}: {self.done:6d} done {self.disconnected:5d} disconnected "
                f"{self.errors_5xx:3d} 5xx {self.errors_other:3d} other errors "
                f"({self.seconds:5.1f} s) | API server RSS {self.api_rss / 2**20:7.1f} MiB | "
                f"engine RSS {self.engine_rss / 2**20:7.1f} MiB")


# ---- processes ---------------------------------------------------------------------------

def engine_processes(server_pid: int) -> list[psutil.Process]:
    """The engine-core child(ren) of `server_pid`: its multiprocessing spawn children that are
    not the resource tracker."""
    found = []
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


def rss_breakdown(pid: int) -> dict[str, int]:
    """Resident bytes of `pid` by kind of mapping: `heap` (the brk heap: what the main
    thread's malloc hands out, e.g. torch's CPU tensors and oneDNN's primitives in the
    engine), `anon` (other anonymous mappings: weights and KV cache in the engine, malloc's
    per-thread arenas, pymalloc's arenas, thread stacks), `file` (file-backed: code, shared
    libraries)."""
    out = {"heap": 0, "anon": 0, "file": 0}
    for m in psutil.Process(pid).memory_maps(grouped=False):
        if m.path == "[heap]":
            out["heap"] += m.rss
        elif m.path and not m.path.startswith("["):
            out["file"] += m.rss
        else:
            out["anon"] += m.rss
    return out


def rss_bytes(server_pid: int) -> tuple[int, int]:
    """(API-server RSS, total RSS of its engine-core children), in bytes."""
    api = psutil.Process(server_pid).memory_info().rss
    engine = 0
    for proc in engine_processes(server_pid):
        try:
            engine += proc.memory_info().rss
        except psutil.Error:
            continue
    return api, engine


# ---- requests ----------------------------------------------------------------------------

def make_request(rng: random.Random, config: SoakConfig, model: str
                 ) -> tuple[str, dict[str, Any]]:
    """A random (route, JSON body)."""
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*config.prompt_words)))
    body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(*config.max_tokens),
                            "temperature": rng.choice((0.0, 0.7, 1.0)),
                            "ignore_eos": rng.random() < 0.5,
                            "stream": rng.random() < config.stream_fraction}
    if rng.random() < config.chat_fraction:
        body["messages"] = [{"role": "system", "content": SYSTEM_PROMPT},
                            {"role": "user", "content": words}]
        return "/v1/chat/completions", body
    body["prompt"] = words
    return "/v1/completions", body


async def _send_streamed(client: httpx.AsyncClient, route: str, body: dict[str, Any],
                         stop_after: int | None, result: RoundResult) -> None:
    async with client.stream("POST", route, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            result.record_error(response.status_code >= 500,
                                f"{route} HTTP {response.status_code}: {text}")
            return
        chunks = 0
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                result.done += 1
                return
            if "error" in json.loads(data):
                result.record_error(True, f"{route} stream error: {data}")
                return
            chunks += 1
            if stop_after is not None and chunks >= stop_after:
                result.disconnected += 1
                return  # leaving the block closes the connection mid-stream
    result.record_error(False, f"{route} stream ended without [DONE]")


async def _send_plain(client: httpx.AsyncClient, route: str, body: dict[str, Any],
                      result: RoundResult) -> None:
    response = await client.post(route, json=body)
    if response.status_code == 200:
        result.done += 1
    else:
        result.record_error(response.status_code >= 500,
                            f"{route} HTTP {response.status_code}: {response.text}")


async def send_one(client: httpx.AsyncClient, rng: random.Random, config: SoakConfig,
                   model: str, result: RoundResult) -> None:
    """Send one random request, abandoning it early with probability
    `config.disconnect_fraction`; count the outcome in `result`."""
    route, body = make_request(rng, config, model)
    disconnect = rng.random() < config.disconnect_fraction
    try:
        if body["stream"]:
            await _send_streamed(client, route, body, rng.randint(1, 8) if disconnect else None,
                                 result)
        elif disconnect:
            try:
                await asyncio.wait_for(_send_plain(client, route, body, result),
                                       timeout=rng.uniform(0.01, 1.0))
            except asyncio.TimeoutError:
                result.disconnected += 1
        else:
            await _send_plain(client, route, body, result)
    except httpx.HTTPError as e:
        result.record_error(False, f"{route} {type(e).__name__}: {e}")


# ---- rounds ------------------------------------------------------------------------------

async def _client_loop(client: httpx.AsyncClient, rng: random.Random, config: SoakConfig,
                       model: str, deadline: float, result: RoundResult) -> None:
    while time.monotonic() < deadline:
        await send_one(client, rng, config, model, result)


async def run_round(client: httpx.AsyncClient, index: int, config: SoakConfig, model: str,
                    rng: random.Random) -> RoundResult:
    """One round: `config.clients` client loops until the deadline, then the requests in
    flight finish. RSS is not read here (see `soak`)."""
    result = RoundResult(index)
    start = time.monotonic()
    deadline = start + config.seconds
    rngs = [random.Random(rng.getrandbits(64)) for _ in range(config.clients)]
    await asyncio.gather(*(_client_loop(client, r, config, model, deadline, result)
                           for r in rngs))
    result.seconds = time.monotonic() - start
    return result


async def served_model(client: httpx.AsyncClient) -> str:
    """The first model id of GET /v1/models."""
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def soak(base_url: str, server_pid: int, config: SoakConfig,
               on_round: Callable[[RoundResult], None] | None = None,
               headers: dict[str, str] | None = None) -> list[RoundResult]:
    """Run `config.rounds` rounds against `base_url`; after each, read the RSS of
    `server_pid` and its engine children into the round's result and call `on_round` with
    it. Returns every round's result."""
    rng = random.Random(config.seed)
    limits = httpx.Limits(max_connections=config.clients + 4,
                          max_keepalive_connections=config.clients + 4)
    results = []
    async with httpx.AsyncClient(base_url=base_url, timeout=config.request_timeout_s,
                                 limits=limits, headers=headers) as client:
        model = await served_model(client)
        for index in range(config.rounds):
            result = await run_round(client, index, config, model, rng)
            result.api_rss, result.engine_rss = rss_bytes(server_pid)
            results.append(result)
            if on_round is not None:
                on_round(result)
    return results


def growth_bytes(results: list[RoundResult]) -> tuple[int, int]:
    """(API-server, engine) RSS growth between the last two rounds, in bytes."""
    assert len(results) >= 2, "growth needs two rounds"
    a, b = results[-2], results[-1]
    return b.api_rss - a.api_rss, b.engine_rss - a.engine_rss
