"""Bases of the API's models (a request validates its text, a response passes through), ids and
timestamps, OpenAI's error body and the response pieces both endpoints use.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

from sluice.frontend.tokenizer import check_text

logger = logging.getLogger(__name__)


def random_id() -> str:
    """A fresh random request id (hex)."""
    return uuid.uuid4().hex


def now_seconds() -> int:
    """The `created` timestamp of a response: Unix seconds."""
    return int(time.time())


class OpenAIBaseModel(BaseModel):
    """Base of request models: unknown fields are dropped and logged at debug level."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _log_unknown_fields(cls, data: Any) -> Any:
        if cls.model_config.get("extra") == "allow":
            return data  # kept, and refused by name (SamplingFields.check_supported)
        if isinstance(data, dict) and logger.isEnabledFor(logging.DEBUG):
            known = set(cls.model_fields)
            unknown = sorted(k for k in data if k not in known)
            if unknown:
                logger.debug("%s: ignoring unknown fields %s", cls.__name__, unknown)
        return data


def check_all_text(value: Any, param: str) -> None:
    """Raise `InvalidRequestError(param=param)` if any string in `value` (a parsed JSON value:
    dicts, lists, strings, numbers; keys included) is not valid Unicode. Iterative, so deep
    nesting cannot exhaust the stack."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            check_text(item, param)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


class RequestModel(OpenAIBaseModel):
    """Base of top-level request bodies: every field's raw value is checked for text that is not
    valid Unicode before it is parsed (a 400 naming the field, see `check_all_text`)."""

    @field_validator("*", mode="before")
    @classmethod
    def _valid_text(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, (int, float, bool)) and value is not None:
            check_all_text(value, info.field_name or "body")
        return value


class ResponseModel(BaseModel):
    """Base of response models (extra fields kept, nothing validated on the hot path)."""

    model_config = ConfigDict(extra="allow")


# Errors

class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(ResponseModel):
    """`{"error": {"message", "type", "param", "code"}}`, OpenAI's error body."""
    error: ErrorInfo


# Response pieces both endpoints use

class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


PromptLogprobs = list[dict[str, dict[str, Any]] | None]
"""vLLM's `prompt_logprobs`: None for the first prompt token, then per prompt token
{str(token_id): {"logprob", "rank", "decoded_token"}} (the token itself and the top k)."""
