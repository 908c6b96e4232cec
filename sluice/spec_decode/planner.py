"""The engine side of speculative decoding: which requests get draft tokens this step, how
many, and the counters of what was accepted. Torch-free; the scheduler calls it.

Contract with the scheduler (`core.sched.scheduler`):

* `drafts_enabled(num_running)` once per step: False when the running batch holds at least
  `disable_by_batch_size` requests (a large batch is compute-bound, so verifying proposals
  costs more than the weight reads it saves) — then nobody speculates this step.
* `propose(request)` for a running request that has caught up (its only uncomputed token is
  the last sampled one): at most `limit(request)` draft tokens, each to be verified by this
  step's forward. The limit keeps the step inside max_model_len (positions of the drafts are
  num_tokens .. num_tokens + d - 1, so num_tokens + d <= max_model_len) and inside
  max_tokens (a step emits at most d + 1 tokens; d <= max_tokens - num_output - 1).
* `record(num_draft, num_emitted)` after the step: the worker emitted `num_emitted` tokens,
  i.e. accepted num_emitted - 1 drafts (the last one is the target's own token).

Where drafts come from (`method`):

* ngram: proposed here, over the request's tokens (`spec_decode.ngram`).
* draft_model: proposed by the worker's draft model after it sampled (`spec_decode.draft_model`)
  and handed back in `ModelRunnerOutput.draft_token_ids`; `take_worker_drafts` keeps them on
  the request with the token count they continue, and `propose` hands them out in the next
  step (only if the request has not changed since: a stop, preemption or a draft from an older
  state is never used). The worker writes its draft KV up to k positions past the step's own
  tokens, so every scheduled request gets `extra_lookahead` = k more KV slots while
  speculation is on, and the scheduler tells the worker to propose (`propose_drafts`).

A request with structured output never gets drafts (its grammar bitmask is computed for one
position per step): speculation steps aside for it.

The n-gram proposer reads the request's tokens as a numpy array; appending to a per-request
buffer (`Request.draft_state`) keeps that O(new tokens) per step instead of O(length).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sluice.core.request import Request
from sluice.config import EngineConfig
from sluice.spec_decode.config import SpeculativeConfig, parse_speculative_config
from sluice.spec_decode.ngram import NgramProposer


MAX_BACKOFF_STEPS = 8   # n-gram: most steps a request skips proposing after a full rejection


@dataclass
class SpecDecodeCounters:
    """Counts since the previous `take_counters` (vLLM's spec-decode metrics)."""
    num_drafts: int = 0            # requests that were given drafts, summed over steps
    num_draft_tokens: int = 0      # draft tokens proposed
    num_accepted_tokens: int = 0   # of which accepted
    # accepted_per_position[j]: drafts at position j (0-based) that were accepted
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def num_emitted_tokens(self) -> int:
        """Tokens the speculative steps emitted: accepted drafts plus one token per draft."""
        return self.num_accepted_tokens + self.num_drafts


class _TokenBuffer:
    """A request's tokens as a growing int64 array (amortised O(1) append), and its n-gram
    backoff: after a verification that accepted no draft, the request skips proposing for
    `backoff` steps (1, 2, 4, ... up to MAX_BACKOFF_STEPS; reset by any acceptance), since a
    step whose drafts are all rejected costs a verification forward for one token."""

    __slots__ = ("array", "length", "skip", "backoff")

    def __init__(self) -> None:
        self.array = np.empty(256, dtype=np.int64)
        self.length = 0
        self.skip = 0
        self.backoff = 0

    def after_verification(self, accepted: int) -> None:
        if accepted:
            self.backoff = 0
        else:
            self.backoff = min(2 * self.backoff or 1, MAX_BACKOFF_STEPS)
            self.skip = self.backoff

    def sync(self, token_ids: list[int]) -> np.ndarray:
        """The buffer brought up to `token_ids` (only ever appended to); a view."""
        n = len(token_ids)
        if n > len(self.array):
            grown = np.empty(max(n, 2 * len(self.array)), dtype=np.int64)
            grown[:self.length] = self.array[:self.length]
            self.array = grown
        if n > self.length:
            self.array[self.length:n] = token_ids[self.length:n]
            self.length = n
        return self.array[:n]


@dataclass
class _WorkerDrafts:
    """Drafts the worker proposed for a request when it held `num_tokens` tokens."""
    num_tokens: int
    token_ids: list[int]


class SpeculationPlanner:
    """See the module docstring. Built by the engine core from `--speculative-config`."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.num_speculative_tokens = config.num_speculative_tokens
        self.disable_by_batch_size = config.disable_by_batch_size
        self.max_model_len = max_model_len
        self.uses_draft_model = config.method == "draft_model"
        self.proposer = (None if self.uses_draft_model else
                         NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min,
                                       config.prompt_lookup_max))
        # KV slots beyond a request's own positions and drafts: where the worker's draft
        # model writes while proposing (draft_model only)
        self.extra_lookahead = config.num_speculative_tokens if self.uses_draft_model else 0
        self.counters = SpecDecodeCounters(
            accepted_per_position=[0] * config.num_speculative_tokens)
        # the same counts since the engine started (never reset; benchmarks read them)
        self.totals = SpecDecodeCounters(
            accepted_per_position=[0] * config.num_speculative_tokens)

    def drafts_enabled(self, num_running: int) -> bool:
        limit = self.disable_by_batch_size
        return limit is None or num_running < limit

    def limit(self, request: Request) -> int:
        """The most drafts `request` may take this step (see the module docstring)."""
        params = request.sampling_params
        if params.structured_outputs is not None:
            return 0
        room = self.max_model_len - request.num_tokens
        if params.max_tokens is not None:
            room = min(room, params.max_tokens - request.num_output_tokens - 1)
        return max(0, min(self.num_speculative_tokens, room))

    def propose(self, request: Request) -> list[int]:
        """Draft tokens for `request`'s next positions (possibly none)."""
        limit = self.limit(request)
        if limit <= 0:
            return []
        if self.uses_draft_model:
            drafts = request.draft_state
            if isinstance(drafts, _WorkerDrafts) and drafts.num_tokens == request.num_tokens:
                return drafts.token_ids[:limit]
            return []
        buffer = request.draft_state
        if buffer is None:
            buffer = request.draft_state = _TokenBuffer()
        if buffer.skip:
            buffer.skip -= 1
            return []
        return self.proposer.propose(buffer.sync(request.all_token_ids), limit)

    def take_worker_drafts(self, request: Request, token_ids: list[int]) -> None:
        """The worker's draft model proposed `token_ids` after `request`'s latest tokens."""
        request.draft_state = _WorkerDrafts(request.num_tokens, token_ids)

    def record(self, request: Request, num_draft: int, num_emitted: int) -> None:
        """One verified step of `request`: `num_draft` drafts, `num_emitted` tokens emitted
        (1..num_draft + 1)."""
        accepted = num_emitted - 1
        if isinstance(request.draft_state, _TokenBuffer):
            request.draft_state.after_verification(accepted)
        for c in (self.counters, self.totals):
            c.num_drafts += 1
            c.num_draft_tokens += num_draft
            c.num_accepted_tokens += accepted
            for j in range(accepted):
                c.accepted_per_position[j] += 1

    def take_counters(self) -> SpecDecodeCounters:
        """The counters since the previous call (and reset them)."""
        counters, self.counters = self.counters, SpecDecodeCounters(
            accepted_per_position=[0] * self.num_speculative_tokens)
        return counters


def make_speculation_planner(config: EngineConfig, max_model_len: int
                             ) -> SpeculationPlanner | None:
    """The planner for `--speculative-config` (validated at config time), None when unset."""
    spec = parse_speculative_config(config.scheduler.speculative_config)
    return None if spec is None else SpeculationPlanner(spec, max_model_len)
