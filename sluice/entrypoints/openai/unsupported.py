"""The request fields of OpenAI's and vLLM's completion and chat APIs that sluice does not
implement yet, in one table (`REFUSED`), and the check both request models run
(`check_fields`). Documented in docs/openai_api.md.

Contract (issue 14, "nothing silently dropped"): a request field is honoured or answered with a
400 naming it (`InvalidRequestError(param=<field>)`), never a 200 without it.
* A field in `REFUSED` is refused when it asks for something: any value but null, an empty list
  or object, and the values its entry calls neutral (they ask for what sluice does anyway, e.g.
  `modalities: ["text"]`, `store: false`, `service_tier: "auto"`). A dotted name
  (`stream_options.include_obfuscation`) is a key of a top-level object.
* A top-level field that neither the endpoint's request model nor `REFUSED` knows is refused
  too (a misspelt `temprature` must not fall back to the default unnoticed); null counts as
  absent.
The table is checked in its order, so a request gets the first refusal. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from sluice.errors import InvalidRequestError

Body = Mapping[str, Any]
"""A request's fields: parsed values for the fields its model defines, raw JSON for others."""


def absent(value: Any) -> bool:
    """Null, an empty list or an empty object: asks for nothing."""
    return value is None or (isinstance(value, (list, dict, tuple)) and not value)


def _same(value: Any, neutral: Any) -> bool:
    if isinstance(value, bool) or isinstance(neutral, bool):
        return type(value) is type(neutral) and value == neutral
    return value == neutral


def neutral_values(*values: Any) -> Callable[[Any, Body], bool]:
    """A predicate: absent, or equal to one of `values` (booleans never equal numbers)."""
    return lambda value, body: absent(value) or any(_same(value, v) for v in values)


@dataclass(frozen=True)
class Refusal:
    """`what`: what the field asks for, in words; `accepts(value, body)`: True when the value
    asks for nothing sluice does not do; `accepted`: those values, in words, for the message
    and the docs; `message`: a whole message instead of the generated one."""

    what: str
    accepts: Callable[[Any, Body], bool] = lambda value, body: absent(value)
    accepted: str = ""
    message: str | None = None

    def error(self, name: str) -> InvalidRequestError:
        if self.message is not None:
            return InvalidRequestError(self.message, param=name)
        also = f" (or {self.accepted})" if self.accepted else ""
        return InvalidRequestError(
            f"{name} is not supported by this server yet ({self.what}); leave it out or send "
            f"null{also}.", param=name)


_NO_FUNCTIONS = "the deprecated function calling; send tools and tool_choice"
_TEXT_ONLY = "sluice serves text-only models"
_NO_REASONING = "sluice has no reasoning parser"

REFUSED: dict[str, Refusal] = {
    # Structured output (response_format, structured_outputs, guided_*) is honoured: see
    # structured.py.
    # The deprecated function-calling fields (tools, tool_choice and parallel_tool_calls are
    # honoured: see tools.py).
    "functions": Refusal(_NO_FUNCTIONS),
    "function_call": Refusal(_NO_FUNCTIONS, neutral_values("none"), "\"none\""),
    # Other modalities and hosted features.
    "audio": Refusal(f"audio output; {_TEXT_ONLY}"),
    "modalities": Refusal(_TEXT_ONLY, neutral_values(["text"]), "[\"text\"]"),
    "mm_processor_kwargs": Refusal(_TEXT_ONLY),
    "media_io_kwargs": Refusal(_TEXT_ONLY),
    "prompt_embeds": Refusal("prompts given as embeddings"),
    "prediction": Refusal("predicted outputs"),
    "web_search_options": Refusal("web search"),
    "moderation": Refusal("moderation"),
    "store": Refusal("stored completions; sluice stores none", neutral_values(False), "false"),
    "metadata": Refusal("metadata of stored completions; sluice stores none"),
    "service_tier": Refusal("service tiers", neutral_values("auto", "default"),
                            "\"auto\" or \"default\""),
    "prompt_cache_retention": Refusal("a prompt-cache lifetime; the prefix cache keeps blocks "
                                      "while memory allows", neutral_values("in_memory"),
                                      "\"in_memory\""),
    "prompt_cache_options": Refusal("prompt-cache options"),
    "stream_options.include_obfuscation": Refusal("stream obfuscation",
                                                  neutral_values(False), "false"),
    # Reasoning models.
    "reasoning_effort": Refusal(f"reasoning effort; {_NO_REASONING}"),
    "verbosity": Refusal("output verbosity"),
    "include_reasoning": Refusal(f"reasoning apart from the answer; {_NO_REASONING}, so "
                                 "reasoning text stays in the content",
                                 neutral_values(True), "true"),
    # Completions.
    "suffix": Refusal("insertion before a suffix", neutral_values("")),
    # vLLM's sampling and engine extras.
    "use_beam_search": Refusal("beam search", neutral_values(False), "false"),
    "length_penalty": Refusal("beam search's length penalty", neutral_values(1.0), "1.0"),
    "logits_processors": Refusal("custom logits processors"),
    "repetition_detection": Refusal("stopping on repeated n-grams"),
    "return_token_ids": Refusal("token ids in the response", neutral_values(False), "false"),
    "vllm_xargs": Refusal("arguments for vLLM extensions"),
}


def _lookup(body: Body, name: str) -> tuple[bool, Any]:
    """(present, value) of `name` in `body`; a dotted name looks one level down."""
    head, _, tail = name.partition(".")
    if head not in body:
        return False, None
    value = body[head]
    if not tail:
        return True, value
    if isinstance(value, Mapping):
        return tail in value, value.get(tail)
    if value is not None and tail in (getattr(value, "model_fields_set", None) or ()):
        return True, getattr(value, tail)
    return False, None


def printable_name(name: str, limit: int = 64) -> str:
    """`name` safe to put in an error body: lone surrogates escaped, at most `limit` chars."""
    text = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= limit else text[:limit] + "..."


def check_fields(body: Body, known: Iterable[str], endpoint: str) -> None:
    """Raise `InvalidRequestError(param=<field>)` for the first field of `body` that `REFUSED`
    refuses, else for the first (sorted) field not in `known` whose value is not null."""
    for name, refusal in REFUSED.items():
        present, value = _lookup(body, name)
        if present and not refusal.accepts(value, body):
            raise refusal.error(name)
    known_names = set(known)
    unknown = sorted(str(k) for k, v in body.items()
                     if k not in known_names and k not in REFUSED and v is not None)
    if unknown:
        name = printable_name(unknown[0])
        raise InvalidRequestError(
            f"Unknown field {name!r}: {endpoint} does not define it (see docs/openai_api.md for "
            "the fields this server honours).", param=name)
