"""Wire types between the frontend and the engine core (msgspec Structs, primitives only).

These cross the ZeroMQ sockets encoded with msgspec msgpack; never pickle. No torch.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from sluice.lora.request import LoRARequest
from sluice.sampling_params import SamplingParams


class FinishReason(enum.IntEnum):
    """Why a request stopped. `STOP`: EOS, a stop token or a stop string; `LENGTH`: max_tokens
    or max_model_len; `ABORT`: cancelled by the client or the server."""
    STOP = 0
    LENGTH = 1
    ABORT = 2

    def __str__(self) -> str:
        return self.name.lower()


class TokenLogprobs(msgspec.Struct, array_like=True, frozen=True):
    """Log-probabilities at one position.

    `token_ids[0]` is the token actually chosen (sampled, or the next prompt token for prompt
    logprobs) with rank `ranks[0]`; entries 1..k are the top-k alternatives, ranks 1..k.
    """
    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    """A tokenized request as the engine core receives it."""
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    arrival_time: float
    priority: int = 0
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None   # for a KV connector (disaggregation)
    lora_request: LoRARequest | None = None   # the adapter (None: the base model)


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one step produced for one request: new tokens, and a finish reason when done."""
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    # Prompt logprobs arrive once, in the output that carries the first sampled token;
    # entry i describes prompt token i+1.
    prompt_logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    # time.monotonic() when the engine first scheduled the request; set on the request's first
    # output only (0: not carried). With the frontend's arrival time it splits the latency
    # into queue / prefill / decode phases for metrics.
    scheduled_time: float = 0.0
    # A KV connector's parameters for the next engine (on a producer's finished output).
    kv_transfer_params: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(msgspec.Struct, omit_defaults=True):
    """A snapshot of the scheduler for logging and Prometheus."""
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0          # fraction of KV blocks in use, 0..1
    prefix_cache_queries: int = 0        # tokens looked up since the previous snapshot
    prefix_cache_hits: int = 0           # tokens found since the previous snapshot
    num_preemptions: int = 0             # since the previous snapshot
    num_prompt_tokens: int = 0           # prompt tokens computed this step (excl. cache hits)
    num_generation_tokens: int = 0       # tokens sampled this step
    engine_index: int = 0                # the data-parallel engine that took the snapshot
    kv_transfer_failures: int = 0        # KV loads that fell back to recompute, since previous
    kv_transfer_bytes: int = 0           # KV bytes loaded from remote engines, since previous
    kv_transfer_seconds: list[float] = msgspec.field(default_factory=list)  # per request load
    # with --enable-lora: adapter name -> requests running / waiting (vllm:lora_requests_info)
    running_lora_adapters: dict[str, int] = msgspec.field(default_factory=dict)
    waiting_lora_adapters: dict[str, int] = msgspec.field(default_factory=dict)
    # with --speculative-config, since the previous snapshot (vllm:spec_decode_*): requests
    # given drafts (summed over steps), drafts proposed, drafts accepted, and accepted drafts
    # per draft position
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    spec_decode_accepted_per_position: list[int] = msgspec.field(default_factory=list)


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True):
    """One step's outputs for all requests that produced something, from the data-parallel
    engine `engine_index` (0 without data parallelism)."""
    outputs: list[EngineCoreOutput] = msgspec.field(default_factory=list)
    scheduler_stats: SchedulerStats | None = None
    timestamp: float = 0.0
    engine_index: int = 0


class EngineReady(msgspec.Struct):
    """The engine core's startup handshake reply: the runtime facts the frontend needs."""
    num_kv_blocks: int
    block_size: int
    max_model_len: int
    vocab_size: int
    model_name: str
    eos_token_ids: list[int] = msgspec.field(default_factory=list)  # config + generation_config
    startup_seconds: dict[str, float] = msgspec.field(default_factory=dict)
