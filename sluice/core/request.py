"""`Request`: the engine core's private, mutable state of one request. Never leaves the process.

Token bookkeeping (`num_computed_tokens` chases `num_tokens`)::

    all_token_ids: [ prompt ............ | outputs ..... ]
                   0        num_prompt_tokens        num_tokens
                   |<-- in KV cache -->|
                   0           num_computed_tokens

`block_hashes[i]` is the chained hash of full block i of `all_token_ids`; it grows as outputs
fill blocks (`append_output_token_ids`). A request without a block hasher has none.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from sluice.lora.request import LoRARequest
from sluice.messages import EngineCoreRequest, FinishReason, TokenLogprobs
from sluice.sampling_params import SamplingParams

if TYPE_CHECKING:
    from sluice.core.kv_cache.hashing import BlockHash, BlockHasher


class RequestStatus(enum.IntEnum):
    """Lifecycle: WAITING → RUNNING ⇄ PREEMPTED → FINISHED_* (any state may be aborted).
    With a KV connector: WAITING → WAITING_FOR_REMOTE_KV (holding its blocks while they are
    loaded; neither scheduled nor freed) → WAITING → RUNNING ... (`core.sched.hooks`)."""
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5
    WAITING_FOR_REMOTE_KV = -1   # below WAITING so that `is_finished` stays a comparison

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH_CAPPED: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


class Request:
    """One request inside the engine core.

    `all_token_ids` is a single list that outputs are appended to (never rebuilt);
    `prompt_token_ids` and `output_token_ids` are separate lists kept in step with it.
    `num_cached_tokens` is the prefix-cache hit of the first schedule (-1 until scheduled).
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int],
                 sampling_params: SamplingParams, eos_token_id: int | None,
                 arrival_time: float, priority: int = 0, cache_salt: str | None = None,
                 block_hasher: "BlockHasher | None" = None,
                 kv_transfer_params: dict | None = None,
                 lora_request: LoRARequest | None = None):
        assert prompt_token_ids, "a request needs at least one prompt token"
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = arrival_time
        self.priority = priority
        self.cache_salt = cache_salt
        self.kv_transfer_params = kv_transfer_params   # for a KV connector (`sluice.kv_transfer`)
        self.lora_request = lora_request   # the adapter (None: the base model)

        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1
        self.num_preemptions = 0
        self.scheduled_time = 0.0   # time.monotonic() when first scheduled (0.0: not yet)
        # Prompt logprobs arrive per prefill chunk; they are held here until the output that
        # carries the first sampled token (see `messages.EngineCoreOutput`).
        self.pending_prompt_logprobs: list[TokenLogprobs] = []
        # Speculative decoding: the draft proposer's own state for this request
        # (`sluice.spec_decode.planner`); None until it first proposes.
        self.draft_state: object | None = None

        self.block_hashes: list[BlockHash] = []
        self.block_hasher: BlockHasher | None = None
        if block_hasher is not None:
            self.set_block_hasher(block_hasher)

    @classmethod
    def from_engine_core_request(cls, request: EngineCoreRequest,
                                 block_hasher: "BlockHasher | None" = None) -> "Request":
        return cls(request.request_id, request.prompt_token_ids, request.sampling_params,
                   request.eos_token_id, request.arrival_time, request.priority,
                   request.cache_salt, block_hasher, request.kv_transfer_params,
                   request.lora_request)

    def set_block_hasher(self, block_hasher: "BlockHasher") -> None:
        """Attach a hasher and hash every block that is already full."""
        self.block_hasher = block_hasher
        self.block_hashes.extend(block_hasher(self))

    # ---- counts ------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def lora_int_id(self) -> int:
        """The adapter's id (`LoRARequest.lora_int_id`, >= 1), or 0 for the base model."""
        return self.lora_request.lora_int_id if self.lora_request is not None else 0

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def max_tokens(self) -> int | None:
        return self.sampling_params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.status.finish_reason

    # ---- mutation ----------------------------------------------------------------------
    def append_output_token_ids(self, token_ids: int | list[int]) -> None:
        """Append sampled tokens and hash any blocks they complete."""
        if isinstance(token_ids, int):
            self.output_token_ids.append(token_ids)
            self.all_token_ids.append(token_ids)
        else:
            self.output_token_ids.extend(token_ids)
            self.all_token_ids.extend(token_ids)
        if self.block_hasher is not None:
            self.block_hashes.extend(self.block_hasher(self))

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, "
                f"tokens={self.num_computed_tokens}/{self.num_tokens}, "
                f"prompt={self.num_prompt_tokens})")
