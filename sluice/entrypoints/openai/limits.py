"""Bounds on the work one request may ask for, checked before anything is tokenized, rendered
or fanned out (a 400 naming the field, or a 413 for the body, which the body-size middleware
answers before the endpoint runs).

| bound                                   | default                       | set by                     |
|-----------------------------------------|-------------------------------|----------------------------|
| request body bytes                      | 8 MiB                         | --max-request-body-bytes   |
| `n`, `best_of`                          | 128                           | --max-n                    |
| prompts x max(n, best_of) per request   | 1024                          | `MAX_SEQUENCES_PER_REQUEST`|
| characters of a text prompt / rendering | 32 x max_model_len            | --max-prompt-chars         |
| `stop` strings, characters each         | 32, 256                       | `MAX_STOP_STRINGS`, ...    |
| `stop_token_ids` entries                | 1024                          | `MAX_STOP_TOKEN_IDS`       |
| `logit_bias` entries                    | 1024                          | `MAX_LOGIT_BIAS`           |
| `allowed_token_ids` entries             | 262144                        | `MAX_ALLOWED_TOKEN_IDS`    |
| `bad_words`, characters each            | 128, 256                      | `MAX_BAD_WORDS`, ...       |
| `truncate_prompt_tokens`                | max_model_len                 | `InputProcessor`           |
| integers                                | signed 64-bit                 | `SamplingParams`           |

The characters bound is generous (a token averages 3-5 characters; no tokenizer here makes
32-character tokens on average), so it only refuses prompts that could never fit the context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sluice.config import EngineConfig
from sluice.errors import InvalidRequestError

MAX_SEQUENCES_PER_REQUEST = 1024
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024
MAX_ALLOWED_TOKEN_IDS = 262144  # the largest vocabularies in use
MAX_BAD_WORDS = 128
MAX_BAD_WORD_CHARS = 256
CHARS_PER_TOKEN_BOUND = 32
REQUEST_TEMPLATE_TIME_LIMIT_S = 2.0
"""How long a chat template sent by a request may take to render (with
--trust-request-chat-template); longer is a 400 naming chat_template."""


@dataclass(frozen=True)
class RequestLimits:
    """The bounds of one server (see the module table)."""

    max_n: int
    max_prompt_chars: int
    trust_request_chat_template: bool

    @classmethod
    def from_config(cls, config: EngineConfig, max_model_len: int) -> "RequestLimits":
        server = config.server
        return cls(max_n=server.max_n,
                   max_prompt_chars=server.max_prompt_chars
                   or CHARS_PER_TOKEN_BOUND * max_model_len,
                   trust_request_chat_template=server.trust_request_chat_template)

    def check_sampling(self, body: Any, num_prompts: int) -> None:
        """`body` is a completion or chat request (`SamplingFields`) holding `num_prompts`
        prompts: bound n, best_of, the sequences it fans out to, stops, logit_bias,
        allowed_token_ids and bad_words."""
        for name in ("n", "best_of"):
            value = getattr(body, name)
            if value is not None and value > self.max_n:
                raise InvalidRequestError(f"{name} must be at most {self.max_n} (--max-n), got "
                                          f"{value}.", param=name)
        per_prompt, name = body.n, "n"
        if body.best_of is not None and body.best_of > body.n:
            per_prompt, name = body.best_of, "best_of"
        sequences = num_prompts * per_prompt
        if sequences > MAX_SEQUENCES_PER_REQUEST:
            raise InvalidRequestError(
                f"This request asks for {num_prompts} prompt(s) x {name}={per_prompt} = "
                f"{sequences} sequences; at most {MAX_SEQUENCES_PER_REQUEST} are allowed per "
                "request.", param=name if num_prompts == 1 else "prompt")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got "
                                      f"{len(stops)}.", param="stop")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in stops):
            raise InvalidRequestError(f"each stop string may be at most "
                                      f"{MAX_STOP_STRING_CHARS} characters long.", param="stop")
        if body.stop_token_ids is not None and len(body.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} "
                                      "ids.", param="stop_token_ids")
        if body.logit_bias is not None and len(body.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, "
                                      f"got {len(body.logit_bias)}.", param="logit_bias")
        allowed = body.allowed_token_ids
        if allowed is not None and len(allowed) > MAX_ALLOWED_TOKEN_IDS:
            raise InvalidRequestError(f"allowed_token_ids may hold at most "
                                      f"{MAX_ALLOWED_TOKEN_IDS} ids, got {len(allowed)}.",
                                      param="allowed_token_ids")
        words = body.bad_words or []
        if len(words) > MAX_BAD_WORDS:
            raise InvalidRequestError(f"bad_words may hold at most {MAX_BAD_WORDS} words, got "
                                      f"{len(words)}.", param="bad_words")
        if any(len(w) > MAX_BAD_WORD_CHARS for w in words):
            raise InvalidRequestError(f"each bad word may be at most {MAX_BAD_WORD_CHARS} "
                                      "characters long.", param="bad_words")

    def check_prompt_chars(self, text: str, param: str) -> None:
        """A text prompt (or rendered conversation) longer than `max_prompt_chars` is a 400:
        it could not fit the context, and tokenizing it would cost seconds."""
        if len(text) > self.max_prompt_chars:
            raise InvalidRequestError(
                f"The {param} is {len(text)} characters long; this server accepts at most "
                f"{self.max_prompt_chars} characters before tokenization (--max-prompt-chars).",
                param=param)

    def template_time_limit(self, kwargs: dict[str, Any]) -> float | None:
        """The render time limit for template keywords `kwargs`: None for the model's own
        template; a request-supplied one is a 400 unless --trust-request-chat-template."""
        if "chat_template" not in kwargs:
            return None
        if not self.trust_request_chat_template:
            raise InvalidRequestError(
                "This server does not render chat templates sent in requests; start it with "
                "--trust-request-chat-template to allow them.", param="chat_template")
        return REQUEST_TEMPLATE_TIME_LIMIT_S
