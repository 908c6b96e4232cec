"""The step contract between the scheduler (engine core) and the workers. No torch.

A `SchedulerOutput` sends each request in full once (`NewRequestData`), then only diffs
(`CachedRequestData`: newly allocated block ids and the computed-token count). Workers keep
their own per-request state and append the tokens they sample themselves.

Index arithmetic for one request in one step::

    token index:  0 ........ num_computed_tokens ........ num_computed_tokens + num_scheduled
                  |-- in KV cache --|------- computed this step -------|
    The worker samples a token only when num_computed_tokens + num_scheduled == len(token_ids),
    i.e. the step reaches the last known token (a partial prefill chunk samples nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sluice.messages import TokenLogprobs
from sluice.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the worker has not seen (or must forget and re-learn after preemption).

    `token_ids` = prompt + any tokens generated before a preemption; `block_ids` covers at least
    num_computed_tokens + num_scheduled tokens.
    """
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    eos_token_id: int | None = None


@dataclass
class CachedRequestData:
    """A request the worker already holds: blocks appended since last step and the count of
    tokens already in the KV cache (the worker's own sampled tokens are already in its copy)."""
    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    """Everything a worker needs for one step.

    `num_scheduled_tokens[request_id]` is how many tokens of that request run this step; the
    batch order is new requests first, then cached ones, each in list order.
    `finished_request_ids` (finished, aborted or preempted since the previous step) are dropped
    from the worker's state before this step runs.
    """
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    finished_request_ids: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class ModelRunnerOutput:
    """What rank 0 returns for one step.

    `sampled_token_ids[request_id]` is a list (empty for a partial prefill chunk; one token in
    plain decoding; several with speculative decoding). `logprobs[request_id]` has one entry per
    sampled token when the request asked for logprobs. `prompt_logprobs[request_id]` holds the
    entries for the prompt tokens computed this step (entry for token i+1 at position i).
    """
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
