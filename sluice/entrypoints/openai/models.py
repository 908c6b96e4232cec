"""GET /v1/models: the served model, one card per name it answers to (--served-model-name;
the first is the one responses report), then one card per LoRA adapter (vLLM's shape: `root`
the adapter's path, `parent` its `base_model_name` or else the served model's name)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from sluice.entrypoints.openai.protocol import ModelCard, ModelList
from sluice.entrypoints.openai.serving import get_state

router = APIRouter()


@router.get("/v1/models")
async def list_models(raw_request: Request) -> dict[str, Any]:
    state = get_state(raw_request)
    cards = [ModelCard(id=name, root=state.config.model.model,
                       max_model_len=state.max_model_len)
             for name in state.served_model_names]
    for adapter in state.lora or ():
        cards.append(ModelCard(id=adapter.lora_name, root=adapter.lora_path,
                               parent=adapter.base_model_name or state.model_name,
                               max_model_len=state.max_model_len))
    return ModelList(data=cards).model_dump()
