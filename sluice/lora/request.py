"""LoRARequest: which adapter a request runs with, as in vLLM (`from sluice.lora.request import
LoRARequest`). No torch.

`lora_int_id` (>= 1) identifies the adapter everywhere after the frontend: the scheduler's
per-step adapter count (`--max-loras`), the prefix-cache block keys (blocks computed under one
adapter are never reused by another or by the base model) and the workers' adapter slots.
`lora_name` is what OpenAI clients send as `model`; `lora_path` a PEFT directory
(`adapter_config.json` + `adapter_model.safetensors`).
"""

from __future__ import annotations

import msgspec


class LoRARequest(msgspec.Struct, frozen=True, omit_defaults=True):
    """An adapter: `LoRARequest(lora_name, lora_int_id, lora_path)`, vLLM's positional order.
    `base_model_name` is the model the adapter was trained for (shown as its parent)."""
    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be >= 1, got {self.lora_int_id}")

    @property
    def adapter_id(self) -> int:
        """vLLM's alias of `lora_int_id`."""
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path
