"""Request fields that must be honoured (issue 14, item 3), on a live `sluice serve` with the
official `openai` client: vLLM's `prompt_logprobs` (values checked against HF transformers),
`stream_options.continuous_usage_stats`, chat `echo` and `continue_final_message`,
`return_tokens_as_token_ids`, the body's `request_id`, `cache_salt`; and `documents` reaching
the chat template. Greedy decoding throughout, nothing depends on timing."""

from __future__ import annotations

import math

import pytest
import torch

from _sluice_server_helpers import API_KEY

USER = [{"role": "user", "content": "Name a colour."}]
GREEDY = {"model": "tiny-llama", "temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def hf_logprobs(llama_dir):
    """token ids -> HF transformers' log_softmax at every position ([len, vocab], fp32)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()

    def run(token_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([token_ids])).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)
    return run


def _check_prompt_logprobs(entries, token_ids, ref, k, tokenizer_decode):
    assert len(entries) == len(token_ids) and entries[0] is None
    for i in range(1, len(token_ids)):
        position, row = entries[i], ref[i - 1]
        token = token_ids[i]
        top = torch.topk(row, k).indices.tolist()
        assert set(position) == {str(t) for t in [token, *top]}, (i, position)
        for key, entry in position.items():
            tid = int(key)
            assert set(entry) == {"logprob", "rank", "decoded_token"}
            assert math.isclose(entry["logprob"], row[tid].item(), abs_tol=1e-4)
            assert entry["rank"] == int((row > row[tid]).sum()) + 1
            assert entry["decoded_token"] == tokenizer_decode(tid)


def test_completion_prompt_logprobs_match_hf(client, http, hf_logprobs, llama_dir):
    from sluice.frontend.tokenizer import load_tokenizer
    decode_token = load_tokenizer(llama_dir).decode_token
    token_ids = http.post("/tokenize", json={"prompt": "The function returns a list of"}
                          ).json()["tokens"]
    result = client.completions.create(prompt=token_ids, max_tokens=1, n=2,
                                       **{**GREEDY, "extra_body": {"prompt_logprobs": 2}})
    ref = hf_logprobs(token_ids)
    for choice in result.choices:  # every choice of the prompt carries them, as in vLLM
        _check_prompt_logprobs(choice.model_extra["prompt_logprobs"], token_ids, ref, 2,
                               decode_token)
    # Not asked for: null, also with echo + logprobs (which compute them internally).
    plain = client.completions.create(prompt=token_ids, max_tokens=1, echo=True, logprobs=1,
                                      **GREEDY)
    assert plain.choices[0].model_extra["prompt_logprobs"] is None
    assert plain.choices[0].logprobs.token_logprobs[0] is None


def test_chat_prompt_logprobs_at_top_level(client, http, hf_logprobs):
    result = client.chat.completions.create(messages=USER, max_tokens=1,
                                            **{**GREEDY, "extra_body": {"prompt_logprobs": 0}})
    token_ids = http.post("/tokenize", json={"messages": USER}).json()["tokens"]
    entries = result.model_extra["prompt_logprobs"]
    assert len(entries) == result.usage.prompt_tokens == len(token_ids)
    ref = hf_logprobs(token_ids)
    for i in range(1, len(token_ids)):  # k = 0: the prompt token only
        [(key, entry)] = entries[i].items()
        assert int(key) == token_ids[i]
        assert math.isclose(entry["logprob"], ref[i - 1][token_ids[i]].item(), abs_tol=1e-4)


def test_continuous_usage_stats(client):
    chunks = list(client.completions.create(
        prompt="Once upon a time", max_tokens=6, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, **GREEDY))
    with_choices = [c for c in chunks if c.choices]
    assert all(c.usage is not None for c in chunks)
    generated = [c.usage.completion_tokens for c in with_choices]
    assert generated == sorted(generated) and generated[-1] == 6
    assert len({c.usage.prompt_tokens for c in chunks}) == 1
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
               for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6

    chunks = list(client.chat.completions.create(
        messages=USER, max_tokens=5, stream=True, n=2,
        stream_options={"continuous_usage_stats": True}, **GREEDY))  # implies include_usage
    assert all(c.usage is not None for c in chunks)
    for index in (0, 1):
        counts = [c.usage.completion_tokens for c in chunks
                  if c.choices and c.choices[0].index == index]
        assert counts[0] == 0 and counts == sorted(counts) and counts[-1] == 5
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    # Without the option, chunks carry no usage.
    plain = list(client.completions.create(prompt="Hi", max_tokens=2, stream=True, **GREEDY))
    assert all(c.usage is None for c in plain)


PREFILL = [{"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "The answer is"}]
RENDERED = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nThe answer is"


def test_continue_final_message_continues_the_assistant_message(client):
    cont = client.chat.completions.create(
        messages=PREFILL, max_tokens=6,
        **{**GREEDY, "extra_body": {"ignore_eos": True, "add_generation_prompt": False,
                                    "continue_final_message": True}})
    same = client.completions.create(prompt=RENDERED, max_tokens=6, **{
        **GREEDY, "extra_body": {"ignore_eos": True, "add_special_tokens": False}})
    assert cont.choices[0].message.content == same.choices[0].text
    assert cont.usage.prompt_tokens == same.usage.prompt_tokens
    # Echo (vLLM): the continued message is prepended, also when streamed.
    echoed = client.chat.completions.create(
        messages=PREFILL, max_tokens=6,
        **{**GREEDY, "extra_body": {"ignore_eos": True, "add_generation_prompt": False,
                                    "continue_final_message": True, "echo": True}})
    assert echoed.choices[0].message.content == "The answer is" + same.choices[0].text
    chunks = list(client.chat.completions.create(
        messages=PREFILL, max_tokens=6, stream=True,
        **{**GREEDY, "extra_body": {"ignore_eos": True, "add_generation_prompt": False,
                                    "continue_final_message": True, "echo": True}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == echoed.choices[0].message.content
    # Both a generation prompt and a continued message: a 400 naming the field.
    import openai
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(messages=PREFILL, max_tokens=1, **{
            **GREEDY, "extra_body": {"continue_final_message": True}})
    assert info.value.param == "continue_final_message"


def test_chat_echo_only_echoes_an_assistant_message(client):
    plain = client.chat.completions.create(messages=PREFILL, max_tokens=4, **GREEDY)
    echoed = client.chat.completions.create(messages=PREFILL, max_tokens=4, **{
        **GREEDY, "extra_body": {"ignore_eos": True, "echo": True}})
    assert echoed.choices[0].message.content == "The answer is" + plain.choices[0].message.content
    user_last = client.chat.completions.create(messages=USER, max_tokens=4, **{
        **GREEDY, "extra_body": {"ignore_eos": True, "echo": True}})
    again = client.chat.completions.create(messages=USER, max_tokens=4, **GREEDY)
    assert user_last.choices[0].message.content == again.choices[0].message.content


def test_return_tokens_as_token_ids(client):
    result = client.completions.create(prompt="Hello there", max_tokens=3, logprobs=2, **{
        **GREEDY, "extra_body": {"ignore_eos": True, "return_tokens_as_token_ids": True}})
    logprobs = result.choices[0].logprobs
    assert all(t.startswith("token_id:") and t[9:].isdigit() for t in logprobs.tokens)
    assert all(k.startswith("token_id:") for top in logprobs.top_logprobs for k in top)
    chat = client.chat.completions.create(messages=USER, max_tokens=3, logprobs=True,
                                          top_logprobs=1, **{**GREEDY, "extra_body": {
                                              "ignore_eos": True,
                                              "return_tokens_as_token_ids": True}})
    for entry in chat.choices[0].logprobs.content:
        assert entry.token.startswith("token_id:") and entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].token == entry.token


def test_request_id_and_cache_salt(client, http):
    result = client.completions.create(prompt="Hi", max_tokens=2, **{
        **GREEDY, "extra_body": {"request_id": "my-req.1", "cache_salt": "salt-a"}})
    assert result.id == "cmpl-my-req.1"
    unsalted = client.completions.create(prompt="Hi", max_tokens=2, **GREEDY)
    assert unsalted.choices[0].text == result.choices[0].text
    chat = client.chat.completions.create(messages=USER, max_tokens=1, **{
        **GREEDY, "extra_body": {"request_id": "chat-7"}})
    assert chat.id == "chatcmpl-chat-7"
    # The X-Request-Id header wins over the body, as in vLLM.
    response = http.post("/v1/completions", headers={"X-Request-Id": "from-header",
                                                     "Authorization": f"Bearer {API_KEY}"},
                         json={"prompt": "Hi", "max_tokens": 1, "request_id": "from-body"})
    assert response.json()["id"] == "cmpl-from-header"
    bad = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1,
                                             "cache_salt": ""})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt"


def test_documents_reach_the_chat_template(tiny_tokenizer_dir):
    from sluice.entrypoints.openai.protocol import ChatCompletionRequest
    from sluice.frontend.tokenizer import load_tokenizer
    request = ChatCompletionRequest(messages=USER, documents=[{"title": "T1", "text": "x"}])
    kwargs = request.template_kwargs()
    assert kwargs["documents"] == [{"title": "T1", "text": "x"}]
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    text = tokenizer.apply_chat_template(
        request.conversation(), **{**kwargs, "chat_template":
                                   "{% for d in documents %}[{{ d.title }}]{% endfor %}"})
    assert text == "[T1]"
