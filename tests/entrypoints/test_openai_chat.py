"""/v1/chat/completions, /tokenize and /detokenize on a live `sluice serve` (openai client)."""

from __future__ import annotations

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."}]


def _chat_prompt_tokens(http) -> int:
    response = http.post("/tokenize", json={"messages": MESSAGES})
    assert response.status_code == 200, response.text
    return response.json()["count"]


def test_chat_stream_equals_non_stream(client, http):
    full = client.chat.completions.create(model="tiny-llama", messages=MESSAGES,
                                          max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion"
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert full.usage.prompt_tokens == _chat_prompt_tokens(http)
    assert full.usage.completion_tokens == 10

    chunks = list(client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and not first.delta.content
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == choice.message.content
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_stream_sends_a_chunk_per_token_with_empty_text(client):
    # <|pad|> (id 3) is special, so skipped in the text: every content delta is empty. As in
    # vLLM, each generated token still gets its chunk (streaming clients time tokens by chunks).
    chunks = list(client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=5, temperature=0, stream=True,
        logit_bias={"3": 100}, extra_body={"ignore_eos": True}))
    deltas = [c.choices[0] for c in chunks if c.choices]
    assert deltas[0].delta.role == "assistant"
    assert [d.delta.content for d in deltas[1:-1]] == [""] * 5
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert deltas[-1].finish_reason == "length"

def test_chat_logprobs(client):
    result = client.chat.completions.create(model="tiny-llama", messages=MESSAGES,
                                            max_tokens=5, temperature=0, logprobs=True,
                                            top_logprobs=2, extra_body={"ignore_eos": True})
    content = result.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the best
    streamed = list(client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True,
        top_logprobs=2, stream=True, extra_body={"ignore_eos": True}))
    tokens = [e.token for c in streamed if c.choices and c.choices[0].logprobs
              for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in content]


def test_chat_n_and_max_completion_tokens(client):
    result = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, n=2,
                                            max_completion_tokens=3, temperature=0.8, seed=1,
                                            extra_body={"ignore_eos": True})
    assert [c.index for c in result.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in result.choices)
    assert result.usage.completion_tokens == 6
    chunks = list(client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, n=2, max_completion_tokens=3, stream=True,
        extra_body={"ignore_eos": True}))
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role]
    assert sorted(roles) == [0, 1]
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


def test_tokenize_detokenize_roundtrip(http):
    tokens = http.post("/tokenize", json={"model": "tiny-llama",
                                          "prompt": "Hello, world!"}).json()["tokens"]
    back = http.post("/detokenize", json={"model": "tiny-llama", "tokens": tokens})
    assert back.status_code == 200 and back.json() == {"prompt": "Hello, world!"}
    bad = http.post("/detokenize", json={"tokens": [10 ** 9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
