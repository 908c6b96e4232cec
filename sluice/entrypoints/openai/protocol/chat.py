"""POST /v1/chat/completions: messages and tools, the request, the response and its stream
chunks.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from sluice.entrypoints.openai.protocol.base import (OpenAIBaseModel, PromptLogprobs,
                                                     ResponseModel, UsageInfo, now_seconds)
from sluice.entrypoints.openai.protocol.sampling import SamplingFields, default_max_tokens
from sluice.errors import InvalidRequestError
from sluice.frontend.chat_template import message_for_template, template_kwargs
from sluice.sampling_params import SamplingParams


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
