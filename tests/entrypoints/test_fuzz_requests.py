"""Fuzz the request bodies of every POST route on the live shared server with `hypothesis`:
whatever a client sends, the answer is a 2xx or a 4xx in OpenAI's error shape — never a 5xx —
and the server keeps serving. The budget is bounded (`MAX_EXAMPLES`, derandomized so CI runs the
same examples every time).

Bodies mix the routes' real field names with values that are plausible, wrong-typed, huge
(beyond int64), non-finite (NaN and Infinity, which Python's JSON parser accepts), lone
surrogates, and nested containers.
"""

from __future__ import annotations

import json

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _sluice_server_helpers import API_KEY

MAX_EXAMPLES = 150

# Characters: ASCII, a few multi-byte ones, and lone surrogates (JSON's \ud800 escapes).
TEXT = st.text(alphabet=st.one_of(st.characters(max_codepoint=0x7F),
                                  st.sampled_from("é中😀\ud800\udfff\u0000")), max_size=12)
INTS = st.one_of(st.integers(-3, 40), st.integers(-2**80, 2**80),
                 st.sampled_from([2**63, 2**63 - 1, -2**63 - 1, 2**64]))
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
JSON = st.recursive(st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT),
                    lambda inner: st.one_of(st.lists(inner, max_size=4),
                                            st.dictionaries(TEXT, inner, max_size=4)),
                    max_leaves=8)


def maybe(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a plausible value, sometimes anything."""
    return st.one_of(plausible, plausible, JSON)


MESSAGE = st.fixed_dictionaries(
    {"role": maybe(st.sampled_from(["user", "assistant", "system", "tool"])),
     "content": maybe(st.one_of(TEXT, st.lists(st.fixed_dictionaries(
         {"type": maybe(st.just("text")), "text": maybe(TEXT)}), max_size=2)), )})
SAMPLING = {
    "model": maybe(st.sampled_from(["tiny-llama", "other"])),
    "max_tokens": maybe(st.integers(-2, 12)), "n": maybe(st.integers(-1, 3)),
    "best_of": JSON, "temperature": maybe(st.floats(-1, 3)), "top_p": maybe(st.floats(0, 1.5)),
    "top_k": INTS, "min_p": FLOATS, "seed": INTS, "priority": INTS, "stream": maybe(
        st.booleans()), "stream_options": maybe(st.fixed_dictionaries(
            {"include_usage": st.booleans()})), "stop": maybe(st.one_of(
                TEXT, st.lists(TEXT, max_size=3))), "stop_token_ids": maybe(st.lists(INTS,
                                                                                    max_size=3)),
    "logit_bias": maybe(st.dictionaries(st.one_of(TEXT, INTS.map(str)), FLOATS, max_size=3)),
    "presence_penalty": FLOATS, "frequency_penalty": FLOATS, "repetition_penalty": FLOATS,
    "min_tokens": INTS, "ignore_eos": JSON, "include_stop_str_in_output": JSON,
    "skip_special_tokens": JSON, "prompt_logprobs": INTS, "user": JSON,
}
COMPLETION = st.fixed_dictionaries({"prompt": maybe(st.one_of(
    TEXT, st.lists(INTS, max_size=4), st.lists(TEXT, max_size=3)))}, optional={
    **SAMPLING, "logprobs": INTS, "echo": JSON, "suffix": JSON, "add_special_tokens": JSON})
CHAT = st.fixed_dictionaries({"messages": maybe(st.lists(MESSAGE, max_size=3))}, optional={
    **SAMPLING, "logprobs": JSON, "top_logprobs": INTS, "max_completion_tokens": INTS,
    "add_generation_prompt": JSON, "chat_template": JSON, "chat_template_kwargs": JSON,
    "tools": JSON, "tool_choice": maybe(st.sampled_from(["none", "auto", "required"])),
    "response_format": maybe(st.fixed_dictionaries({"type": maybe(st.sampled_from(
        ["text", "json_object", "json_schema"]))}))})
TOKENIZE = st.one_of(
    st.fixed_dictionaries({"prompt": maybe(TEXT)}, optional={
        "model": JSON, "add_special_tokens": JSON}),
    st.fixed_dictionaries({"messages": maybe(st.lists(MESSAGE, max_size=2))}, optional={
        "chat_template_kwargs": JSON, "add_generation_prompt": JSON}))
DETOKENIZE = st.fixed_dictionaries({"tokens": maybe(st.lists(INTS, max_size=5))},
                                   optional={"model": JSON})
REQUESTS = st.one_of(st.tuples(st.just("/v1/completions"), COMPLETION),
                     st.tuples(st.just("/v1/chat/completions"), CHAT),
                     st.tuples(st.just("/tokenize"), TOKENIZE),
                     st.tuples(st.just("/detokenize"), DETOKENIZE),
                     st.tuples(st.sampled_from(["/v1/completions", "/tokenize"]), JSON))


def _check_error_shape(response: httpx.Response) -> None:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == response.status_code


def test_fuzzed_requests_never_get_a_5xx(server):
    with httpx.Client(base_url=server.url, timeout=120.0,
                      headers={"Authorization": f"Bearer {API_KEY}",
                               "Content-Type": "application/json"}) as client:

        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(REQUESTS)
        def check(request: tuple[str, object]) -> None:
            path, body = request
            response = client.post(path, content=json.dumps(body, allow_nan=True))
            assert response.status_code < 500, (path, body, response.text[:500])
            if response.status_code >= 400:
                _check_error_shape(response)
            elif "text/event-stream" in response.headers.get("content-type", ""):
                assert "InternalServerError" not in response.text, (path, body, response.text)

        check()
        assert httpx.get(server.url + "/health").status_code == 200
