"""GET /v1/models: the one served model."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from sluice.entrypoints.openai.protocol import ModelCard, ModelList
from sluice.entrypoints.openai.serving import get_state

router = APIRouter()


@router.get("/v1/models")
async def list_models(raw_request: Request) -> dict[str, Any]:
    state = get_state(raw_request)
    card = ModelCard(id=state.model_name, root=state.config.model.model,
                     max_model_len=state.max_model_len)
    return ModelList(data=[card]).model_dump()
