"""Turn a user request into a validated `EngineCoreRequest`. No torch.

Contract: `InputProcessor.process` tokenizes a text prompt (or takes token ids), checks the
request against the served model and raises `InvalidRequestError` with `param` set for every
user mistake, so that the HTTP layer answers 400 and the engine core never sees a bad request.
The `SamplingParams` it sends are a copy with `max_tokens` materialised (never None).

It also applies the prompt-side parameters: `truncate_prompt_tokens` keeps the last k prompt
tokens (before the context-length check), and `bad_words` are tokenized into
`bad_words_token_ids` (see `bad_words_token_ids`; the params sent carry the ids instead of
the words), since the engine core has no tokenizer.

`fan_out` splits a request into `params.num_sequences` (`best_of`, else `n`) independent engine
requests when that is > 1: child `i` is `f"{i}_{request_id}"` with `n=1`, no `best_of` and,
when a seed is set, `seed + i` (so samples differ but each stays reproducible). Only child 0
asks for prompt logprobs; they are identical for all children. When `best_of > n` and no
logprobs were asked for, children ask for `logprobs=0` (the sampled token's own logprob), so
that the output processor can rank them by cumulative logprob.
"""

from __future__ import annotations

import operator
import time
from typing import Sequence

from sluice.errors import InvalidRequestError
from sluice.frontend.tokenizer import Tokenizer
from sluice.lora.request import LoRARequest
from sluice.messages import EngineCoreRequest, EngineReady
from sluice.sampling_params import INT64_MIN, SamplingParams, in_int64


def _as_token_id(value: object) -> int | None:
    """`value` as a plain int if it is an integer (numpy ints included, bools not), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def child_request_id(request_id: str, index: int) -> str:
    """The engine-side id of sample `index` of an `n > 1` request."""
    return f"{index}_{request_id}"


def child_seed(seed: int, index: int) -> int:
    """The seed of child `index`: `seed + index`, wrapped into the signed 64-bit range (the
    wire format's) so that a seed near the top still fans out."""
    return (seed + index - INT64_MIN) % 2**64 + INT64_MIN


def bad_words_token_ids(tokenizer: Tokenizer, bad_words: Sequence[str]) -> list[list[int]]:
    """The token sequences of `bad_words`, as vLLM builds them: each word (left-stripped) as
    it reads at the start of a text, plus its form after a space when that starts with a
    different token and has the same number of tokens (a separate word token)."""
    sequences: list[list[int]] = []
    for word in bad_words:
        bare = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if bare:  # a word the tokenizer maps to no tokens cannot be generated
            sequences.append(bare)
        if spaced and (not bare or (spaced[0] != bare[0] and len(spaced) == len(bare))):
            sequences.append(spaced)
    return sequences


def fan_out(request: EngineCoreRequest) -> list[EngineCoreRequest]:
    """The engine requests for `request`: itself when it needs one sample, else one child per
    sample (`best_of`, else `n`; see the module docstring)."""
    params = request.sampling_params
    count = params.num_sequences
    if count == 1:
        return [request]
    logprobs = params.logprobs
    if logprobs is None and count > params.n:
        logprobs = 0  # best_of ranks samples by cumulative logprob
    children = []
    for i in range(count):
        child_params = params.with_updates(
            n=1, best_of=None, seed=None if params.seed is None else child_seed(params.seed, i),
            prompt_logprobs=params.prompt_logprobs if i == 0 else None, logprobs=logprobs)
        children.append(EngineCoreRequest(
            request_id=child_request_id(request.request_id, i),
            prompt_token_ids=request.prompt_token_ids, sampling_params=child_params,
            eos_token_id=request.eos_token_id, arrival_time=request.arrival_time,
            priority=request.priority, cache_salt=request.cache_salt,
            lora_request=request.lora_request))
    return children


class InputProcessor:
    """Validates and tokenizes requests for one served model.

    `vocab_size` bounds prompt token ids and `stop_token_ids`/`logit_bias` keys (pass the
    model's vocabulary size, which may exceed the tokenizer's); `max_logprobs` bounds
    `logprobs`/`prompt_logprobs`; `eos_token_id` is sent with every request (None: no EOS stop).
    `tokenizer` may be None when only token-id prompts and `detokenize=False` are served.
    `extra_eos_token_ids` (e.g. `<|im_end|>` from generation_config.json) are added to every
    request's `stop_token_ids` unless it sets `ignore_eos`, as vLLM does.
    """

    def __init__(self, tokenizer: Tokenizer | None, max_model_len: int, vocab_size: int,
                 max_logprobs: int, eos_token_id: int | None,
                 extra_eos_token_ids: Sequence[int] = ()):
        assert max_model_len > 0 and vocab_size > 0, (max_model_len, vocab_size)
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.max_logprobs = max_logprobs
        self.eos_token_id = eos_token_id
        self.extra_eos_token_ids = [t for t in extra_eos_token_ids if t != eos_token_id]

    @classmethod
    def from_ready(cls, tokenizer: Tokenizer, ready: EngineReady,
                   max_logprobs: int) -> "InputProcessor":
        """The processor for the model an engine reported in its startup handshake."""
        eos = tokenizer.eos_token_id
        if eos is None and ready.eos_token_ids:
            eos = ready.eos_token_ids[0]
        return cls(tokenizer, ready.max_model_len, ready.vocab_size, max_logprobs, eos,
                   ready.eos_token_ids)

    def process(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams,
                arrival_time: float | None = None, priority: int = 0, *,
                add_special_tokens: bool = True, cache_salt: str | None = None,
                kv_transfer_params: dict | None = None,
                lora_request: LoRARequest | None = None) -> EngineCoreRequest:
        """Tokenize and validate; return the request to hand to `OutputProcessor.add_request`.

        `prompt` is text (tokenized with `add_special_tokens`; pass False for chat-template
        output, which already holds BOS) or token ids. `arrival_time` is `time.monotonic()`
        seconds, defaulting to now. `lora_request` (the adapter; None: the base model) must
        already be checked by the caller (`sluice.lora.registry`). Raises `InvalidRequestError`.
        """
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id must be a non-empty string.", param="request_id")
        if not in_int64(priority):
            raise InvalidRequestError(f"priority must fit a 64-bit signed integer, got "
                                      f"{priority}.", param="priority")
        prompt_token_ids = self._truncate(self._tokenize(prompt, add_special_tokens), params)
        params = self._validate_params(params, len(prompt_token_ids))
        return EngineCoreRequest(
            request_id=request_id, prompt_token_ids=prompt_token_ids, sampling_params=params,
            eos_token_id=self.eos_token_id,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            priority=priority, cache_salt=cache_salt, kv_transfer_params=kv_transfer_params,
            lora_request=lora_request)

    def _tokenize(self, prompt: str | Sequence[int], add_special_tokens: bool) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("The prompt is empty; send at least one token.",
                                          param="prompt")
            if self.tokenizer is None:
                raise InvalidRequestError("This server was started without a tokenizer; send "
                                          "the prompt as token ids.", param="prompt")
            token_ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            token_ids = []
            for value in prompt:
                token_id = _as_token_id(value)
                if token_id is None:
                    raise InvalidRequestError(f"Prompt token ids must be integers, got "
                                              f"{value!r}.", param="prompt")
                token_ids.append(token_id)
        if not token_ids:
            raise InvalidRequestError("The prompt is empty; send at least one token.",
                                      param="prompt")
        for token_id in token_ids:
            if not 0 <= token_id < self.vocab_size:
                raise InvalidRequestError(
                    f"Prompt token id {token_id} is outside the vocabulary "
                    f"[0, {self.vocab_size}).", param="prompt")
        return token_ids

    def _truncate(self, token_ids: list[int], params: SamplingParams) -> list[int]:
        """The last `truncate_prompt_tokens` tokens (-1: the last max_model_len)."""
        keep = params.truncate_prompt_tokens
        if keep is None:
            return token_ids
        if keep == -1:
            keep = self.max_model_len
        if keep > self.max_model_len:
            raise InvalidRequestError(
                f"truncate_prompt_tokens value ({keep}) is greater than max_model_len "
                f"({self.max_model_len}). Please, select a smaller truncation size.",
                param="truncate_prompt_tokens")
        return token_ids[-keep:]

    def _validate_params(self, params: SamplingParams, prompt_len: int) -> SamplingParams:
        """Model-dependent checks; returns the copy to send (max_tokens materialised)."""
        if params.bad_words:
            if self.tokenizer is None:
                raise InvalidRequestError("bad_words need a tokenizer; this server has none "
                                          "(send bad_words_token_ids).", param="bad_words")
            params = params.with_updates(
                bad_words=None, bad_words_token_ids=[*(params.bad_words_token_ids or []),
                                                     *bad_words_token_ids(self.tokenizer,
                                                                          params.bad_words)])
        params.check_against_model(self.vocab_size, self.max_logprobs)
        if params.structured_outputs is not None:   # a 400 naming the field, before the engine
            from sluice.structured_output.grammar import check_structured_outputs
            check_structured_outputs(params.structured_outputs)
        if params.stop and not params.detokenize:
            raise InvalidRequestError("stop strings need detokenize=True (use stop_token_ids "
                                      "to stop on tokens without detokenizing).", param="stop")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this server has none.",
                                      param="stop")
        extra_stops = [t for t in self.extra_eos_token_ids if t not in params.stop_token_ids]
        if extra_stops and not params.ignore_eos:
            params = params.with_updates(stop_token_ids=[*params.stop_token_ids, *extra_stops])
        limit = self.max_model_len
        if params.max_tokens is None:
            if prompt_len >= limit:
                raise InvalidRequestError(
                    f"This model's maximum context length is {limit} tokens. However, you "
                    f"requested {prompt_len} tokens in the messages. Please reduce the length "
                    "of the messages.", param="prompt")
            return params.with_updates(max_tokens=limit - prompt_len)
        if prompt_len + params.max_tokens > limit:
            raise InvalidRequestError(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {prompt_len + params.max_tokens} tokens ({prompt_len} in the "
                f"messages, {params.max_tokens} in the completion). Please reduce the length "
                "of the messages or completion.",
                param="prompt" if prompt_len >= limit else "max_tokens")
        return params
