"""The tool-call parsers (hermes, llama3_json, and the constrained modes' named / required
parsers) on known text: non-streaming results, and streaming fed piece by piece whose deltas,
accumulated the way the `openai` client does, equal the non-streaming result. Plus the
request → plan rules (schemas, 400s) and the plugin registry. No server, no torch."""

from __future__ import annotations

import json
import random
import textwrap

import jsonschema
import pytest

from sluice.config import ServerConfig
from sluice.entrypoints.openai.protocol import ChatCompletionRequest
from sluice.entrypoints.openai.tool_parsers import ToolParser, ToolParserManager
from sluice.entrypoints.openai.tool_parsers.json_scan import partial_prefix_len, scan_object
from sluice.entrypoints.openai.tools import (NamedCallParser, RequiredCallsParser, ToolStream,
                                             plan_tools, required_schema)
from sluice.errors import ConfigError, InvalidRequestError
from sluice.sampling_params import SamplingParams

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"},
                                     "unit": {"enum": ["c", "f"]}},
    "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
USER = [{"role": "user", "content": "hi"}]


def hermes() -> ToolParser:
    return ToolParserManager.get_tool_parser("hermes")()


def llama3() -> ToolParser:
    return ToolParserManager.get_tool_parser("llama3_json")()


def calls_of(info) -> list[tuple[str, object]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in info.tool_calls]


def accumulate(stream: ToolStream, pieces: list[str]) -> dict:
    """Feed `pieces`, then finish; accumulate the deltas as the openai client does."""
    message: dict = {"content": None, "tool_calls": []}
    deltas = [stream.feed(p, [0]) for p in pieces] + [stream.finish()]
    for delta in deltas:
        if delta is None:
            continue
        data = delta.model_dump()
        if "content" in data:
            message["content"] = (message["content"] or "") + data["content"]
        for piece in data.get("tool_calls", []):
            calls = message["tool_calls"]
            if piece["index"] == len(calls):
                assert {"id", "type"} <= set(piece) and "name" in piece["function"], piece
                assert piece["id"].startswith("chatcmpl-tool-") and piece["type"] == "function"
                calls.append({"name": piece["function"]["name"],
                              "arguments": piece["function"].get("arguments", "")})
            else:
                assert piece["index"] == len(calls) - 1 or piece["index"] < len(calls)
                assert set(piece) == {"index", "function"}, piece  # no repeated id/name
                assert set(piece["function"]) == {"arguments"}
                calls[piece["index"]]["arguments"] += piece["function"]["arguments"]
    return message


def splits(text: str) -> list[list[str]]:
    """The text fed one character at a time, and in random chunks (fixed seed)."""
    rng = random.Random(0)
    chunked, i = [], 0
    while i < len(text):
        size = rng.randint(1, 7)
        chunked.append(text[i:i + size])
        i += size
    return [list(text), chunked]


def assert_stream_matches(make_parser, text: str) -> None:
    final = make_parser().extract_tool_calls(text, None)
    for pieces in splits(text):
        got = accumulate(ToolStream(make_parser(), None), pieces)
        # (a stream's first chunk carries content "", so "" and None read the same)
        assert (got["content"] or "") == (final.content or ""), (pieces, got)
        assert [(c["name"], c["arguments"]) for c in got["tool_calls"]] == \
            [(c.function.name, c.function.arguments) for c in final.tool_calls]


HERMES_TEXTS = [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris",'
    ' "unit": "c"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n'
    '</tool_call>',
    'Before <tool_call>{"arguments": {"city": "Oslo"}, "name": "get_weather"}</tool_call> after',
    '<tool_call>{"name": "get_time"}</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}',  # no end marker
    "Just text, with a <tool in it and a < sign.",
    "",
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Lima"}}</tool_call>\n\n',
]


@pytest.mark.parametrize("text", HERMES_TEXTS)
def test_hermes_streaming_equals_non_streaming(text):
    assert_stream_matches(hermes, text)


def test_hermes_results():
    info = hermes().extract_tool_calls(HERMES_TEXTS[1], None)
    assert info.tools_called and info.content == "Let me check."
    assert calls_of(info) == [("get_weather", {"city": 'Pa"ris', "unit": "c"}),
                              ("get_time", {})]
    assert all(c.id.startswith("chatcmpl-tool-") and c.type == "function"
               for c in info.tool_calls)
    info = hermes().extract_tool_calls(HERMES_TEXTS[2], None)
    assert info.content == "Beforeafter"
    assert calls_of(info) == [("get_weather", {"city": "Oslo"})]
    assert calls_of(hermes().extract_tool_calls(HERMES_TEXTS[3], None)) == [("get_time", {})]
    info = hermes().extract_tool_calls(HERMES_TEXTS[4], None)
    assert info.content is None and calls_of(info) == [("get_weather", {"city": "Rome"})]
    info = hermes().extract_tool_calls(HERMES_TEXTS[5], None)
    assert not info.tools_called and info.content == HERMES_TEXTS[5]


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "get_weather", "arguments": {"city": }}</tool_call>',
    '<tool_call>{"name": 5, "arguments": {}}</tool_call>',
    '<tool_call>not json</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "X"}} trailing</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "X"',  # cut off
    "ok <tool_call></tool_call>",
])
def test_hermes_malformed_is_plain_content(text):
    info = hermes().extract_tool_calls(text, None)
    assert not info.tools_called and info.tool_calls == [] and info.content == text
    stream = ToolStream(hermes(), None)
    for ch in text:
        stream.feed(ch, [0])
    stream.finish()  # never raises


LLAMA_TEXTS = [
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
    '{"name": "get_time", "parameters": {}}',
    '  {"name": "get_time", "arguments": {"tz": "UTC"}}',
    'Calling now <|python_tag|>{"name": "get_time", "parameters": {}}',
    "The weather is nice {maybe}.",
    '{"answer": 42}',
]


@pytest.mark.parametrize("text", LLAMA_TEXTS)
def test_llama3_json_streaming_equals_non_streaming(text):
    assert_stream_matches(llama3, text)


def test_llama3_json_results():
    assert calls_of(llama3().extract_tool_calls(LLAMA_TEXTS[0], None)) == [
        ("get_weather", {"city": "Paris"})]
    info = llama3().extract_tool_calls(LLAMA_TEXTS[1], None)
    assert info.content is None
    assert calls_of(info) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert calls_of(llama3().extract_tool_calls(LLAMA_TEXTS[2], None)) == [
        ("get_time", {"tz": "UTC"})]
    info = llama3().extract_tool_calls(LLAMA_TEXTS[3], None)
    assert info.content == "Calling now" and calls_of(info) == [("get_time", {})]
    for text in LLAMA_TEXTS[4:] + ['{"name": "f", "parameters": {"a": 1}} and then text',
                                   '{"name": "f", "parameters": {"a": ']:
        info = llama3().extract_tool_calls(text, None)
        assert not info.tools_called and info.content == text


def test_named_and_required_parsers():
    text = '{"city": "Paris", "unit": "c"}'
    assert_stream_matches(lambda: NamedCallParser("get_weather"), text)
    info = NamedCallParser("get_weather").extract_tool_calls(text, None)
    assert calls_of(info) == [("get_weather", {"city": "Paris", "unit": "c"})]
    assert not NamedCallParser("f").extract_tool_calls('{"city": "Par', None).tools_called
    text = ('[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
            '{"parameters": {}, "name": "get_time"}]')
    assert_stream_matches(RequiredCallsParser, text)
    info = RequiredCallsParser().extract_tool_calls(text, None)
    assert info.content is None
    assert calls_of(info) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    for bad in ('[{"name": "get_weather", "parameters": {"city": ', "[]", "{}", "nope"):
        info = RequiredCallsParser().extract_tool_calls(bad, None)
        assert not info.tools_called and info.content == bad
        got = accumulate(ToolStream(RequiredCallsParser(), None), list(bad))
        if not got["tool_calls"]:  # else cut off after a call went out (finish "length")
            assert got["content"] == bad


def test_single_call_stream_sends_only_the_first():
    text = HERMES_TEXTS[1]
    got = accumulate(ToolStream(hermes(), None, single_call=True), list(text))
    assert [c["name"] for c in got["tool_calls"]] == ["get_weather"]


def test_json_scan_pieces():
    scan = scan_object('{"a": [1, {"b": "}"}], "c": tr', 0, final=False)
    assert [m[0] for m in scan.members] == ["a", "c"] and scan.end is None
    assert scan.members[1][2] is None  # "tr" may still grow
    assert partial_prefix_len("abc<tool_c", "<tool_call>") == 7
    assert partial_prefix_len("abc", "<tool_call>") == 0


# ---------------------------------------------------------------------------------------------
# Request → plan

def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=USER, **fields)


AUTO = ServerConfig(enable_auto_tool_choice=True, tool_call_parser="hermes")


def test_plan_modes_and_schemas():
    plan = plan_tools(request(tools=[WEATHER, TIME]), AUTO)
    assert plan.mode == "auto" and plan.schema is None
    assert plan.sampling_params(SamplingParams()).skip_special_tokens is False
    assert plan_tools(request(tools=[WEATHER], tool_choice="none"), ServerConfig()).mode == "none"
    plan = plan_tools(request(tools=[WEATHER, TIME], tool_choice={
        "type": "function", "function": {"name": "get_weather"}}), ServerConfig())
    assert plan.mode == "named" and plan.schema == WEATHER["function"]["parameters"]
    params = plan.sampling_params(SamplingParams())
    assert params.structured_outputs.json == WEATHER["function"]["parameters"]
    plan = plan_tools(request(tools=[WEATHER, TIME], tool_choice="required"), ServerConfig())
    schema = plan.schema
    assert schema["minItems"] == 1 and "maxItems" not in schema
    jsonschema.Draft202012Validator.check_schema(schema)
    good = [{"name": "get_weather", "parameters": {"city": "Paris"}},
            {"name": "get_time", "parameters": {}}]
    jsonschema.validate(good, schema)
    for bad in ([], [{"name": "get_weather", "parameters": {}}],
                [{"name": "nope", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    single = plan_tools(request(tools=[WEATHER, TIME], tool_choice="required",
                                parallel_tool_calls=False), ServerConfig()).schema
    assert single["maxItems"] == 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(good, single)


def test_required_schema_hoists_defs():
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}},
        "$defs": {"P": {"type": "integer"}}}}}
    schema = required_schema(request(tools=[tool]).tools, True)
    assert schema["$defs"] == {"P": {"type": "integer"}}
    jsonschema.validate([{"name": "f", "parameters": {"p": 3}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "f", "parameters": {"p": "x"}}], schema)


@pytest.mark.parametrize("fields,server,param", [
    ({"tools": [WEATHER], "tool_choice": "auto"}, ServerConfig(), "tool_choice"),
    ({"tools": [WEATHER]}, ServerConfig(), "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     AUTO, "tool_choice"),
    ({"tool_choice": "required"}, AUTO, "tool_choice"),
])
def test_plan_errors_name_the_field(fields, server, param):
    with pytest.raises(InvalidRequestError) as info:
        plan_tools(request(**fields), server)
    assert info.value.param == param


def test_constraint_conflict_is_400():
    plan = plan_tools(request(tools=[WEATHER], tool_choice="required"), ServerConfig())
    from sluice.sampling_params import StructuredOutputsParams
    with pytest.raises(InvalidRequestError) as info:
        plan.sampling_params(SamplingParams(
            structured_outputs=StructuredOutputsParams(regex="a+")))
    assert info.value.param == "tool_choice"


def test_plugin_registers_a_parser(tmp_path):
    plugin = tmp_path / "my_parser.py"
    plugin.write_text(textwrap.dedent('''
        from sluice.entrypoints.openai.tool_parsers import (
            ExtractedToolCallInformation, ToolParser, ToolParserManager)
        from sluice.entrypoints.openai.protocol import FunctionCall, ToolCall

        @ToolParserManager.register_module(["shout_test"])
        class Shout(ToolParser):
            def extract_tool_calls(self, model_output, request):
                if not model_output.startswith("CALL "):
                    return ExtractedToolCallInformation(False, [], model_output)
                return ExtractedToolCallInformation(True, [ToolCall(
                    id="chatcmpl-tool-1", function=FunctionCall(
                        name=model_output[5:], arguments="{}"))], None)
    '''))
    server = ServerConfig(enable_auto_tool_choice=True, tool_call_parser="shout_test",
                          tool_parser_plugin=str(plugin))
    plan = plan_tools(request(tools=[TIME]), server)
    content, calls = plan.message("CALL get_time", None, None)
    assert content is None and calls[0].function.name == "get_time"
    with pytest.raises(ConfigError, match="--tool-call-parser"):
        plan_tools(request(tools=[TIME]), ServerConfig(
            enable_auto_tool_choice=True, tool_call_parser="no_such_parser"))
    with pytest.raises(ConfigError, match="--tool-parser-plugin"):
        plan_tools(request(tools=[TIME]), ServerConfig(
            enable_auto_tool_choice=True, tool_call_parser="x",
            tool_parser_plugin=str(tmp_path / "missing.py")))


def test_a_schema_that_does_not_compile_is_400_naming_tools():
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nonsense"}}}}}
    for choice in ("required", {"type": "function", "function": {"name": "f"}}):
        plan = plan_tools(request(tools=[tool], tool_choice=choice), ServerConfig())
        with pytest.raises(InvalidRequestError) as info:
            plan.sampling_params(SamplingParams())
        assert info.value.param == "tools"
