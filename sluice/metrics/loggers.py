"""A periodic statistics log line, as vLLM's `LoggingStatLogger`:

    Engine: Avg prompt throughput: 120.3 tokens/s, Avg generation throughput: 45.1 tokens/s,
    Running: 3 reqs, Waiting: 0 reqs, KV cache usage: 12.5%, Prefix cache hit rate: 40.0%

`record` is an engine stats listener (it only accumulates); `log` is called every
`interval_s` (by `run_periodically`) and writes one line when there was activity since the
previous line, or when the previous line showed activity (so the last line shows idle).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from sluice.frontend.stats import FrontendStats
from sluice.messages import SchedulerStats

logger = logging.getLogger("sluice.stats")

DEFAULT_INTERVAL_S = 10.0


class LoggingStatLogger:
    """Accumulates token counts and the latest scheduler snapshot; logs one line per call to
    `log()` when anything happened."""

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S,
                 log: logging.Logger | None = None):
        self.interval_s = interval_s
        self._log = log or logger
        self._lock = threading.Lock()
        self._last_time = time.monotonic()
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._queries = 0
        self._hits = 0
        self._running = 0
        self._waiting = 0
        self._kv_usage = 0.0
        self._was_active = False

    def record(self, scheduler_stats: SchedulerStats | None,
               frontend_stats: FrontendStats) -> None:
        """Engine stats listener: accumulate one report."""
        with self._lock:
            self._prompt_tokens += frontend_stats.num_prompt_tokens
            self._generation_tokens += frontend_stats.num_generation_tokens
            if scheduler_stats is not None:
                self._running = scheduler_stats.num_running_reqs
                self._waiting = scheduler_stats.num_waiting_reqs
                self._kv_usage = scheduler_stats.kv_cache_usage
                self._queries += scheduler_stats.prefix_cache_queries
                self._hits += scheduler_stats.prefix_cache_hits

    def log(self, now: float | None = None) -> str | None:
        """Write (and return) the line for the period since the previous call, or None when
        the engine stayed idle."""
        now = time.monotonic() if now is None else now
        with self._lock:
            elapsed = max(now - self._last_time, 1e-9)
            active = bool(self._prompt_tokens or self._generation_tokens or self._running
                          or self._waiting)
            if not active and not self._was_active:
                self._last_time = now
                return None
            hit_rate = self._hits / self._queries if self._queries else 0.0
            line = (f"Engine: Avg prompt throughput: {self._prompt_tokens / elapsed:.1f} "
                    f"tokens/s, Avg generation throughput: "
                    f"{self._generation_tokens / elapsed:.1f} tokens/s, Running: "
                    f"{self._running} reqs, Waiting: {self._waiting} reqs, KV cache usage: "
                    f"{self._kv_usage * 100:.1f}%, Prefix cache hit rate: {hit_rate * 100:.1f}%")
            self._prompt_tokens = self._generation_tokens = self._queries = self._hits = 0
            self._last_time = now
            self._was_active = active
        self._log.info(line)
        return line

    async def run_periodically(self) -> None:
        """Call `log()` every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            self.log()
