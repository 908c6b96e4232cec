"""`sluice serve` on a real pretrained model's GGUF file (SmolLM2-135M-Instruct, Q4_1), driven
by the official `openai` client: the chat answer names Berlin, and a streamed answer is the
same text as the non-streamed one (greedy)."""

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
