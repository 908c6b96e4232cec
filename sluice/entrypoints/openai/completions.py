"""POST /v1/completions: text or token-id prompts (one or a batch), `n`, `echo`, `logprobs`,
`prompt_logprobs` (vLLM's, in each choice), `stop`, and SSE streaming
(`stream_options.include_usage` adds a final usage chunk; `continuous_usage_stats` puts the usage
so far, of that prompt and choice, on every chunk, as vLLM does).

Choice `index` is `prompt_index * n + sample_index`, as in OpenAI's API. Each prompt is one
engine request `{id}-{prompt_index}` (the engine fans `n` out itself).
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from sluice.entrypoints.openai.errors import error_from_exception
from sluice.entrypoints.openai.protocol import (CompletionChoice, CompletionLogprobs,
                                                CompletionRequest, CompletionResponse,
                                                CompletionStreamResponse, now_seconds,
                                                random_id, usage)
from sluice.entrypoints.openai.serving import (MIN_LOGPROB, SSE_DONE,
                                               CleanupStreamingResponse, Generations,
                                               ServerState, base_request_id, get_state,
                                               prompt_logprobs_body, run_unless_disconnected,
                                               kv_transfer_extra, sampling_defaults, sse,
                                               start_generations, token_text)
from sluice.outputs import CompletionOutput, PositionLogprobs, RequestOutput

router = APIRouter()


def completion_logprobs(token_ids: Sequence[int],
                        positions: Sequence[PositionLogprobs | None] | None,
                        tokenizer: Any, num_top: int, text_offset: int = 0,
                        tokens_as_ids: bool = False) -> CompletionLogprobs:
    """OpenAI's completion logprobs for `token_ids`: the token's text, its logprob, the top
    `num_top` alternatives (plus the chosen token) and each token's offset in the text,
    counted from `text_offset`. A position without logprobs (the first prompt token) has
    None entries. `tokens_as_ids`: tokens are written 'token_id:{id}' (vLLM's
    return_tokens_as_token_ids)."""
    out = CompletionLogprobs()
    positions = positions if positions is not None else [None] * len(token_ids)
    offset = text_offset
    for token_id, position in zip(token_ids, positions):
        chosen = position.get(token_id) if position is not None else None
        token = token_text(token_id, chosen, tokenizer, tokens_as_ids)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += len(token)
        if position is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(max(chosen.logprob, MIN_LOGPROB) if chosen else None)
        out.top_logprobs.append({
            token_text(tid, lp, tokenizer, tokens_as_ids): max(lp.logprob, MIN_LOGPROB)
            for tid, lp in position.items() if lp.rank <= num_top or tid == token_id})
    return out


def _prompt_text(output: RequestOutput, tokenizer: Any) -> str:
    if output.prompt is not None:
        return output.prompt
    return tokenizer.decode(output.prompt_token_ids, skip_special_tokens=False)


class _ChoiceBuilder:
    """Turns one sample's outputs (final, or deltas while streaming) into choices, keeping the
    running text offset and whether the echoed prompt was already sent."""

    def __init__(self, body: CompletionRequest, tokenizer: Any):
        self.body = body
        self.tokenizer = tokenizer
        self.offset = 0
        self.echoed = False
        self.as_ids = bool(body.return_tokens_as_token_ids)

    def build(self, index: int, request_output: RequestOutput,
              sample: CompletionOutput) -> CompletionChoice:
        text = sample.text
        logprobs: CompletionLogprobs | None = None
        num_top = self.body.logprobs
        if self.body.echo and not self.echoed:
            self.echoed = True
            prompt = _prompt_text(request_output, self.tokenizer)
            if num_top is not None:
                logprobs = completion_logprobs(
                    request_output.prompt_token_ids, request_output.prompt_logprobs,
                    self.tokenizer, num_top, self.offset, self.as_ids)
            self.offset += len(prompt)
            text = prompt + text
        if num_top is not None:
            generated = completion_logprobs(sample.token_ids, sample.logprobs, self.tokenizer,
                                            num_top, self.offset, self.as_ids)
            if logprobs is None:
                logprobs = generated
            else:
                for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    getattr(logprobs, name).extend(getattr(generated, name))
            self.offset = (logprobs.text_offset[-1] + len(logprobs.tokens[-1])
                           if logprobs.tokens else self.offset)
        prompt_logprobs = None
        if self.body.prompt_logprobs is not None:  # never streamed (a 400)
            prompt_logprobs = prompt_logprobs_body(
                request_output.prompt_token_ids, request_output.prompt_logprobs,
                self.body.prompt_logprobs, self.tokenizer)
        return CompletionChoice(index=index, text=text, logprobs=logprobs,
                                finish_reason=sample.finish_reason,
                                stop_reason=sample.stop_reason, prompt_logprobs=prompt_logprobs)


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, raw_request: Request) -> Any:
    state = get_state(raw_request)
    lora_request = state.resolve_model(body.model)
    body.check_supported()
    prompts = body.prompts()
    state.limits.check_sampling(body, num_prompts=len(prompts))
    params = body.to_sampling_params(sampling_defaults(state))
    for prompt in prompts:
        if isinstance(prompt, str):
            state.limits.check_prompt_chars(prompt, "prompt")
    response_id = f"cmpl-{base_request_id(raw_request, body.request_id)}"
    ticket = state.admit(len(prompts) * params.num_sequences)
    try:
        generations = start_generations(
            state, prompts, params, f"{response_id}-{random_id()[:8]}",
            priority=body.priority, add_special_tokens=body.add_special_tokens,
            cache_salt=body.cache_salt, kv_transfer_params=body.kv_transfer_params,
            lora_request=lora_request)
        if body.stream:
            await run_unless_disconnected(raw_request, generations.start())
        else:
            outputs = await run_unless_disconnected(raw_request, generations.final_outputs())
    except BaseException:
        ticket.release()
        raise
    if not body.stream:
        ticket.release()
        return JSONResponse(_full_response(body, state, response_id, outputs, params.n))

    def cleanup() -> None:
        generations.abort()
        ticket.release()

    return CleanupStreamingResponse(
        _stream(body, state, response_id, generations, len(prompts), params.n), cleanup)


def _full_response(body: CompletionRequest, state: ServerState, response_id: str,
                   outputs: list[RequestOutput], n: int) -> dict[str, Any]:
    choices = []
    num_prompt_tokens = num_generated = 0
    for i, output in enumerate(outputs):
        num_prompt_tokens += len(output.prompt_token_ids)
        for sample in sorted(output.outputs, key=lambda s: s.index):
            num_generated += len(sample.token_ids)
            choices.append(_ChoiceBuilder(body, state.tokenizer).build(
                i * n + sample.index, output, sample))
    response = CompletionResponse(id=response_id, model=state.reported_model(body.model),
                                  choices=choices, usage=usage(num_prompt_tokens, num_generated),
                                  **kv_transfer_extra(outputs))
    return response.model_dump()


_NO_PROMPT_LOGPROBS = {"choices": {"__all__": {"prompt_logprobs"}}}
"""Left out of stream chunks (prompt_logprobs are never streamed)."""


async def _stream(body: CompletionRequest, state: ServerState, response_id: str,
                  generations: Generations, num_prompts: int, n: int) -> AsyncIterator[str]:
    created = now_seconds()
    builders = [_ChoiceBuilder(body, state.tokenizer) for _ in range(num_prompts * n)]
    prompt_tokens: dict[int, int] = {}
    generated = [0] * (num_prompts * n)
    try:
        async for i, output in generations:
            prompt_tokens[i] = len(output.prompt_token_ids)
            for sample in output.outputs:
                index = i * n + sample.index
                generated[index] += len(sample.token_ids)
                choice = builders[index].build(index, output, sample)
                # A step that produced tokens is sent even when its text delta is empty (held
                # back, special, or ids the tokenizer cannot decode), as vLLM does: clients
                # time tokens by chunks.
                if not choice.text and not sample.token_ids and choice.finish_reason is None \
                        and not (choice.logprobs and choice.logprobs.tokens):
                    continue
                chunk = CompletionStreamResponse(
                    id=response_id, created=created, model=state.reported_model(body.model),
                    choices=[choice],
                    usage=usage(prompt_tokens[i], generated[index])
                    if body.continuous_usage else None)
                yield sse(chunk.model_dump_json(exclude=_NO_PROMPT_LOGPROBS))
        if body.include_usage:
            chunk = CompletionStreamResponse(
                id=response_id, created=created, model=state.reported_model(body.model),
                choices=[],
                usage=usage(sum(prompt_tokens.values()), sum(generated)))
            yield sse(chunk.model_dump_json())
    except Exception as e:  # noqa: BLE001 - the status is sent; report in the stream
        _, error = error_from_exception(e)
        yield sse(json.dumps(error))
    yield SSE_DONE
