"""/v1/completions and /v1/models on a live `sluice serve`, through the official openai client."""

from __future__ import annotations

import pytest

PROMPT = "The quick brown fox"


def _tokenize(http, prompt: str) -> list[int]:
    response = http.post("/tokenize", json={"prompt": prompt})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 256
    return body["tokens"]


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-llama"]
    assert models[0].object == "model"


def test_greedy_completion_stream_equals_non_stream(client, http):
    full = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=12,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert full.id.startswith("cmpl-") and full.object == "text_completion"
    choice = full.choices[0]
    assert choice.finish_reason == "length" and choice.text
    prompt_ids = _tokenize(http, PROMPT)
    assert full.usage.prompt_tokens == len(prompt_ids)
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == len(prompt_ids) + 12

    chunks = list(client.completions.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_sends_a_chunk_per_token_with_empty_text(client):
    # <|pad|> (id 3) is special, so skipped in the text: every text delta is empty. As in vLLM,
    # each generated token still gets its chunk (streaming clients time tokens by chunks).
    chunks = list(client.completions.create(
        model="tiny-llama", prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
        logit_bias={"3": 100}, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True}))
    with_choices = [c for c in chunks if c.choices]
    assert [c.choices[0].text for c in with_choices] == [""] * 6
    assert [c.choices[0].finish_reason for c in with_choices] == [None] * 5 + ["length"]
    assert chunks[-1].usage.completion_tokens == 6

def test_token_id_prompt_equals_text_prompt(client, http):
    ids = _tokenize(http, PROMPT)
    by_text = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=6,
                                        temperature=0)
    by_ids = client.completions.create(model="tiny-llama", prompt=ids, max_tokens=6,
                                       temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_batch_of_prompts(client):
    prompts = ["Hello there", "Once upon a time", "import os"]
    result = client.completions.create(model="tiny-llama", prompt=prompts, max_tokens=5,
                                       temperature=0, n=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in result.choices) == list(range(6))
    assert result.usage.completion_tokens == 6 * 5
    greedy = {c.index: c.text for c in result.choices}
    for i in range(3):  # greedy samples of the same prompt agree
        assert greedy[2 * i] == greedy[2 * i + 1]
    token_batch = client.completions.create(model="tiny-llama", prompt=[[10, 11, 12], [13, 14]],
                                            max_tokens=3, temperature=0)
    assert [c.index for c in token_batch.choices] == [0, 1]
    assert token_batch.usage.prompt_tokens == 5


def test_echo_with_logprobs(client, http):
    ids = _tokenize(http, PROMPT)
    result = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=4,
                                       temperature=0, echo=True, logprobs=2,
                                       extra_body={"ignore_eos": True})
    choice = result.choices[0]
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs[1:])


def test_logprobs_of_generated_tokens(client):
    result = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=5,
                                       temperature=0, logprobs=3,
                                       extra_body={"ignore_eos": True})
    lp = result.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    if "\ufffd" not in "".join(lp.tokens):  # no token holding part of a UTF-8 character
        assert "".join(lp.tokens) == result.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 4  # top 3 + the chosen (entries with equal text merge)
        if token != "\ufffd":
            assert top[token] == pytest.approx(logprob)
            assert logprob == pytest.approx(max(top.values()))  # greedy: the best one


def test_n_samples_with_seed(client):
    result = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, n=2,
                                       temperature=1.0, seed=7)
    assert [c.index for c in result.choices] == [0, 1]
    again = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=8, n=2,
                                      temperature=1.0, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in result.choices]


def test_stop_string(client):
    base = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=24,
                                     temperature=0, extra_body={"ignore_eos": True})
    text = base.choices[0].text
    starts = [i for i in range(len(text) // 3, len(text) - 3) if text[i:i + 3].strip()]
    assert starts, f"greedy text without a usable stop string: {text!r}"
    stop = text[starts[0]:starts[0] + 3]
    result = client.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=24,
                                       temperature=0, stop=[stop],
                                       extra_body={"ignore_eos": True})
    assert result.choices[0].finish_reason == "stop"
    assert result.choices[0].text == text[:text.index(stop)]
    streamed = list(client.completions.create(model="tiny-llama", prompt=PROMPT,
                                              max_tokens=24, temperature=0, stop=stop,
                                              stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == result.choices[0].text
