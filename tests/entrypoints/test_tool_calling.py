"""Tool calling end to end (issue 17, item 3) on a live `sluice serve` of the built-in demo
model, through the official `openai` client: tool_choice "required" and named calls are
enforced by structured output, so their arguments validate against the declared schema
(streaming and not); "auto" with the hermes and llama3_json parsers finds the calls in an
output forced by a `choice` constraint, and answers plain text as content; tool results reach
the next turn's template; the 400s name the field.

Two servers for this module: `hermes_server` (--enable-auto-tool-choice --tool-call-parser
hermes, request templates trusted) and `llama3_server` (--tool-call-parser llama3_json). The
"auto without the flags" 400s use the shared session server."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest

import sluice

DEMO_DIR = Path(sluice.__file__).resolve().parent / "assets" / "demo_model"
MODEL = "demo"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_PARAMS = {"type": "object", "properties": {
    "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
    "unit": {"type": "string", "enum": ["c", "f"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit"], "additionalProperties": False}
TIME_PARAMS = {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}},
               "required": ["tz"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME_PARAMS}}]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}' \
              '\n</tool_call>'
LLAMA_CALL = '{"name": "get_time", "parameters": {"tz": "UTC"}}'


def _server(start_server, *flags: str):
    return start_server(DEMO_DIR, "--served-model-name", MODEL, *flags)


@pytest.fixture(scope="module")
def hermes_server(start_server):
    server = _server(start_server, "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                     "--trust-request-chat-template")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llama3_server(start_server):
    server = _server(start_server, "--enable-auto-tool-choice", "--tool-call-parser",
                     "llama3_json")
    yield server
    server.stop()


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                         timeout=120.0)


@pytest.fixture(scope="module")
def hermes(hermes_server):
    with _client(hermes_server) as c:
        yield c


def assert_valid_calls(calls, names=None) -> None:
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def stream_final(client: openai.OpenAI, **kwargs):
    """The message the `openai` client's streaming helper accumulates from the deltas."""
    with client.chat.completions.stream(model=MODEL, messages=USER, **kwargs) as stream:
        for _ in stream:
            pass
        # (get_final_completion would raise on finish_reason "length")
        return stream.current_completion_snapshot.choices[0]


@pytest.mark.parametrize("stream", [False, True])
def test_required_calls_validate(hermes, stream):
    """Streamed with parallel_tool_calls false (maxItems 1: exactly one call)."""
    kwargs = dict(tools=TOOLS, tool_choice="required", temperature=0, max_tokens=80)
    if stream:
        choice = stream_final(hermes, parallel_tool_calls=False, **kwargs)
        assert len(choice.message.tool_calls or []) == 1
    else:
        choice = hermes.chat.completions.create(model=MODEL, messages=USER,
                                                **kwargs).choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert_valid_calls(choice.message.tool_calls, SCHEMAS)
    assert not choice.message.content


@pytest.mark.parametrize("stream", [False, True])
def test_named_call_validates(hermes, stream):
    kwargs = dict(tools=TOOLS, tool_choice={"type": "function",
                                            "function": {"name": "get_time"}},
                  temperature=0.8, seed=3, max_tokens=60)
    if stream:
        choice = stream_final(hermes, **kwargs)
    else:
        choice = hermes.chat.completions.create(model=MODEL, messages=USER, **kwargs).choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
    assert_valid_calls(choice.message.tool_calls)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_hermes_parses_the_call(hermes, stream):
    """The output is forced to one hermes call (a `choice` constraint); the parser finds it."""
    kwargs = dict(tools=TOOLS, max_tokens=60, extra_body={
        "structured_outputs": {"choice": [HERMES_CALL]}})
    if stream:
        choice = stream_final(hermes, **kwargs)
    else:
        choice = hermes.chat.completions.create(model=MODEL, messages=USER, **kwargs).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments))
            for c in choice.message.tool_calls] == [("get_weather", {"city": "Oslo",
                                                                     "unit": "c"})]
    assert not choice.message.content


@pytest.mark.parametrize("stream", [False, True])
def test_auto_plain_text_is_content(hermes, stream):
    kwargs = dict(tools=TOOLS, tool_choice="auto", max_tokens=8, temperature=0)
    if stream:
        choice = stream_final(hermes, **kwargs)
    else:
        choice = hermes.chat.completions.create(model=MODEL, messages=USER, **kwargs).choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str) and not choice.message.tool_calls


def test_tool_choice_none_is_content(hermes):
    choice = hermes.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS,
                                            tool_choice="none", max_tokens=4).choices[0]
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls


TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}{% endif %}"
    "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL:{{ c.function.name }}({{ c.function.arguments.city }})"
    "{% endfor %}{% if m.tool_call_id %}ID:{{ m.tool_call_id }}{% endif %}{% endfor %}[assistant]")


def test_tools_and_tool_results_reach_the_template(hermes):
    """The tools, an assistant turn's tool_calls (arguments decoded for the template) and a
    tool result with its tool_call_id are all rendered (read back from prompt_logprobs)."""
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "chatcmpl-tool-1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "chatcmpl-tool-1", "content": "12 C"}]
    result = hermes.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=1,
        extra_body={"chat_template": TEMPLATE, "prompt_logprobs": 0})
    prompt = "".join(next(e["decoded_token"] for tid, e in position.items())
                     for position in result.prompt_logprobs[1:])
    # (the first prompt token has no logprobs entry, so the prompt is read from the second)
    for piece in ("OOLS:get_weather;get_time;", "CALL:get_weather(Oslo)",
                  "ID:chatcmpl-tool-1", "12 C"):
        assert piece in prompt, prompt


@pytest.mark.parametrize("stream", [False, True])
def test_auto_llama3_json_parses_the_call(llama3_server, stream):
    with _client(llama3_server) as client:
        kwargs = dict(tools=TOOLS, max_tokens=60, extra_body={
            "structured_outputs": {"choice": [LLAMA_CALL]}})
        if stream:
            choice = stream_final(client, **kwargs)
        else:
            choice = client.chat.completions.create(model=MODEL, messages=USER,
                                                    **kwargs).choices[0]
        assert choice.finish_reason == "tool_calls"
        assert [(c.function.name, json.loads(c.function.arguments))
                for c in choice.message.tool_calls] == [("get_time", {"tz": "UTC"})]
        plain = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS,
                                               max_tokens=4, temperature=0).choices[0]
        assert plain.finish_reason in ("stop", "length") and not plain.message.tool_calls


def _param(call) -> str | None:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    assert info.value.status_code == 400
    return info.value.param


def test_errors_name_the_field(hermes, client):
    named = {"type": "function", "function": {"name": "get_stock"}}
    assert _param(lambda: hermes.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice=named)) == "tool_choice"
    assert _param(lambda: hermes.chat.completions.create(
        model=MODEL, messages=USER, tool_choice="required")) == "tool_choice"
    assert _param(lambda: hermes.chat.completions.create(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
        extra_body={"structured_outputs": {"regex": "a+"}})) == "tool_choice"
    # the shared server has no --enable-auto-tool-choice
    assert _param(lambda: client.chat.completions.create(
        model="tiny-llama", messages=USER, tools=TOOLS, tool_choice="auto")) == "tool_choice"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-llama", messages=USER, tools=TOOLS)
    assert info.value.param == "tools" and "--enable-auto-tool-choice" in info.value.message
    # and both servers keep serving
    assert hermes.chat.completions.create(model=MODEL, messages=USER, max_tokens=1).choices
