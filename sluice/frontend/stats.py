"""Per-request timing facts the frontend collects for the stats logger / Prometheus. No torch.

All times are `time.monotonic()` seconds (CLOCK_MONOTONIC: one clock for the frontend and the
engine-core process, so the engine's `scheduled_time` compares with the frontend's times). The
`OutputProcessor` (when built with `log_stats=True`) accumulates a `FrontendStats` and hands it
over with `take_stats()`; a metrics component turns `ttfts` / `itls` / `finished_requests` into
TTFT, inter-token latency, E2E and phase (queue / prefill / decode) histograms and token
counters.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FinishedRequestStats:
    """The life of one engine request (one sample of an n>1 request) that has ended."""
    request_id: str
    finish_reason: str                 # "stop" | "length" | "abort"
    arrival_time: float
    finished_time: float
    first_token_time: float | None     # None when it ended before producing a token
    last_token_time: float | None
    num_prompt_tokens: int
    num_generation_tokens: int
    num_cached_tokens: int = 0
    scheduled_time: float | None = None  # first scheduled by the engine (None: never was)
    max_tokens: int | None = None        # the request's max_tokens parameter

    @property
    def e2e_latency(self) -> float:
        return self.finished_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        """From arrival until the engine first scheduled it (WAITING)."""
        if self.scheduled_time is None:
            return None
        return max(0.0, self.scheduled_time - self.arrival_time)

    @property
    def prefill_time(self) -> float | None:
        """From first scheduled to the first token (PREFILL)."""
        if self.scheduled_time is None or self.first_token_time is None:
            return None
        return max(0.0, self.first_token_time - self.scheduled_time)

    @property
    def inference_time(self) -> float | None:
        """From first scheduled to the last token (RUNNING: prefill + decode)."""
        if self.scheduled_time is None or self.last_token_time is None:
            return None
        return max(0.0, self.last_token_time - self.scheduled_time)

    @property
    def ttft(self) -> float | None:
        """Time to first token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def decode_time(self) -> float:
        """From the first to the last token."""
        if self.first_token_time is None or self.last_token_time is None:
            return 0.0
        return self.last_token_time - self.first_token_time

    @property
    def mean_time_per_output_token(self) -> float | None:
        if self.num_generation_tokens < 2:
            return None
        return self.decode_time / (self.num_generation_tokens - 1)


@dataclass
class FrontendStats:
    """What happened since the previous `OutputProcessor.take_stats()`.

    `ttfts`: one entry per request that produced its first token; `itls`: one entry per later
    engine output of a request (time since that request's previous output), as vLLM records
    inter-token latency per iteration.
    """
    ttfts: list[float] = field(default_factory=list)
    itls: list[float] = field(default_factory=list)
    num_prompt_tokens: int = 0          # prompts of the requests that got their first token
    num_generation_tokens: int = 0      # tokens received from the engine
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)
    n_params: list[int] = field(default_factory=list)  # `n` of each user request added
    # per finished user request: the most tokens one of its samples generated
    max_num_generation_tokens: list[int] = field(default_factory=list)
    engine_index: int = 0               # the data-parallel engine whose outputs these are
