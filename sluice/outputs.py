"""What the user gets back: `RequestOutput` with one `CompletionOutput` per sample. No torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class Logprob:
    """Log-probability of one token at one position; `rank` is 1 for the most likely token."""
    logprob: float
    rank: int
    decoded_token: str | None = None


# One position: token id -> Logprob, holding the chosen token plus the top-k alternatives.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One of the `n` samples of a request.

    `text`/`token_ids` are cumulative or deltas depending on `SamplingParams.output_kind`.
    `stop_reason` is the matched stop string or stop token id, or None for EOS / length.
    """
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timestamps (time.monotonic seconds) of one request's life."""
    arrival_time: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0


@dataclass
class RequestOutput:
    """The state of one request as seen by the user.

    `prompt_logprobs[0]` is None (the first prompt token has no context).
    """
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    extra: dict = field(default_factory=dict)
    # A KV connector's parameters for the next engine (a prefill's finished output; vLLM's
    # `RequestOutput.kv_transfer_params`), else None.
    kv_transfer_params: dict | None = None
