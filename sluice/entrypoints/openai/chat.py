"""POST /v1/chat/completions: the model's chat template renders `messages` into a prompt;
`n`, `logprobs`/`top_logprobs`, `max_completion_tokens`, vLLM's `prompt_logprobs` (at the
response's top level, as vLLM), `echo`, `continue_final_message`, and SSE streaming.

A stream sends, per choice, a first chunk with `delta.role = "assistant"`, then (with `echo`) a
chunk with the echoed text, then content deltas, then a chunk with an empty delta and the
`finish_reason`; with `stream_options.include_usage` a last chunk with no choices carries
`usage`; with `continuous_usage_stats` every chunk also carries the usage so far of its choice;
then `data: [DONE]`.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sluice.entrypoints.openai.errors import error_from_exception
from sluice.entrypoints.openai.protocol import (ChatChoice, ChatCompletionRequest,
                                                ChatCompletionResponse,
                                                ChatCompletionStreamResponse, ChatLogprob,
                                                ChatLogprobContent, ChatLogprobs, ChatMessage,
                                                ChatStreamChoice, DeltaMessage, now_seconds,
                                                random_id, usage)
from sluice.entrypoints.openai.serving import (MIN_LOGPROB, SSE_DONE,
                                               CleanupStreamingResponse, Generations,
                                               ServerState, base_request_id, get_state,
                                               prompt_error_param, prompt_logprobs_body,
                                               render_conversation, run_unless_disconnected,
                                               kv_transfer_extra, sampling_defaults, sse,
                                               start_generations, token_text)
from sluice.entrypoints.openai.tools import ToolPlan, plan_tools
from sluice.errors import InvalidRequestError
from sluice.outputs import PositionLogprobs, RequestOutput

router = APIRouter()


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": max(logprob, MIN_LOGPROB),
            "bytes": list(token.encode("utf-8", errors="replace"))}


def chat_logprobs(token_ids: Sequence[int], positions: Sequence[PositionLogprobs] | None,
                  tokenizer: Any, num_top: int, tokens_as_ids: bool = False) -> ChatLogprobs:
    """OpenAI's chat logprobs: per generated token its text, logprob, UTF-8 bytes and the
    `num_top` most likely tokens (by rank) at that position. `tokens_as_ids`: tokens are
    written 'token_id:{id}' (vLLM's return_tokens_as_token_ids)."""
    content = []
    for token_id, position in zip(token_ids, positions or []):
        chosen = position.get(token_id)
        token = token_text(token_id, chosen, tokenizer, tokens_as_ids)
        top = sorted(((lp.rank, -lp.logprob, tid, lp) for tid, lp in position.items()
                      if lp.rank <= num_top), key=lambda e: e[:3])[:num_top]
        content.append(ChatLogprobContent(
            **_entry(token, chosen.logprob if chosen is not None else float("-inf")),
            top_logprobs=[ChatLogprob(**_entry(token_text(tid, lp, tokenizer, tokens_as_ids),
                                               lp.logprob)) for _, _, tid, lp in top]))
    return ChatLogprobs(content=content)


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, raw_request: Request) -> Any:
    state = get_state(raw_request)
    lora_request = state.resolve_model(body.model)
    body.check_supported()
    tools = plan_tools(body, state.config.server)
    state.limits.check_sampling(body, num_prompts=1)
    params = tools.sampling_params(body.to_sampling_params(sampling_defaults(state)))
    prompt = await render_conversation(state, body.conversation(), body.template_kwargs())
    response_id = f"chatcmpl-{base_request_id(raw_request, body.request_id)}"
    ticket = state.admit(params.num_sequences)
    try:
        generations = start_generations(
            state, [prompt], params, f"{response_id}-{random_id()[:8]}",
            priority=body.priority, add_special_tokens=body.add_special_tokens,
            cache_salt=body.cache_salt, kv_transfer_params=body.kv_transfer_params,
            lora_request=lora_request)
        if body.stream:
            await run_unless_disconnected(raw_request, generations.start())
        else:
            outputs = await run_unless_disconnected(raw_request, generations.final_outputs())
    except InvalidRequestError as e:
        ticket.release()
        raise prompt_error_param(e, is_chat=True) from None
    except BaseException:
        ticket.release()
        raise
    if not body.stream:
        ticket.release()
        return JSONResponse(_full_response(body, state, response_id, outputs[0], tools))

    def cleanup() -> None:
        generations.abort()
        ticket.release()

    return CleanupStreamingResponse(_stream(body, state, response_id, generations, params.n,
                                            tools), cleanup)


def _logprobs(body: ChatCompletionRequest, state: ServerState, token_ids: Sequence[int],
              positions: Sequence[PositionLogprobs] | None) -> ChatLogprobs | None:
    if not body.logprobs:
        return None
    return chat_logprobs(token_ids, positions, state.tokenizer, body.top_logprobs or 0,
                         bool(body.return_tokens_as_token_ids))


def _full_response(body: ChatCompletionRequest, state: ServerState, response_id: str,
                   output: RequestOutput, tools: ToolPlan) -> dict[str, Any]:
    echo = body.echo_text()
    choices = []
    for sample in sorted(output.outputs, key=lambda s: s.index):
        content, tool_calls = tools.message(sample.text, state.tokenizer, body)
        if echo:
            content = echo + (content or "")
        choices.append(ChatChoice(
            index=sample.index,
            message=ChatMessage(role="assistant", content=content, tool_calls=tool_calls),
            logprobs=_logprobs(body, state, sample.token_ids, sample.logprobs),
            finish_reason="tool_calls" if tool_calls else sample.finish_reason,
            stop_reason=sample.stop_reason))
    num_generated = sum(len(s.token_ids) for s in output.outputs)
    prompt_logprobs = None
    if body.prompt_logprobs is not None:
        prompt_logprobs = prompt_logprobs_body(output.prompt_token_ids, output.prompt_logprobs,
                                               body.prompt_logprobs, state.tokenizer)
    response = ChatCompletionResponse(
        id=response_id, model=state.reported_model(body.model), choices=choices,
        usage=usage(len(output.prompt_token_ids), num_generated),
        prompt_logprobs=prompt_logprobs, **kv_transfer_extra([output]))
    return response.model_dump()


async def _stream(body: ChatCompletionRequest, state: ServerState, response_id: str,
                  generations: Generations, n: int, tools: ToolPlan) -> AsyncIterator[str]:
    created = now_seconds()
    tool_streams = [tools.stream(state.tokenizer, body) for _ in range(n)]

    def chunk(choices: list[ChatStreamChoice], **extra: Any) -> str:
        return sse(ChatCompletionStreamResponse(
            id=response_id, created=created, model=state.reported_model(body.model),
            choices=choices, **extra).model_dump_json())

    first = generations.first_outputs()
    num_prompt_tokens = len(first[0][1].prompt_token_ids) if first else 0
    generated = [0] * n

    def choice_chunk(choice: ChatStreamChoice) -> str:
        if not body.continuous_usage:
            return chunk([choice])
        return chunk([choice], usage=usage(num_prompt_tokens, generated[choice.index]))

    try:
        for index in range(n):
            yield choice_chunk(ChatStreamChoice(
                index=index, delta=DeltaMessage(role="assistant", content="")))
        echo = body.echo_text()
        if echo:
            for index in range(n):
                yield choice_chunk(ChatStreamChoice(index=index, delta=DeltaMessage(content=echo)))
        async for _, output in generations:
            num_prompt_tokens = len(output.prompt_token_ids)
            for sample in output.outputs:
                generated[sample.index] += len(sample.token_ids)
                logprobs = _logprobs(body, state, sample.token_ids, sample.logprobs)
                tool_stream = tool_streams[sample.index]
                delta: DeltaMessage | None = DeltaMessage(content=sample.text)
                if tool_stream is not None:  # parsed deltas; None: nothing to send yet
                    delta = tool_stream.feed(sample.text, sample.token_ids)
                    if delta is None and logprobs is not None and logprobs.content:
                        delta = DeltaMessage()
                # Tokens with an empty text delta still get their chunk (as in vLLM).
                if delta is not None and (sample.text or sample.token_ids or delta.tool_calls
                                          or (logprobs is not None and logprobs.content)):
                    yield choice_chunk(ChatStreamChoice(index=sample.index, delta=delta,
                                                        logprobs=logprobs))
                if sample.finish_reason is not None:
                    finish_reason = sample.finish_reason
                    if tool_stream is not None:
                        rest = tool_stream.finish()
                        if rest is not None:
                            yield choice_chunk(ChatStreamChoice(index=sample.index, delta=rest))
                        if tool_stream.called:
                            finish_reason = "tool_calls"
                    yield choice_chunk(ChatStreamChoice(index=sample.index, delta=DeltaMessage(),
                                                        finish_reason=finish_reason,
                                                        stop_reason=sample.stop_reason))
        if body.include_usage:
            yield chunk([], usage=usage(num_prompt_tokens, sum(generated)))
    except Exception as e:  # noqa: BLE001 - the status is sent; report in the stream
        _, error = error_from_exception(e)
        yield sse(json.dumps(error))
    yield SSE_DONE
