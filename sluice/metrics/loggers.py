"""A periodic statistics log line per engine, as vLLM's `LoggingStatLogger`:

    Engine 000: Avg prompt throughput: 120.3 tokens/s, Avg generation throughput: 45.1 tokens/s,
    Running: 3 reqs, Waiting: 0 reqs, KV cache usage: 12.5%, Prefix cache hit rate: 40.0%

`record` is an engine stats listener (it only accumulates, per `FrontendStats.engine_index`);
`log` is called every `interval_s` (by `run_periodically`) and writes one line for each engine
that was active since the previous call, or whose previous line showed activity (so the last
line shows idle).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from sluice.frontend.stats import FrontendStats
from sluice.messages import SchedulerStats

logger = logging.getLogger("sluice.stats")

DEFAULT_INTERVAL_S = 10.0


@dataclass
class _EngineTotals:
    """What one engine did since the previous line, and its latest scheduler snapshot."""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    queries: int = 0
    hits: int = 0
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    was_active: bool = False
    # speculative decoding (--speculative-config): drafts, draft tokens, accepted tokens,
    # accepted drafts per position
    spec_drafts: int = 0
    spec_draft_tokens: int = 0
    spec_accepted: int = 0
    spec_accepted_per_position: list[int] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.prompt_tokens or self.generation_tokens or self.running
                    or self.waiting)

    def line(self, engine_index: int, elapsed: float) -> str:
        hit_rate = self.hits / self.queries if self.queries else 0.0
        return (f"Engine {engine_index:03d}: Avg prompt throughput: "
                f"{self.prompt_tokens / elapsed:.1f} tokens/s, Avg generation throughput: "
                f"{self.generation_tokens / elapsed:.1f} tokens/s, Running: {self.running} "
                f"reqs, Waiting: {self.waiting} reqs, KV cache usage: "
                f"{self.kv_usage * 100:.1f}%, Prefix cache hit rate: {hit_rate * 100:.1f}%"
                + self._spec_decode_part())

    def _spec_decode_part(self) -> str:
        """vLLM's spec-decode figures: mean acceptance length (tokens emitted per verified
        step, 1 + accepted drafts / drafts), draft acceptance rate, per-position rates."""
        if not self.spec_drafts:
            return ""
        per_position = ", ".join(f"{n / self.spec_drafts:.3f}"
                                 for n in self.spec_accepted_per_position)
        rate = self.spec_accepted / self.spec_draft_tokens if self.spec_draft_tokens else 0.0
        return (f", SpecDecoding: Mean acceptance length: "
                f"{1 + self.spec_accepted / self.spec_drafts:.2f}, Drafted tokens: "
                f"{self.spec_draft_tokens}, Accepted tokens: {self.spec_accepted}, Draft "
                f"acceptance rate: {rate * 100:.1f}%, Per-position acceptance rate: "
                f"{per_position}")


class LoggingStatLogger:
    """Accumulates token counts and the latest scheduler snapshot of each engine; logs one
    line per engine per call to `log()` when anything happened there."""

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S,
                 log: logging.Logger | None = None):
        self.interval_s = interval_s
        self._log = log or logger
        self._lock = threading.Lock()
        self._last_time = time.monotonic()
        self._engines: dict[int, _EngineTotals] = {}

    def record(self, scheduler_stats: SchedulerStats | None,
               frontend_stats: FrontendStats) -> None:
        """Engine stats listener: accumulate one report."""
        with self._lock:
            totals = self._engines.setdefault(frontend_stats.engine_index, _EngineTotals())
            totals.prompt_tokens += frontend_stats.num_prompt_tokens
            totals.generation_tokens += frontend_stats.num_generation_tokens
            if scheduler_stats is not None:
                totals.running = scheduler_stats.num_running_reqs
                totals.waiting = scheduler_stats.num_waiting_reqs
                totals.kv_usage = scheduler_stats.kv_cache_usage
                totals.queries += scheduler_stats.prefix_cache_queries
                totals.hits += scheduler_stats.prefix_cache_hits
                if scheduler_stats.spec_decode_num_drafts:
                    totals.spec_drafts += scheduler_stats.spec_decode_num_drafts
                    totals.spec_draft_tokens += scheduler_stats.spec_decode_num_draft_tokens
                    totals.spec_accepted += scheduler_stats.spec_decode_num_accepted_tokens
                    per_position = scheduler_stats.spec_decode_accepted_per_position
                    mine = totals.spec_accepted_per_position
                    mine.extend([0] * (len(per_position) - len(mine)))
                    for j, n in enumerate(per_position):
                        mine[j] += n

    def log(self, now: float | None = None) -> str | None:
        """Write (and return, one per line) the lines for the period since the previous call,
        or None when every engine stayed idle."""
        now = time.monotonic() if now is None else now
        lines: list[str] = []
        with self._lock:
            elapsed = max(now - self._last_time, 1e-9)
            for index in sorted(self._engines):
                totals = self._engines[index]
                active = totals.active
                if active or totals.was_active:
                    lines.append(totals.line(index, elapsed))
                self._engines[index] = _EngineTotals(
                    running=totals.running, waiting=totals.waiting, kv_usage=totals.kv_usage,
                    was_active=active)
            self._last_time = now
        for line in lines:
            self._log.info(line)
        return "\n".join(lines) or None

    async def run_periodically(self) -> None:
        """Call `log()` every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            self.log()
