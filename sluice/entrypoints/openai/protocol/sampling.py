"""The request fields completions and chat share (`SamplingFields`: sampling, stop, logprobs,
streaming, structured output, vLLM's extras) and the `max_tokens` default.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field

from sluice.entrypoints.openai.protocol.base import OpenAIBaseModel, RequestModel
from sluice.entrypoints.openai.structured import (StructuredOutputFields,
                                                  structured_outputs_params)
from sluice.entrypoints.openai.unsupported import check_fields
from sluice.errors import InvalidRequestError
from sluice.sampling_params import RequestOutputKind


# Shared request pieces

class JsonSchemaFormat(OpenAIBaseModel):
    name: str
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(BaseModel):
    """`include_usage`: a last chunk carries the usage; `continuous_usage_stats` (vLLM): every
    chunk carries the usage so far (it implies `include_usage` when that is unset, as vLLM's
    default does). Unknown keys are a 400."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None
    include_obfuscation: bool | None = None  # refused when true (see unsupported.REFUSED)


_SAFE_REQUEST_ID = r"^[A-Za-z0-9._:\-]{1,128}$"


class SamplingFields(RequestModel, StructuredOutputFields):
    """Fields shared by completion and chat requests (OpenAI's and vLLM's extras). Fields no
    model defines are kept (`model_extra`) so that `check_supported` can refuse them by name."""

    model_config = ConfigDict(extra="allow")
    ENDPOINT: ClassVar[str] = "this endpoint"

    model: str | None = None
    n: int = 1
    best_of: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    # Accepted, with nothing to do: end-user identifiers (OpenAI uses them against abuse) and
    # a prompt-cache routing hint (sluice's prefix cache needs none).
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    priority: int = 0
    prompt_logprobs: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    response_format: ResponseFormat | None = None  # structured output (structured.py)
    return_tokens_as_token_ids: bool | None = None
    request_id: str | None = Field(default=None, pattern=_SAFE_REQUEST_ID)
    cache_salt: str | None = Field(default=None, min_length=1)
    # disaggregated prefill/decode (vLLM's): checked in serving (sluice.kv_transfer.params)
    kv_transfer_params: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        options = self.stream_options
        if not self.stream or options is None:
            return False
        if options.include_usage is not None:
            return options.include_usage
        return bool(options.continuous_usage_stats)

    @property
    def continuous_usage(self) -> bool:
        """Whether every chunk of a streamed response carries the usage so far."""
        return bool(self.include_usage and self.stream_options
                    and self.stream_options.continuous_usage_stats)

    def check_supported(self) -> None:
        """A 400 naming the first field this server does not honour (`unsupported.py`)."""
        body = {name: getattr(self, name) for name in self.model_fields_set}
        body.update(self.model_extra or {})
        check_fields(body, type(self).model_fields, self.ENDPOINT)

    def _check_common(self) -> None:
        self.check_supported()
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options can only be set when stream is true.",
                                      param="stream_options")
        options = self.stream_options
        if options is not None and options.continuous_usage_stats \
                and options.include_usage is False:
            raise InvalidRequestError("stream_options.continuous_usage_stats needs "
                                      "include_usage (leave it out or set it true).",
                                      param="stream_options.continuous_usage_stats")
        if self.stream and self.prompt_logprobs is not None:
            raise InvalidRequestError("prompt_logprobs are not available when stream is true.",
                                      param="prompt_logprobs")

    def _stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def _logit_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        out: dict[int, float] = {}
        for key, bias in self.logit_bias.items():
            try:
                out[int(key)] = float(bias)
            except ValueError:
                raise InvalidRequestError(f"logit_bias keys must be token ids, got {key!r}.",
                                          param="logit_bias") from None
        return out

    def _sampling_kwargs(self, defaults: Mapping[str, Any]) -> dict[str, Any]:
        """The SamplingParams keywords common to both endpoints. A field the request leaves
        unset (None) takes the model's default from `defaults` (generation_config.json, see
        `hf_config.generation_defaults`), else SamplingParams' own; fields the client set
        win, as in vLLM."""
        kwargs: dict[str, Any] = {
            "n": self.n, "best_of": self.best_of, "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k, "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty, "seed": self.seed,
            "stop": self._stop_list(), "stop_token_ids": list(self.stop_token_ids or []),
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "ignore_eos": self.ignore_eos, "min_tokens": self.min_tokens,
            "logit_bias": self._logit_bias(), "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
            "prompt_logprobs": self.prompt_logprobs,
            "allowed_token_ids": self.allowed_token_ids, "bad_words": self.bad_words or None,
            "truncate_prompt_tokens": self.truncate_prompt_tokens,
            "structured_outputs": structured_outputs_params(self),
            "output_kind": RequestOutputKind.DELTA if self.stream
            else RequestOutputKind.FINAL_ONLY,
        }
        for name in _DEFAULTED_FIELDS:
            if kwargs[name] is None and name in defaults:
                kwargs[name] = defaults[name]
        return {k: v for k, v in kwargs.items() if v is not None}


_DEFAULTED_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
"""Fields a model's generation_config.json may default (max_tokens is handled per endpoint)."""


def default_max_tokens(requested: int | None, endpoint_default: int | None,
                       defaults: Mapping[str, Any]) -> int | None:
    """`requested` when the client set it; else the smaller of the endpoint's own default
    (None: up to the context length) and the model's `max_tokens` default, as vLLM."""
    if requested is not None:
        return requested
    limits = [v for v in (endpoint_default, defaults.get("max_tokens")) if v is not None]
    return min(limits) if limits else None
