"""Architecture name (HF `architectures[0]`) -> our model class, imported lazily."""

from __future__ import annotations

import importlib

from torch import nn

from sluice.errors import ModelLoadError

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("sluice.model.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("sluice.model.models.mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("sluice.model.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("sluice.model.models.qwen3", "Qwen3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return list(_MODELS)


def get_model_class(architecture: str) -> type[nn.Module]:
    """The class implementing `architecture`; ModelLoadError if there is none."""
    if architecture not in _MODELS:
        raise ModelLoadError(f"architecture '{architecture}' is not supported; supported: "
                             f"{', '.join(_MODELS)}.")
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(module), name)
