"""The worker's own copy of each running request (it appends the tokens it samples)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sluice.lora.request import LoRARequest
from sluice.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    """Per-request state kept across steps by the model runner.

    `token_ids` = prompt + generated tokens known to this worker; `num_computed_tokens` counts
    those already written to the KV cache; `block_ids` are the request's KV blocks in order.
    """
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None
    eos_token_id: int | None
    lora_request: LoRARequest | None = None   # the adapter it runs with (None: base model)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]
