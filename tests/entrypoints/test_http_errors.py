"""Every error case on a live server, over raw HTTP: status code, OpenAI's error shape, the
field named in `param`, and that the server still answers a normal request afterwards."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from _sluice_server_helpers import API_KEY


def assert_error(response: httpx.Response, status: int, err_type: str,
                 param: str | None = "<any>") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == err_type and error["code"] == status and error["message"]
    if param != "<any>":
        assert error["param"] == param, error
    return error


def assert_still_serving(http: httpx.Client) -> None:
    ok = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] >= 1


BAD_COMPLETIONS = [
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "logprobs": -1}, "logprobs"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "stream": "yes please"}, "stream"),
    ({"prompt": "x", "suffix": "tail"}, "suffix"),
    ({"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": 12}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [5, 100000]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": "x", "stop_token_ids": [10 ** 6]}, "stop_token_ids"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
]


@pytest.mark.parametrize("body,param", BAD_COMPLETIONS,
                         ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD_COMPLETIONS)])
def test_bad_completion_request_is_400(http, body, param):
    assert_error(http.post("/v1/completions", json=body), 400, "BadRequestError", param)
    assert_still_serving(http)


def test_malformed_json_is_400(http):
    response = http.post("/v1/completions", content=b'{"prompt": "x",',
                         headers={"Content-Type": "application/json"})
    error = assert_error(response, 400, "BadRequestError")
    assert "JSON" in error["message"]
    assert_error(http.post("/v1/chat/completions", content=b"[1, 2",
                           headers={"Content-Type": "application/json"}), 400,
                 "BadRequestError")
    assert_error(http.post("/tokenize", content=b"nope"), 400, "BadRequestError")
    assert_still_serving(http)


def test_bad_chat_requests_are_400(http):
    cases = [({"messages": "hello"}, "messages"),
             ({"messages": [{"content": "no role"}]}, "messages.0.role"),
             ({"messages": []}, "messages"),
             ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
              "top_logprobs"),
             ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
              "max_tokens")]
    for body, param in cases:
        assert_error(http.post("/v1/chat/completions", json=body), 400, "BadRequestError",
                     param)
    assert_still_serving(http)


def test_unknown_model_is_404(http):
    for path, body in (("/v1/completions", {"model": "gpt-9", "prompt": "x"}),
                       ("/v1/chat/completions",
                        {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})):
        error = assert_error(http.post(path, json=body), 404, "NotFoundError", "model")
        assert "gpt-9" in error["message"]
    assert_error(http.get("/v1/nothing-here"), 404, "NotFoundError")
    assert_still_serving(http)


def test_context_length_is_400_with_vllm_wording(http):
    long_prompt = list(range(10, 210))  # 200 tokens + 100 > max_model_len 256
    error = assert_error(http.post("/v1/completions",
                                   json={"prompt": long_prompt, "max_tokens": 100}),
                         400, "BadRequestError", "max_tokens")
    assert error["message"].startswith("This model's maximum context length is 256 tokens.")
    error = assert_error(http.post("/v1/completions", json={"prompt": list(range(10, 310))}),
                         400, "BadRequestError", "prompt")
    assert "maximum context length is 256" in error["message"]
    chat = {"messages": [{"role": "user", "content": "word " * 400}]}
    error = assert_error(http.post("/v1/chat/completions", json=chat), 400,
                         "BadRequestError", "messages")
    assert "maximum context length is 256" in error["message"]
    assert_still_serving(http)


def test_auth(server):
    url = server.url + "/v1/completions"
    body = {"prompt": "x", "max_tokens": 1}
    assert_error(httpx.post(url, json=body), 401, "AuthenticationError")
    assert_error(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}), 401,
                 "AuthenticationError")
    assert_error(httpx.get(server.url + "/v1/models"), 401, "AuthenticationError")
    assert httpx.get(server.url + "/health").status_code == 200  # only /v1/* needs the key
    ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200


def test_request_id_header_is_echoed(http):
    response = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                         headers={"X-Request-Id": "my-req-42"})
    assert response.headers["x-request-id"] == "my-req-42"
    assert response.json()["id"] == "cmpl-my-req-42"
    generated = http.get("/v1/models").headers["x-request-id"]
    assert generated and generated != "my-req-42"
    error = http.post("/v1/completions", json={"prompt": ""},
                      headers={"X-Request-Id": "bad-one"})
    assert error.headers["x-request-id"] == "bad-one"


def test_cors_only_for_allowed_origins(server):
    preflight = {"Access-Control-Request-Method": "POST"}
    ok = httpx.options(server.url + "/v1/completions",
                       headers={"Origin": "http://allowed.example", **preflight})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "http://allowed.example"
    other = httpx.options(server.url + "/v1/completions",
                          headers={"Origin": "http://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers


def test_version_and_metrics(http):
    assert http.get("/version").json()["version"]
    text = http.get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                 "vllm:request_success_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket",
                 "vllm:request_prompt_tokens_bucket",
                 "vllm:request_generation_tokens_bucket"):
        assert name in text, name
    assert 'model_name="tiny-llama"' in text


def test_chat_without_template_is_400(limited_server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    error = assert_error(httpx.post(limited_server.url + "/v1/chat/completions", json=body),
                         400, "BadRequestError", "messages")
    assert "chat template" in error["message"]
    ok = httpx.post(limited_server.url + "/v1/completions", json={"prompt": "hi",
                                                                   "max_tokens": 2})
    assert ok.status_code == 200


def test_too_many_queued_requests_is_429(limited_server):
    """One runs (--max-num-seqs 1), one may wait (--max-num-queued-requests 1); more get 429."""
    url = limited_server.url + "/v1/completions"
    body = {"prompt": "Count to a hundred", "max_tokens": 30, "ignore_eos": True}
    # long enough to still be running when the four requests arrive, even on a fast engine
    with httpx.stream("POST", url, json={**body, "max_tokens": 1000, "stream": True},
                      timeout=120.0) as running:
        assert running.status_code == 200
        lines = running.iter_lines()
        next(line for line in lines if line.startswith("data:"))  # it is running now

        def post(_: int) -> httpx.Response:
            return httpx.post(url, json=body, timeout=120.0)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(post, range(4)))
        assert [line for line in lines if line][-1] == "data: [DONE]"
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 429, 429, 429], codes
    for response in responses:
        if response.status_code == 429:
            assert_error(response, 429, "RateLimitError")
            assert int(response.headers["retry-after"]) >= 1
    assert httpx.post(url, json={"prompt": "x", "max_tokens": 2}).status_code == 200
