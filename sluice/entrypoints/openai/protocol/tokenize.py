"""/tokenize, /detokenize and /v1/models bodies.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from sluice.entrypoints.openai.protocol.base import RequestModel, ResponseModel, now_seconds
from sluice.entrypoints.openai.protocol.chat import ChatMessageParam
from sluice.frontend.chat_template import template_kwargs


# /tokenize, /detokenize, /v1/models

class TokenizeCompletionRequest(RequestModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(RequestModel):
    model: str | None = None
    messages: list[ChatMessageParam]
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def template_kwargs(self) -> dict[str, Any]:
        """As `ChatCompletionRequest.template_kwargs` (no tools)."""
        return template_kwargs(self.add_generation_prompt, self.chat_template,
                               self.chat_template_kwargs)


class TokenizeResponse(ResponseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(ResponseModel):
    prompt: str


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now_seconds)
    owned_by: str = "sluice"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)
