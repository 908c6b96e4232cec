"""The router's workers: registration, load, health (the canary) and their KV indexes.

A worker is a `sluice serve` (or any OpenAI-compatible server) at a base URL, optionally with
the endpoints of its KV events (`--kv-events-config` on the worker) so that `kv` routing knows
its cache. Workers come from `--worker URL[,EVENTS[,REPLAY]]` on the command line and from
`POST /workers {"url", "kv_events_endpoint"?, "kv_replay_endpoint"?}` (`DELETE /workers`
removes one).

Health: the canary (`HealthChecker`) GETs each worker's /health every `interval_s`. A worker
that fails `failure_threshold` checks in a row (or refuses a connection while the router
forwards a request) leaves the routing set; the first check that passes again puts it back,
with its KV index rebuilt from the worker's replay buffer. Torch-free.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import httpx

from sluice.entrypoints.router.kv_index import KVEventSubscriber, KVIndex

logger = logging.getLogger("sluice.router")


def normalize_url(url: str) -> str:
    """`url` without trailing slashes; only http(s) URLs are workers (ValueError otherwise)."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
        raise ValueError(f"a worker URL must start with http:// or https://, got {url!r}")
    return url


def parse_worker_spec(spec: str) -> tuple[str, str | None, str | None]:
    """`URL[,KV_EVENTS_ENDPOINT[,KV_REPLAY_ENDPOINT]]` -> (url, events, replay)."""
    parts = [p.strip() for p in spec.split(",")]
    if not 1 <= len(parts) <= 3 or any(not p for p in parts):
        raise ValueError(f"--worker {spec!r}: expected URL[,KV_EVENTS_ENDPOINT"
                         "[,KV_REPLAY_ENDPOINT]], e.g. http://127.0.0.1:8001,"
                         "tcp://127.0.0.1:5557,tcp://127.0.0.1:5558")
    for endpoint in parts[1:]:
        if "://" not in endpoint:
            raise ValueError(f"--worker {spec!r}: {endpoint!r} is not a ZeroMQ endpoint "
                             "(tcp://HOST:PORT)")
    return normalize_url(parts[0]), *(parts[1:] + [None, None])[:2]  # type: ignore[return-value]


@dataclass(eq=False)
class Worker:
    url: str
    kv_events_endpoint: str | None = None
    kv_replay_endpoint: str | None = None
    role: str = "both"             # disaggregated mode: prefill | decode | both
    healthy: bool = False          # in the routing set (set by the canary)
    outstanding: int = 0           # requests this router has in flight on it
    consecutive_failures: int = 0
    routed: Counter = field(default_factory=Counter)   # router mode -> requests
    errors: Counter = field(default_factory=Counter)   # kind -> count
    index: KVIndex = field(default_factory=KVIndex)
    subscriber: KVEventSubscriber | None = None
    kv_transfer: dict[str, float] = field(default_factory=dict)  # scraped from its /metrics

    def has_role(self, role: str | None) -> bool:
        return role is None or self.role in (role, "both")

    def start_events(self) -> None:
        if self.kv_events_endpoint is not None and self.subscriber is None:
            self.subscriber = KVEventSubscriber(self.index, self.kv_events_endpoint,
                                                self.kv_replay_endpoint, name=self.url).start()

    def stop_events(self) -> None:
        if self.subscriber is not None:
            self.subscriber.stop()
            self.subscriber = None

    def describe(self) -> dict:
        return {"url": self.url, "role": self.role, "healthy": self.healthy,
                "outstanding": self.outstanding,
                "kv_events_endpoint": self.kv_events_endpoint,
                "kv_replay_endpoint": self.kv_replay_endpoint, "kv_blocks": len(self.index),
                "kv_block_size": self.index.block_size, "routed": dict(self.routed)}


class WorkerPool:
    """Registered workers in registration order (that order is round-robin's)."""

    def __init__(self) -> None:
        self._workers: dict[str, Worker] = {}

    def add(self, url: str, kv_events_endpoint: str | None = None,
            kv_replay_endpoint: str | None = None,
            role: str = "both") -> tuple[Worker, bool]:
        """Register a worker (not yet healthy: the canary admits it). Re-registering a URL
        with other endpoints replaces its KV subscription. Returns (worker, created)."""
        url = normalize_url(url)
        worker = self._workers.get(url)
        if worker is not None:
            worker.role = role
            if (worker.kv_events_endpoint, worker.kv_replay_endpoint) != (
                    kv_events_endpoint, kv_replay_endpoint):
                worker.stop_events()
                worker.index.clear()
                worker.kv_events_endpoint = kv_events_endpoint
                worker.kv_replay_endpoint = kv_replay_endpoint
                worker.start_events()
            return worker, False
        worker = Worker(url, kv_events_endpoint, kv_replay_endpoint, role)
        worker.start_events()
        self._workers[url] = worker
        logger.info("registered worker %s (role %s, KV events: %s)", url, role,
                    kv_events_endpoint or "none")
        return worker, True

    def remove(self, url: str) -> bool:
        worker = self._workers.pop(normalize_url(url), None)
        if worker is None:
            return False
        worker.stop_events()
        logger.info("removed worker %s", worker.url)
        return True

    def get(self, url: str) -> Worker | None:
        return self._workers.get(url)

    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self._workers.values()))

    def __len__(self) -> int:
        return len(self._workers)

    def healthy(self, role: str | None = None) -> list[Worker]:
        """Healthy workers (that can take `role`: prefill / decode; None: any)."""
        return [w for w in self._workers.values() if w.healthy and w.has_role(role)]

    def with_role(self, role: str) -> list[Worker]:
        return [w for w in self._workers.values() if w.has_role(role)]

    def close(self) -> None:
        for worker in self:
            worker.stop_events()


def mark_down(worker: Worker, reason: str) -> None:
    """Take `worker` out of the routing set until the canary sees it healthy again."""
    if worker.healthy:
        logger.warning("worker %s removed from routing: %s", worker.url, reason)
        worker.healthy = False
        if worker.subscriber is not None:
            worker.subscriber.resync()   # its cache may be gone; rebuilt on recovery


def mark_up(worker: Worker) -> None:
    if not worker.healthy:
        logger.info("worker %s is healthy; routing to it", worker.url)
        worker.healthy = True
        if worker.subscriber is not None:
            worker.subscriber.resync()


class HealthChecker:
    """The canary: GET /health on every worker each `interval_s` seconds."""

    def __init__(self, pool: WorkerPool, client: httpx.AsyncClient, interval_s: float = 2.0,
                 timeout_s: float = 2.0, failure_threshold: int = 2):
        self.pool = pool
        self.client = client
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.failure_threshold = failure_threshold

    async def check(self, worker: Worker) -> bool:
        """One probe; updates the worker's state and returns whether it answered 200."""
        try:
            response = await self.client.get(worker.url + "/health", timeout=self.timeout_s)
            ok = response.status_code == 200
            reason = f"/health answered {response.status_code}"
        except httpx.HTTPError as e:
            ok, reason = False, f"/health failed ({type(e).__name__})"
        if ok:
            worker.consecutive_failures = 0
            mark_up(worker)
        else:
            worker.consecutive_failures += 1
            if worker.consecutive_failures >= self.failure_threshold:
                mark_down(worker, reason)
        return ok

    async def check_all(self) -> None:
        workers = list(self.pool)
        if workers:
            await asyncio.gather(*(self.check(w) for w in workers))

    async def run(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:   # never let the canary die
                logger.exception("health check round failed")
            await asyncio.sleep(self.interval_s)
