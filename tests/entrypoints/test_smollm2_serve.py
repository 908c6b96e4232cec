"""`sluice serve` on a real pretrained model's GGUF file (SmolLM2-135M-Instruct, Q4_1), driven
by the official `openai` client: the chat answer names Berlin, and a streamed answer is the
same text as the non-streamed one (greedy); structured output and a named tool call on the real
model parse and validate."""

from __future__ import annotations

import pytest

QUESTION = [{"role": "user", "content": "What is the capital of Germany?"}]


@pytest.fixture(scope="module")
def smollm2_server(start_server, smollm2_gguf):
    return start_server(smollm2_gguf, "--max-model-len", "1024", "--kv-cache-memory", "128MiB")


@pytest.fixture
def smollm2_client(smollm2_server):
    import openai
    with openai.OpenAI(base_url=smollm2_server.url + "/v1", api_key="none", max_retries=0,
                       timeout=120.0) as c:
        yield c


def test_served_gguf_answers_berlin_streamed_or_not(smollm2_client, smollm2_gguf):
    models = smollm2_client.models.list().data
    assert models[0].id == str(smollm2_gguf)  # the served name is the model as given
    plain = smollm2_client.chat.completions.create(
        model=models[0].id, messages=QUESTION, temperature=0, max_tokens=24)
    text = plain.choices[0].message.content
    assert "Berlin" in text, text
    stream = smollm2_client.chat.completions.create(
        model=models[0].id, messages=QUESTION, temperature=0, max_tokens=24, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream
                       if chunk.choices)
    assert streamed == text


CITY_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
               "properties": {"city": {"type": "string", "maxLength": 30},
                              "country": {"enum": ["Germany", "France", "Italy"]}}}


def test_real_model_json_schema_output_validates(smollm2_client, smollm2_gguf):
    """response_format json_schema on the real model: the output parses and validates, and
    the constrained answer still carries the model's knowledge."""
    import json
    import jsonschema
    reply = smollm2_client.chat.completions.create(
        model=str(smollm2_gguf), messages=QUESTION, temperature=0, max_tokens=60,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "capital", "schema": CITY_SCHEMA}})
    choice = reply.choices[0]
    value = json.loads(choice.message.content)
    jsonschema.validate(value, CITY_SCHEMA)
    assert choice.finish_reason == "stop"
    assert value["country"] == "Germany", value


def test_real_model_named_tool_call_parses(smollm2_client, smollm2_gguf):
    """A named tool_choice on the real model: one call to that function, its arguments valid
    for the declared parameters schema."""
    import json
    import jsonschema
    parameters = {"type": "object", "additionalProperties": False, "required": ["city"],
                  "properties": {"city": {"type": "string", "maxLength": 30}}}
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": parameters}}]
    reply = smollm2_client.chat.completions.create(
        model=str(smollm2_gguf), temperature=0, max_tokens=60, tools=tools,
        messages=[{"role": "user", "content": "What is the weather in Berlin?"}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls = reply.choices[0].message.tool_calls
    assert calls and len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), parameters)
