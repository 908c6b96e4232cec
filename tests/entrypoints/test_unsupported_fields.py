"""Nothing silently dropped (issue 14): on a live `sluice serve`, through the official `openai`
client, every request field OpenAI or vLLM defines that sluice does not implement yet is a 400
naming it (`unsupported.REFUSED`), as is a field nobody defines; the values that ask for nothing
are accepted; the server keeps serving. Plus the pure checks: docs/openai_api.md lists every
refused field and every field the request models honour."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from sluice.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from sluice.entrypoints.openai.unsupported import REFUSED

USER = [{"role": "user", "content": "Name a colour."}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
DOCS = Path(__file__).resolve().parents[2] / "docs" / "openai_api.md"

# One request per refused field: (field, a value that asks for something).
REFUSED_CHAT = [
    ("structural_tag", "{}"),
    ("guided_decoding_backend", "xgrammar"),
    ("tools", [TOOL]),  # tool_choice "auto" without --enable-auto-tool-choice
    ("functions", [{"name": "f", "parameters": {}}]),
    ("function_call", "auto"),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("mm_processor_kwargs", {"num_crops": 4}),
    ("media_io_kwargs", {"image": {"x": 1}}),
    ("prediction", {"type": "content", "content": "hello"}),
    ("web_search_options", {"search_context_size": "low"}),
    ("moderation", {"input": "omni-moderation-latest"}),
    ("store", True),
    ("metadata", {"project": "x"}),
    ("service_tier", "flex"),
    ("prompt_cache_retention", "24h"),
    ("prompt_cache_options", {"ttl": "1h"}),
    ("reasoning_effort", "low"),
    ("verbosity", "low"),
    ("include_reasoning", False),
    ("use_beam_search", True),
    ("length_penalty", 0.5),
    ("logits_processors", ["my.module.Processor"]),
    ("repetition_detection", {"n": 3}),
    ("return_token_ids", True),
    ("kv_transfer_params", {"do_remote_decode": True}),
    ("vllm_xargs", {"x": 1}),
    ("not_a_field", 1),
    ("temprature", 0.5),  # a typo must not silently fall back to the default
]
REFUSED_COMPLETION = [
    ("prompt_embeds", "AAAA"),
    ("suffix", "end"),
    ("tools", [TOOL]),
    ("logits_processors", ["my.module.Processor"]),
    ("vllm_xargs", {"x": 1}),
    ("echo_prompt", True),
]


def _param(error: openai.APIStatusError) -> str | None:
    assert error.status_code == 400, error
    assert error.type == "BadRequestError" and error.body["code"] == 400
    return error.param


@pytest.mark.parametrize("field,value", REFUSED_CHAT, ids=[f for f, _ in REFUSED_CHAT])
def test_chat_refuses(client, field, value):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-llama", messages=USER, max_tokens=1,
                                       extra_body={field: value})
    assert _param(info.value) == field
    assert field in info.value.message


@pytest.mark.parametrize("field,value", REFUSED_COMPLETION,
                         ids=[f for f, _ in REFUSED_COMPLETION])
def test_completion_refuses(client, field, value):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=1,
                                  extra_body={field: value})
    assert _param(info.value) == field


@pytest.mark.parametrize("kind,part", [
    ("image_url", {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}),
    ("input_audio", {"type": "input_audio", "input_audio": {"data": "AA==", "format": "wav"}}),
    ("video_url", {"type": "video_url", "video_url": {"url": "http://x/v.mp4"}}),
    ("file", {"type": "file", "file": {"file_id": "file-1"}}),
])
def test_non_text_content_parts_are_refused(client, kind, part):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny-llama", max_tokens=1,
            messages=[{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                                   part]}])
    assert _param(info.value) == "messages" and kind in info.value.message


def test_stream_option_and_other_refusals(client, http):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-llama", messages=USER, max_tokens=1,
                                       stream=True,
                                       stream_options={"include_obfuscation": True})
    assert _param(info.value) == "stream_options.include_obfuscation"
    response = http.post("/v1/completions", json={
        "prompt": "Hi", "max_tokens": 1, "stream": True, "stream_options": {"bogus": True}})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "stream_options.bogus"
    # fcfs would ignore a priority: refused unless --scheduling-policy priority
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny-llama", prompt="Hi", max_tokens=1,
                                  extra_body={"priority": 3})
    assert _param(info.value) == "priority"
    # prompt_logprobs are not streamed
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny-llama", prompt="Hi", max_tokens=1, stream=True,
                                  extra_body={"prompt_logprobs": 1})
    assert _param(info.value) == "prompt_logprobs"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="tiny-llama", messages=USER, max_tokens=1, stream=True,
            stream_options={"include_usage": False, "continuous_usage_stats": True})
    assert _param(info.value) == "stream_options.continuous_usage_stats"
    # tool_choice other than none needs tools (malformed, not merely unsupported)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-llama", messages=USER, max_tokens=1,
                                       tool_choice="auto")
    assert _param(info.value) == "tool_choice"


def test_neutral_values_are_accepted_and_the_server_keeps_serving(client):
    """Values that ask for what sluice does anyway, identifiers, and nulls are fine."""
    result = client.chat.completions.create(
        model="tiny-llama", messages=USER, max_tokens=2, temperature=0, store=False,
        metadata={}, modalities=["text"], service_tier="auto", user="u-1",
        safety_identifier="s-1", prompt_cache_key="k", response_format={"type": "text"},
        tools=[TOOL], tool_choice="none",
        extra_body={"guided_json": None, "use_beam_search": False, "length_penalty": 1.0,
                    "include_reasoning": True, "vllm_xargs": {}, "not_a_field": None})
    assert result.choices[0].finish_reason in ("length", "stop")
    result = client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=2,
                                       suffix="", extra_body={"return_token_ids": False})
    assert result.choices[0].text is not None


def test_docs_list_every_field():
    """docs/openai_api.md names every refused field and every field the models honour."""
    text = DOCS.read_text()
    missing = [name for name in REFUSED if f"`{name}`" not in text]
    for model in (CompletionRequest, ChatCompletionRequest):
        missing += [name for name in model.model_fields
                    if name not in REFUSED and f"`{name}`" not in text]
    assert not missing, f"docs/openai_api.md does not mention {sorted(set(missing))}"
