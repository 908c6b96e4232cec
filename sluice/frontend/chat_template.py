"""What a chat request hands the chat template, shared by the server and `LLM.chat`. No torch.

Contract:
* `message_for_template(message)` is one message as the template sees it: a list of content
  parts becomes its text parts joined by newlines, missing/None content becomes "". A non-text
  part (image, audio …) is an `InvalidRequestError(param="messages")` naming its type: sluice
  serves text-only models.
* An assistant message's `tool_calls` reach the template with each `function.arguments` that
  is JSON text of an object decoded into a dict (as vLLM: HF templates write
  `arguments | tojson` or iterate its items); a `role: "tool"` message keeps its
  `tool_call_id` (and every other extra key) as given.
* `template_kwargs(...)` are the keywords for `Tokenizer.apply_chat_template`:
  `add_generation_prompt`, `continue_final_message` (when set), `tools` and `documents` (when
  given; transformers hands them to the template), then the
  caller's `chat_template_kwargs` (which win, as in vLLM), then `chat_template`. Keywords that
  would change what transformers returns are refused (`RESERVED_TEMPLATE_KWARGS`, a 400 naming
  chat_template_kwargs), as is asking for both a generation prompt and a continued final
  message.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from sluice.errors import InvalidRequestError

# Keywords of transformers' apply_chat_template that chat_template_kwargs may not set: they
# change what the call returns or collide with its positional arguments.
RESERVED_TEMPLATE_KWARGS = frozenset((
    "conversation", "messages", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
    "time_limit_s"))


def message_for_template(message: Mapping[str, Any]) -> dict[str, Any]:
    """`message` (a dict with `role` and `content`, extra keys kept) as the template sees it."""
    data = dict(message)
    content = data.get("content")
    if content is None:
        data["content"] = ""
    elif isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            text = part.get("text") if isinstance(part, Mapping) else None
            if kind != "text" or not isinstance(text, str):
                raise InvalidRequestError(
                    f"content part of type {kind!r} is not supported; only 'text' parts are.",
                    param="messages")
            texts.append(text)
        data["content"] = "\n".join(texts)
    if isinstance(data.get("tool_calls"), list):
        data["tool_calls"] = [_call_for_template(call) for call in data["tool_calls"]]
    return data


def _call_for_template(call: Any) -> Any:
    """A tool call with its `function.arguments` JSON text decoded (see the module docstring);
    anything else unchanged."""
    function = call.get("function") if isinstance(call, Mapping) else None
    arguments = function.get("arguments") if isinstance(function, Mapping) else None
    if not isinstance(arguments, str):
        return call
    try:
        decoded = json.loads(arguments)
    except ValueError:
        return call
    if not isinstance(decoded, dict):
        return call
    return {**call, "function": {**function, "arguments": decoded}}


def template_kwargs(add_generation_prompt: bool, chat_template: str | None,
                    chat_template_kwargs: Mapping[str, Any] | None, *,
                    tools: list[dict[str, Any]] | None = None,
                    continue_final_message: bool = False,
                    documents: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The keywords a chat request passes to `Tokenizer.apply_chat_template` (see the module
    docstring). A `chat_template` inside `chat_template_kwargs` counts as the request's
    template."""
    extra = dict(chat_template_kwargs or {})
    reserved = sorted(k for k in extra if k in RESERVED_TEMPLATE_KWARGS)
    if reserved:
        raise InvalidRequestError(f"chat_template_kwargs may not set {', '.join(reserved)}.",
                                  param="chat_template_kwargs")
    kwargs: dict[str, Any] = {"add_generation_prompt": add_generation_prompt}
    if continue_final_message:
        kwargs["continue_final_message"] = True
    if tools:
        kwargs["tools"] = tools
    if documents:
        kwargs["documents"] = documents
    kwargs.update(extra)
    if kwargs.get("add_generation_prompt") and kwargs.get("continue_final_message"):
        raise InvalidRequestError("Cannot set both `continue_final_message` and "
                                  "`add_generation_prompt` to True.",
                                  param="continue_final_message")
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    return kwargs
