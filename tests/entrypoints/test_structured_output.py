"""Structured output end to end (issue 17): one `sluice serve` of the demo model (random-ish
weights: only the grammar makes its output valid), driven by the official `openai` client.

Every output of 20 JSON schemas parses and validates (jsonschema), streamed and not, n=3;
regex and choice outputs match exactly; a Lark and a GBNF grammar constrain the output; greedy
structured output is deterministic; malformed constraints are 400s naming the field. The
schemas are bounded (maxLength, maxItems, enums, integer bounds) so that the grammar can force
the end, and no output may stop at the length limit. The server runs with
`--structured-outputs-config '{"disable_any_whitespace": true,
"disable_additional_properties": true}'` (compact JSON, closed objects), so a random model
can wander neither in whitespace nor in extra keys.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import openai
import pytest

import sluice

DEMO_DIR = Path(sluice.__file__).resolve().parent / "assets" / "demo_model"
MAX_TOKENS = 300
S = {"type": "string", "maxLength": 6}

SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": S}, "required": ["name"]},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
     "required": ["color"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": S, "maxItems": 3}},
     "required": ["tags"]},
    {"type": "object", "properties": {"point": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                         "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"]}}, "required": ["point"]},
    {"type": "object", "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0,
                                                        "maximum": 999}, S]}},
     "required": ["id"]},
    {"type": "object", "properties": {"code": {"type": "string",
                                               "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
     "required": ["code"]},
    {"type": "object", "properties": {"a": S, "b": {"type": "integer", "minimum": 1,
                                                    "maximum": 5}},
     "required": ["a"]},                                                  # b optional
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 50},
     "minItems": 1, "maxItems": 4},
    {"enum": ["alpha", "beta", 3, None]},
    {"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]},
                                      "label": {"const": "fixed"}},
     "required": ["level", "label"]},
    {"type": "object", "properties": {"users": {
        "type": "array", "maxItems": 2, "items": {
            "type": "object", "properties": {"name": S, "admin": {"type": "boolean"}},
            "required": ["name", "admin"], "additionalProperties": False}}},
     "required": ["users"], "additionalProperties": False},
    {"type": "object", "properties": {"v": {"oneOf": [{"type": "boolean"}, {"type": "null"}]}},
     "required": ["v"]},
    {"type": "object", "properties": {"date": {"type": "string",
                                               "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
     "required": ["date"], "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "integer", "exclusiveMinimum": 0,
                                                "exclusiveMaximum": 10}},
     "required": ["score"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0,
                                                  "maximum": 9}}}},
     "required": ["matrix"]},
    {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]},
                                      "meta": {"type": "object", "properties": {"legs": {
                                          "type": "integer", "minimum": 0, "maximum": 4}},
                                          "required": ["legs"]}},
     "required": ["kind", "meta"], "additionalProperties": False},
    {"type": "object", "properties": {"pair": {"type": "array", "prefixItems": [S, {
        "type": "integer", "minimum": 0, "maximum": 9}], "items": False}},
     "required": ["pair"]},
    {"type": "object", "properties": {"word": {"type": "string", "minLength": 2,
                                               "maxLength": 4, "pattern": "^[a-z]+$"}},
     "required": ["word"]},
]


@pytest.fixture(scope="module")
def so_server(start_server):
    return start_server(DEMO_DIR, "--max-model-len", "1024", "--structured-outputs-config",
                        '{"backend": "auto", "disable_any_whitespace": true, '
                        '"disable_additional_properties": true}')


@pytest.fixture(scope="module")
def oai(so_server):
    with openai.OpenAI(base_url=so_server.url + "/v1", api_key="none", max_retries=0,
                       timeout=120.0) as c:
        yield c


def _check_json(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


def _chat(oai, schema: dict, i: int):
    return oai.chat.completions.create(
        model=oai.models.list().data[0].id, n=3, seed=i, temperature=1.0, max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": "Answer in JSON."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}})


def test_twenty_schemas_n3_every_output_validates(oai):
    assert len(SCHEMAS) >= 20
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda a: _chat(oai, *a), [(s, i) for i, s in
                                                              enumerate(SCHEMAS)]))
    for schema, response in zip(SCHEMAS, responses):
        assert len(response.choices) == 3
        for choice in response.choices:
            assert choice.finish_reason == "stop", (schema, choice.message.content)
            _check_json(choice.message.content, schema)


@pytest.mark.parametrize("i", [0, 5, 12, 17])
def test_streamed_completions_validate(oai, i):
    schema = SCHEMAS[i]
    stream = oai.completions.create(
        model=oai.models.list().data[0].id, prompt="JSON:", n=2, seed=7, max_tokens=MAX_TOKENS,
        stream=True, extra_body={"structured_outputs": {"json": schema}})
    texts, reasons = {}, {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert set(texts) == {0, 1} and reasons == {0: "stop", 1: "stop"}
    for text in texts.values():
        _check_json(text, schema)


def test_regex_choice_and_guided_fields_match_exactly(oai):
    model = oai.models.list().data[0].id
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    for extra in ({"structured_outputs": {"regex": pattern}}, {"guided_regex": pattern}):
        r = oai.completions.create(model=model, prompt="Code:", max_tokens=50, n=3, seed=3,
                                   extra_body=extra)
        for c in r.choices:
            assert re.fullmatch(pattern, c.text) and c.finish_reason == "stop", c.text
    choices = ["yes", "no", "maybe later"]
    r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "?"}],
                                    n=3, seed=1, max_tokens=20,
                                    extra_body={"guided_choice": choices})
    assert all(c.message.content in choices and c.finish_reason == "stop" for c in r.choices)


def test_lark_and_gbnf_grammars_constrain(oai):
    model = oai.models.list().data[0].id
    lark = 'start: greeting " " name\ngreeting: "hi" | "hello"\nname: /[a-z]{1,5}/'
    gbnf = 'root ::= ("up" | "down") "-" [0-9] [0-9]?'
    for grammar, pattern in ((lark, r"(hi|hello) [a-z]{1,5}"), (gbnf, r"(up|down)-[0-9]{1,2}")):
        r = oai.completions.create(model=model, prompt="Say:", max_tokens=30, n=2, seed=2,
                                   extra_body={"structured_outputs": {"grammar": grammar}})
        for c in r.choices:
            assert re.fullmatch(pattern, c.text), (grammar, c.text)


def test_greedy_structured_output_is_deterministic_with_logprobs_and_json_object(oai):
    model = oai.models.list().data[0].id
    kw = dict(model=model, messages=[{"role": "user", "content": "A JSON object please."}],
              temperature=0, max_tokens=MAX_TOKENS, logprobs=True, top_logprobs=2,
              response_format={"type": "json_schema", "json_schema": {
                  "name": "x", "schema": SCHEMAS[12]}})
    a, b = oai.chat.completions.create(**kw), oai.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    _check_json(a.choices[0].message.content, SCHEMAS[12])
    assert len(a.choices[0].logprobs.content) == a.usage.completion_tokens
    # json_object: whatever it writes up to a stop is one JSON object
    r = oai.chat.completions.create(model=model, messages=kw["messages"], max_tokens=60,
                                    seed=0, response_format={"type": "json_object"})
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_decoding_backend": "xgrammar", "guided_regex": "a"}, "guided_decoding_backend"),
    ({"structured_outputs": {"regex": "a", "bogus": 1}}, "structured_outputs"),
])
def test_malformed_constraints_are_400_naming_the_field(oai, body, param):
    model = oai.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                    max_tokens=5, extra_body=body)
    assert info.value.param == param, info.value
    ok = oai.completions.create(model=model, prompt="x", max_tokens=2)   # still serving
    assert ok.choices[0].finish_reason == "length"
