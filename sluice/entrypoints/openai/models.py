"""GET /v1/models: the served model, one card per name it answers to (--served-model-name;
the first is the one responses report)."""

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
    return ModelList(data=cards).model_dump()
