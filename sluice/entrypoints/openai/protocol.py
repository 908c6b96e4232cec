"""Pydantic models of the OpenAI-compatible HTTP API (requests, responses, stream chunks).

Shapes follow OpenAI's API (and vLLM's extras). Every top-level field of a completion or chat
request is honoured or refused with a 400 naming it (`check_supported`, which runs
`unsupported.check_fields`: fields OpenAI or vLLM define that sluice does not implement yet, and
fields nobody defines); nested objects other than `stream_options` ignore unknown keys (logged
at debug level). Every string of a request (keys included, at any depth) must be valid Unicode:
`RequestModel` rejects lone surrogates with a 400 naming the top-level field. Each request type
converts itself to `SamplingParams` in exactly one place (`to_sampling_params`); value ranges are
checked by `SamplingParams` itself (which raises `InvalidRequestError` naming the parameter), so
there is one source of truth.
No torch.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, ClassVar, Literal, Mapping

from pydantic import (BaseModel, ConfigDict, Field, ValidationInfo, field_validator,
                      model_serializer, model_validator)

from sluice.entrypoints.openai.structured import (StructuredOutputFields,
                                                  structured_outputs_params)
from sluice.entrypoints.openai.unsupported import check_fields
from sluice.errors import InvalidRequestError
from sluice.frontend.chat_template import message_for_template, template_kwargs
from sluice.frontend.tokenizer import check_text
from sluice.sampling_params import RequestOutputKind, SamplingParams

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


# ---------------------------------------------------------------------------------------------
# Errors

class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(ResponseModel):
    """`{"error": {"message", "type", "param", "code"}}`, OpenAI's error body."""
    error: ErrorInfo


# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
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


PromptLogprobs = list[dict[str, dict[str, Any]] | None]
"""vLLM's `prompt_logprobs`: None for the first prompt token, then per prompt token
{str(token_id): {"logprob", "rank", "decoded_token"}} (the token itself and the top k)."""


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


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


# ---------------------------------------------------------------------------------------------
# /v1/chat/completions

class ContentPart(OpenAIBaseModel):
    type: str
    text: str | None = None


class ChatMessageParam(BaseModel):
    """One message of a conversation; extra keys (tool_calls, name …) go to the template."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None

    def to_template_dict(self) -> dict[str, Any]:
        """The message as the chat template sees it (`message_for_template`: text parts
        joined into one string)."""
        return message_for_template(self.model_dump(exclude_none=True))


class FunctionDefinition(OpenAIBaseModel):
    """A tool's function: OpenAI's name rule (letters, digits, '_' and '-', at most 64)."""
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(OpenAIBaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    ENDPOINT: ClassVar[str] = "/v1/chat/completions"

    messages: list[ChatMessageParam]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    echo: bool = False
    documents: list[dict[str, str]] | None = None

    def conversation(self) -> list[dict[str, Any]]:
        if not self.messages:
            raise InvalidRequestError("messages must hold at least one message.",
                                      param="messages")
        return [m.to_template_dict() for m in self.messages]

    def template_kwargs(self) -> dict[str, Any]:
        """Keywords for `Tokenizer.apply_chat_template` (`chat_template.template_kwargs`):
        `add_generation_prompt`, `continue_final_message`, `tools` (whatever the
        tool_choice, as vLLM), `documents`, then `chat_template_kwargs` (which win, as in vLLM), then
        `chat_template`. Reserved keywords are a 400 naming chat_template_kwargs."""
        return template_kwargs(self.add_generation_prompt, self.chat_template,
                               self.chat_template_kwargs,
                               tools=[t.model_dump(exclude_none=True) for t in self.tools]
                               if self.tools else None,
                               continue_final_message=self.continue_final_message,
                               documents=self.documents)

    def check_supported(self) -> None:
        """As `SamplingFields.check_supported`; first, tool_choice other than 'none' without
        tools is malformed (400 naming tool_choice). The rest of the tool fields is checked
        by `tools.plan_tools`."""
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise InvalidRequestError("tool_choice needs tools.", param="tool_choice")
        super().check_supported()

    def echo_text(self) -> str:
        """What `echo` puts before each choice's content, as vLLM: the last message's content
        when that message is the assistant's (or, with add_generation_prompt false, any
        role's: the reply continues it); else ""."""
        if not self.echo or not self.messages:
            return ""
        last = self.messages[-1]
        if self.add_generation_prompt and last.role != "assistant":
            return ""
        return str(last.to_template_dict().get("content") or "")

    def to_sampling_params(self, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """Validated SamplingParams; `max_completion_tokens` wins over `max_tokens`; no limit
        means the model's default max_tokens, else "up to the context length". `defaults` are
        the model's (see `_sampling_kwargs`)."""
        self._check_common()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true.",
                                      param="top_logprobs")
        defaults = defaults or {}
        kwargs = self._sampling_kwargs(defaults)
        kwargs["max_tokens"] = default_max_tokens(
            self.max_completion_tokens if self.max_completion_tokens is not None
            else self.max_tokens, None, defaults)
        if self.logprobs:
            kwargs["logprobs"] = self.top_logprobs or 0
        return SamplingParams(**kwargs)


class FunctionCall(ResponseModel):
    name: str
    arguments: str
    """The arguments as JSON text, as the model wrote them."""


class ToolCall(ResponseModel):
    """A tool call of a response message (`id` is `chatcmpl-tool-…`, as vLLM)."""
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class _DropNone(ResponseModel):
    """A stream piece whose None fields are left out."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(_DropNone):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_DropNone):
    """One piece of a streamed tool call: the first carries `id`, `type` and the name, later
    ones only argument fragments (the `openai` client concatenates them by `index`)."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class ChatMessage(ResponseModel):
    """A response message; `tool_calls` is left out when None."""
    role: str
    content: str | None = None
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_no_tool_calls(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobContent(ChatLogprob):
    top_logprobs: list[ChatLogprob] = Field(default_factory=list)


class ChatLogprobs(ResponseModel):
    content: list[ChatLogprobContent] | None = None


class ChatChoice(ResponseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now_seconds)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class DeltaMessage(ResponseModel):
    """A stream delta; fields that are None are left out (`{}` for the finish chunk)."""
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now_seconds)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------------------------------------
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
