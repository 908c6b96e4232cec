"""`sluice serve --speculative-config` end to end with the official OpenAI client: streamed and
non-streamed greedy completions equal the shared plain server's (same model), a stop string
and logprobs behave as there, and /metrics carries vLLM's spec-decode counters."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from _sluice_server_helpers import API_KEY

PROMPT = "for i in range(10): print(i)\nfor i in range(10): print(i)\nfor i in range(10):"
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
        "prompt_lookup_max": 3}


@pytest.fixture(scope="module")
def spec_server(start_server, llama_dir):
    return start_server(llama_dir, "--speculative-config", json.dumps(SPEC),
                        "--served-model-name", "tiny-llama")


def _complete(url: str, api_key: str | None, **kwargs):
    """The completion (a streamed one: its text, joined before the client closes)."""
    with openai.OpenAI(base_url=url + "/v1", api_key=api_key or "none", max_retries=0,
                       timeout=60.0) as client:
        result = client.completions.create(model="tiny-llama", prompt=PROMPT, temperature=0.0,
                                           **kwargs)
        if kwargs.get("stream"):
            return "".join(chunk.choices[0].text for chunk in result if chunk.choices)
        return result


def test_completions_match_the_plain_server(server, spec_server):
    for kwargs in ({"max_tokens": 40}, {"max_tokens": 30, "logprobs": 2},
                   {"max_tokens": 40, "stop": ["print(3"]}):
        plain = _complete(server.url, API_KEY, **kwargs).choices[0]
        spec = _complete(spec_server.url, None, **kwargs).choices[0]
        assert spec.text == plain.text, kwargs
        assert spec.finish_reason == plain.finish_reason
        if "logprobs" in kwargs:
            assert spec.logprobs.tokens == plain.logprobs.tokens
            assert spec.logprobs.token_logprobs == pytest.approx(
                plain.logprobs.token_logprobs, abs=1e-4)
    streamed = _complete(spec_server.url, None, max_tokens=40, stream=True)
    assert streamed == _complete(server.url, API_KEY, max_tokens=40).choices[0].text


def test_metrics_show_drafts_and_acceptance(spec_server):
    _complete(spec_server.url, None, max_tokens=40)
    text = httpx.get(spec_server.url + "/metrics", timeout=30).text

    def value(name: str) -> float:
        match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
        assert match, name
        return float(match.group(1))

    drafts = value("vllm:spec_decode_num_draft_tokens_total")
    accepted = value("vllm:spec_decode_num_accepted_tokens_total")
    assert drafts > 0 and 0 < accepted <= drafts
    assert value("vllm:spec_decode_num_emitted_tokens_total") == (
        accepted + value("vllm:spec_decode_num_drafts_total"))
    assert value("vllm:spec_decode_draft_acceptance_rate") == pytest.approx(accepted / drafts)
