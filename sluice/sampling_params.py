"""SamplingParams: how one request is decoded. Immutable once validated; no torch.

Validation happens in `__post_init__` and raises `InvalidRequestError` naming the parameter, so
the HTTP layer can return a 400 with `param` set.
"""

from __future__ import annotations

from enum import IntEnum

import msgspec

from sluice.errors import InvalidRequestError

_GREEDY_EPS = 1e-5

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""Every integer a request carries must fit a signed 64-bit integer (the wire format's and the
engine's range); larger values are a 400 naming the field, not an encoding error."""

_INT_FIELDS = ("n", "best_of", "top_k", "seed", "max_tokens", "min_tokens", "logprobs",
               "prompt_logprobs", "truncate_prompt_tokens")


def in_int64(value: int) -> bool:
    """Whether `value` fits a signed 64-bit integer."""
    return INT64_MIN <= value <= INT64_MAX


class RequestOutputKind(IntEnum):
    """What each `RequestOutput` of a request carries."""
    CUMULATIVE = 0  # all text/tokens so far
    DELTA = 1       # only what is new since the previous output
    FINAL_ONLY = 2  # one output, when the request finishes


class StructuredOutputsParams(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One output constraint, as vLLM's `StructuredOutputsParams`: exactly one of

    * `json`: a JSON schema (a dict, or its JSON text) the output must validate against;
    * `json_object`: True for any JSON object (OpenAI's `response_format: json_object`);
    * `regex`: the output matches this regular expression in full;
    * `choice`: the output is exactly one of these strings;
    * `grammar`: a context-free grammar (Lark, or GBNF/EBNF as llama.cpp and vLLM write it);
    * `structural_tag`: vLLM's structural tag (JSON text: tagged regions whose bodies follow
      a schema, free text elsewhere).

    `disable_any_whitespace` makes JSON compact; `disable_additional_properties` treats every
    object schema without `additionalProperties` as closed; `whitespace_pattern` is vLLM's
    JSON whitespace regex. The grammar backend (`sluice.structured_output`) compiles it; a
    constraint it cannot compile is an `InvalidRequestError` naming the field.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in CONSTRAINT_KINDS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise InvalidRequestError(
                "structured_outputs must set exactly one of "
                f"{', '.join(CONSTRAINT_KINDS)}; got {', '.join(given) or 'none'}.",
                param="structured_outputs")
        if self.choice is not None and (not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):
            raise InvalidRequestError("structured_outputs.choice must be a non-empty list of "
                                      "strings.", param="structured_outputs.choice")

    @property
    def kind(self) -> str:
        """Which constraint is set: one of `CONSTRAINT_KINDS`."""
        return next(n for n in CONSTRAINT_KINDS if getattr(self, n) not in (None, False))


CONSTRAINT_KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
"""The fields of `StructuredOutputsParams` that name a constraint (exactly one is set)."""


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Decoding parameters, named as in vLLM and the OpenAI API.

    Greedy decoding is `temperature == 0`. `top_k <= 0` disables top-k. `seed` makes one request
    reproducible regardless of batch composition. `logprobs=k` returns the sampled token's logprob
    and the top-k alternatives per output token; `prompt_logprobs=k` the same for prompt tokens.

    vLLM's extras, each honoured end to end:

    * `best_of` (>= n): generate `best_of` samples and return the `n` with the highest
      cumulative logprob (of the raw model distribution), best first. Final outputs only (no
      streaming) when `best_of > n`.
    * `allowed_token_ids`: only these tokens may be sampled (all others are masked to -inf).
    * `bad_words`: words that must never be generated. The frontend tokenizes each word (at
      the start of the text and after a space) into `bad_words_token_ids`; the sampler bans a
      word's last token whenever the output so far ends with the word's other tokens.
      `bad_words_token_ids` may also be given directly (token-level bad words).
    * `truncate_prompt_tokens=k`: keep only the last k prompt tokens (-1: the last
      max_model_len tokens).
    * `structured_outputs`: constrain the output to a JSON schema, regex, choice or grammar
      (`StructuredOutputsParams`).
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    bad_words_token_ids: list[list[int]] | None = None
    truncate_prompt_tokens: int | None = None
    structured_outputs: StructuredOutputsParams | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        def bad(param: str, msg: str) -> None:
            raise InvalidRequestError(f"{param} {msg}", param=param)

        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is not None and not in_int64(value):
                bad(name, f"must fit a 64-bit signed integer, got {value}.")
        if any(not in_int64(t) for t in self.stop_token_ids):
            bad("stop_token_ids", "must fit 64-bit signed integers.")
        if self.logit_bias and any(not in_int64(t) for t in self.logit_bias):
            bad("logit_bias", "keys must be token ids that fit a 64-bit signed integer.")
        if self.allowed_token_ids is not None and any(
                not in_int64(t) for t in self.allowed_token_ids):
            bad("allowed_token_ids", "must fit 64-bit signed integers.")
        if self.bad_words_token_ids and any(
                not in_int64(t) for word in self.bad_words_token_ids for t in word):
            bad("bad_words_token_ids", "must fit 64-bit signed integers.")
        if self.n < 1:
            bad("n", f"must be at least 1, got {self.n}.")
        if self.best_of is not None:
            if self.best_of < 1:
                bad("best_of", f"must be at least 1, got {self.best_of}.")
            if self.best_of < self.n:
                bad("best_of", f"must be greater than or equal to n, got n={self.n} and "
                    f"best_of={self.best_of}.")
        if not (self.temperature >= 0.0) or self.temperature > 100.0:
            bad("temperature", f"must be in [0, 100], got {self.temperature}.")
        if not (0.0 < self.top_p <= 1.0):
            bad("top_p", f"must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            bad("top_k", f"must be -1 or 0 (disabled) or a positive integer, got {self.top_k}.")
        if not (0.0 <= self.min_p <= 1.0):
            bad("min_p", f"must be in [0, 1], got {self.min_p}.")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (-2.0 <= value <= 2.0):
                bad(name, f"must be in [-2, 2], got {value}.")
        if not (0.0 < self.repetition_penalty <= 2.0):
            bad("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", f"must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            bad("min_tokens", f"must be at least 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"must not exceed max_tokens ({self.max_tokens}), got "
                f"{self.min_tokens}.")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                bad(name, f"must be non-negative, got {value}.")
        if any((not s) for s in self.stop):
            bad("stop", "must not contain empty strings.")
        if any(t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative token ids.")
        if self.truncate_prompt_tokens is not None and (
                self.truncate_prompt_tokens == 0 or self.truncate_prompt_tokens < -1):
            bad("truncate_prompt_tokens", f"must be an integer >= 1 or -1, got "
                f"{self.truncate_prompt_tokens}")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                bad("allowed_token_ids", "is not None and empty!")
            if any(t < 0 for t in self.allowed_token_ids):
                bad("allowed_token_ids", "contains out-of-vocab token id!")
        if self.bad_words is not None and any(not w.strip() for w in self.bad_words):
            bad("bad_words", "must not contain empty (or whitespace-only) words.")
        if self.bad_words_token_ids is not None and any(
                not word for word in self.bad_words_token_ids):
            bad("bad_words_token_ids", "must not contain empty token sequences.")
        if self.logit_bias:
            for token_id, bias in self.logit_bias.items():
                if not (-100.0 <= bias <= 100.0):
                    bad("logit_bias", f"values must be in [-100, 100], got {bias} for token "
                        f"{token_id}.")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def num_sequences(self) -> int:
        """How many samples the engine generates for one prompt: `best_of`, else `n`."""
        return self.best_of if self.best_of is not None else self.n

    def with_updates(self, **changes) -> "SamplingParams":
        """A validated copy with some fields changed."""
        return msgspec.structs.replace(self, **changes)

    def check_against_model(self, vocab_size: int, max_logprobs: int) -> None:
        """Validate the parts that depend on the served model."""
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > max_logprobs:
                raise InvalidRequestError(
                    f"{name} must be at most {max_logprobs} (--max-logprobs), got {value}.",
                    param=name)
        for token_id in self.stop_token_ids:
            if token_id >= vocab_size:
                raise InvalidRequestError(
                    f"stop_token_ids contains {token_id}, outside the vocabulary "
                    f"[0, {vocab_size}).", param="stop_token_ids")
        for token_id in (self.logit_bias or {}):
            if not (0 <= token_id < vocab_size):
                raise InvalidRequestError(
                    f"logit_bias key {token_id} is outside the vocabulary [0, {vocab_size}).",
                    param="logit_bias")
        if self.allowed_token_ids and any(t >= vocab_size for t in self.allowed_token_ids):
            raise InvalidRequestError("allowed_token_ids contains out-of-vocab token id!",
                                      param="allowed_token_ids")
        invalid = [t for word in self.bad_words_token_ids or () for t in word
                   if not 0 <= t < vocab_size]
        if invalid:
            raise InvalidRequestError(
                f"The model vocabulary size is {vocab_size}, but the following tokens were "
                f"specified as bad: {invalid}. All token id values should be integers "
                f"satisfying: 0 <= token_id <= {vocab_size - 1}.", param="bad_words")
