"""POST /v1/completions: the request, the response and its stream chunks.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Mapping

from pydantic import Field

from sluice.entrypoints.openai.protocol.base import (PromptLogprobs, ResponseModel, UsageInfo,
                                                     now_seconds)
from sluice.entrypoints.openai.protocol.sampling import SamplingFields, default_max_tokens
from sluice.sampling_params import SamplingParams


# /v1/completions

Prompt = str | list[int]


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    ENDPOINT: ClassVar[str] = "/v1/completions"

    prompt: list[int] | list[list[int]] | str | list[str]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False
    suffix: str | None = None
    add_special_tokens: bool = True

    def prompts(self) -> list[Prompt]:
        """The prompts of this request: one text or token-id list each (a batch may hold many).
        An empty list is kept as one empty prompt, which the engine rejects with a 400."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return [[]]
        if isinstance(p[0], (str, list)):
            return list(p)  # type: ignore[arg-type]
        return [p]  # type: ignore[list-item]

    def to_sampling_params(self, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """Validated SamplingParams (raises InvalidRequestError naming the field); `defaults`
        are the model's (see `_sampling_kwargs`)."""
        self._check_common()
        defaults = defaults or {}
        kwargs = self._sampling_kwargs(defaults)
        kwargs["max_tokens"] = default_max_tokens(
            self.max_tokens if "max_tokens" in self.model_fields_set else None,
            16 if "max_tokens" not in self.model_fields_set else None, defaults)
        if self.logprobs is not None:
            kwargs["logprobs"] = self.logprobs
            if self.echo:  # echoed prompt tokens carry logprobs too
                kwargs["prompt_logprobs"] = max(self.prompt_logprobs or 0, self.logprobs)
        return SamplingParams(**kwargs)


class CompletionLogprobs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now_seconds)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionStreamResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now_seconds)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
