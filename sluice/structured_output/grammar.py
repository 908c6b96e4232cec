"""Constraint → llguidance grammar text, and the cheap validity check. Torch-free and
tokenizer-free, so the API-server process (and `LLM`) can run it on every request.

`grammar_text(params, config)` turns one `StructuredOutputsParams` into the grammar string an
`llguidance.LLMatcher` takes:

    json            LLMatcher.grammar_from_json_schema(schema, JSON options)
    json_object     the same, with the schema {"type": "object"}
    regex           LLMatcher.grammar_from_regex
    choice          llguidance.grammar_from("choice", the JSON list)
    grammar         llguidance.grammar_from("grammar", text): Lark, or GBNF/EBNF (llama.cpp's)
    structural_tag  vLLM's {"structures": [{begin, schema, end}], "triggers": [...]} →
                    llguidance.StructTag.to_grammar (free text, tagged JSON regions)

JSON options: `whitespace_flexible` unless `disable_any_whitespace` (request or server-wide);
`whitespace_pattern` when given; `disable_additional_properties` closes every object schema
that does not say otherwise (`additionalProperties: false`).

`check_structured_outputs(params, config)` compiles the grammar without a tokenizer
(`LLMatcher.validate_grammar`: schema, regex and grammar syntax; milliseconds) and raises
`InvalidRequestError` naming the field (`structured_outputs.json`, …; the caller may rename it
to the field the client sent, e.g. `response_format`).
"""

from __future__ import annotations

import collections
import json
from typing import Any

import msgspec

from sluice.errors import InvalidRequestError
from sluice.sampling_params import StructuredOutputsParams
from sluice.structured_output.config import StructuredOutputsConfig


def _param(kind: str) -> str:
    return f"structured_outputs.{kind}"


def grammar_text(params: StructuredOutputsParams, config: StructuredOutputsConfig) -> str:
    """The llguidance grammar for `params`; raises `InvalidRequestError` (param
    `structured_outputs.<kind>`) for input that is not even well-formed (bad JSON text)."""
    import llguidance
    from llguidance import LLMatcher

    kind = params.kind
    if kind in ("json", "json_object"):
        schema = _schema(params) if kind == "json" else {"type": "object"}
        if params.disable_additional_properties or config.disable_additional_properties:
            schema = close_objects(schema)
        options: dict[str, Any] = {
            "whitespace_flexible": not (params.disable_any_whitespace
                                        or config.disable_any_whitespace)}
        if params.whitespace_pattern:
            options["whitespace_pattern"] = params.whitespace_pattern
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults=options)
        except ValueError as e:
            raise InvalidRequestError(f"{_param(kind)}: invalid JSON schema: {e}",
                                      param=_param(kind)) from None
    if kind == "regex":
        return LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        return llguidance.grammar_from("choice", json.dumps(params.choice))
    if kind == "grammar":
        return llguidance.grammar_from("grammar", params.grammar)
    assert kind == "structural_tag"
    return _structural_tag_grammar(params.structural_tag)


def check_structured_outputs(params: StructuredOutputsParams,
                             config: StructuredOutputsConfig | None = None) -> None:
    """Raise `InvalidRequestError` naming `structured_outputs.<kind>` when the constraint does
    not compile (tokenizer-independent checks only). Constraints that passed are remembered
    (a small cache), so a client repeating one schema pays the check once."""
    key = msgspec.msgpack.encode((params, config))
    if key in _VALID:
        _VALID.move_to_end(key)
        return
    _check(params, config)
    _VALID[key] = None
    if len(_VALID) > 1024:
        _VALID.popitem(last=False)


_VALID: collections.OrderedDict[bytes, None] = collections.OrderedDict()


def _check(params: StructuredOutputsParams, config: StructuredOutputsConfig | None) -> None:
    from llguidance import LLMatcher

    text = grammar_text(params, config or StructuredOutputsConfig())
    try:
        error = LLMatcher.validate_grammar(text)
    except Exception as e:   # API misuse inside llguidance: report, never 500
        error = f"{type(e).__name__}: {e}"
    if error:
        kind = params.kind
        raise InvalidRequestError(f"{_param(kind)} is not a valid {_WHAT[kind]}: {error}",
                                  param=_param(kind))


_WHAT = {"json": "JSON schema", "json_object": "JSON object constraint", "regex":
         "regular expression", "choice": "choice list", "grammar": "grammar (Lark or GBNF)",
         "structural_tag": "structural tag"}


def _schema(params: StructuredOutputsParams) -> dict[str, Any]:
    schema = params.json
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"structured_outputs.json is not valid JSON: {e}",
                                      param="structured_outputs.json") from None
    if not isinstance(schema, dict):
        raise InvalidRequestError("structured_outputs.json must be a JSON schema object, got "
                                  f"{type(schema).__name__}.", param="structured_outputs.json")
    return schema


def close_objects(schema: Any) -> Any:
    """A copy of `schema` where every object schema (one with `properties` or type object)
    that does not set `additionalProperties` gets `additionalProperties: false`."""
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: close_objects(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and \
            "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _structural_tag_grammar(text: str | None) -> str:
    """vLLM's structural tag (JSON text) → a Lark grammar via `llguidance.StructTag`."""
    from llguidance import StructTag

    param = _param("structural_tag")
    try:
        spec = json.loads(text or "")
        structures, triggers = spec["structures"], spec["triggers"]
        tags = []
        for s in structures:
            trigger = next((t for t in triggers if s["begin"].startswith(t)), None)
            if trigger is None:
                raise ValueError(f"no trigger is a prefix of begin {s['begin']!r}")
            tags.append(StructTag(trigger=trigger, begin=s["begin"],
                                  grammar=s.get("schema", {}), end=s.get("end", "")))
        return StructTag.to_grammar(tags)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AssertionError) as e:
        raise InvalidRequestError(
            f"{param} must be JSON {{\"structures\": [{{\"begin\", \"schema\", \"end\"}}], "
            f"\"triggers\": [...]}} with each begin starting with a trigger: {e}",
            param=param) from None
