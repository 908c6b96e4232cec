"""The step contract between the scheduler (engine core) and the workers. No torch.

A `SchedulerOutput` sends each request in full once (`NewRequestData`), then only diffs
(`CachedRequestData`: newly allocated block ids and the computed-token count). Workers keep
their own per-request state and append the tokens they sample themselves.

Pipeline parallelism: only the last stage samples (its driver, tp rank 0, which returns the
step's `ModelRunnerOutput`; its TP peers get the tokens by broadcast), so the earlier stages
learn the sampled tokens from the engine core, as in vLLM v1: with pp > 1 each
`CachedRequestData.new_token_ids` carries the request's tokens that this step computes and
that were sampled (`all_token_ids[max(num_computed, num_prompt) : num_computed +
num_scheduled]`), and a worker appends the ones its copy lacks. The core only has them after
`update_from_output` of the step that sampled them; that is guaranteed because the scheduler
never schedules a request whose previous step is still in the pipeline (`Scheduler.in_flight`).

Index arithmetic for one request in one step::

    token index:  0 ........ num_computed_tokens ........ num_computed_tokens + num_scheduled
                  |-- in KV cache --|------- computed this step -------|
    The worker samples a token only when num_computed_tokens + num_scheduled == len(token_ids),
    i.e. the step reaches the last known token (a partial prefill chunk samples nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sluice.kv_transfer.metadata import KVConnectorMetadata, KVConnectorOutput
from sluice.lora.request import LoRARequest
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
    lora_request: LoRARequest | None = None   # the adapter the request runs with (None: base)


@dataclass
class CachedRequestData:
    """A request the worker already holds: blocks appended since last step and the count of
    tokens already in the KV cache (the worker's own sampled tokens are already in its copy).

    `new_token_ids` (pipeline parallelism only; empty otherwise): the sampled tokens among those
    this step computes, i.e. the last `len(new_token_ids)` of the request's first
    num_computed_tokens + num_scheduled tokens; stages that do not sample append the ones
    they lack (see the module docstring)."""
    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int
    new_token_ids: list[int] = field(default_factory=list)


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
    # Speculative decoding: request id -> the draft tokens this step verifies (`spec_decode`).
    # Such a request's num_scheduled_tokens = 1 + len(drafts): its last sampled token, then
    # the drafts at the next positions; the worker samples at all 1 + len(drafts) positions
    # and emits the accepted drafts plus one token of its own (`sample.rejection`).
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    # Speculative decoding with a draft model: the worker's drafter proposes the next drafts
    # of this step's sampling rows (their KV lookahead slots are allocated).
    propose_drafts: bool = False
    # A KV connector's instructions for this step (`sluice.kv_transfer`); None without one.
    kv_connector_metadata: KVConnectorMetadata | None = None

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class ModelRunnerOutput:
    """What the output rank (the driver of the last pipeline stage; rank 0 without pipeline
    parallelism) returns for one step.

    `sampled_token_ids[request_id]` is a list (empty for a partial prefill chunk; one token in
    plain decoding; several with speculative decoding). `logprobs[request_id]` has one entry per
    sampled token when the request asked for logprobs. `prompt_logprobs[request_id]` holds the
    entries for the prompt tokens computed this step (entry for token i+1 at position i).
    """
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # Speculative decoding with a draft model: request id -> the drafts proposed after its
    # tokens of this step (`spec_decode.draft_model`), for the scheduler's next step.
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # What a KV connector's worker half finished this step (None without a connector).
    kv_connector_output: KVConnectorOutput | None = None
