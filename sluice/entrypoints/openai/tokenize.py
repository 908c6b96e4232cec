"""POST /tokenize and /detokenize, in vLLM's shapes.

    {"model", "prompt", "add_special_tokens"?}           -> {"count", "max_model_len", "tokens"}
    {"model", "messages", "add_generation_prompt"?, ...} -> the same, via the chat template
    {"model", "tokens"}                                   -> {"prompt"}

Text is bounded like a prompt (--max-prompt-chars) and tokenized, rendered or detokenized on the
offload pool, never on the event loop.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from sluice.entrypoints.openai.protocol import (DetokenizeRequest, DetokenizeResponse,
                                                TokenizeChatRequest, TokenizeCompletionRequest,
                                                TokenizeResponse)
from sluice.entrypoints.openai.serving import get_state, render_conversation
from sluice.errors import InvalidRequestError

router = APIRouter()


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting
        detail = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",),
                                       "msg": "JSON decode error", "input": {},
                                       "ctx": {"error": detail}}]) from None


def _parse(model: type, data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])}
                                      for err in e.errors()]) from None


@router.post("/tokenize")
async def tokenize(raw_request: Request) -> dict[str, Any]:
    state = get_state(raw_request)
    data = await _json_body(raw_request)
    if isinstance(data, dict) and "messages" in data:
        chat = _parse(TokenizeChatRequest, data)
        state.check_model(chat.model)
        text = await render_conversation(state, [m.to_template_dict() for m in chat.messages],
                                         chat.template_kwargs())
        add_special_tokens = chat.add_special_tokens
    else:
        plain = _parse(TokenizeCompletionRequest, data)
        state.check_model(plain.model)
        text, add_special_tokens = plain.prompt, plain.add_special_tokens
        state.limits.check_prompt_chars(text, "prompt")
    tokens = await state.offloader.run_if_large(len(text), state.tokenizer.encode, text,
                                                add_special_tokens=add_special_tokens)
    return TokenizeResponse(count=len(tokens), max_model_len=state.max_model_len,
                            tokens=tokens).model_dump()


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, raw_request: Request) -> dict[str, Any]:
    state = get_state(raw_request)
    state.check_model(body.model)
    vocab_size = state.tokenizer.vocab_size
    for token_id in body.tokens:
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(f"Token id {token_id} is outside the vocabulary "
                                      f"[0, {vocab_size}).", param="tokens")
    text = await state.offloader.run_if_large(len(body.tokens), state.tokenizer.decode,
                                              body.tokens)
    return DetokenizeResponse(prompt=text).model_dump()
