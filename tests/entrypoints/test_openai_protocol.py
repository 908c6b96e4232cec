"""Pure parts of the HTTP layer: request parsing and conversion to SamplingParams, logprob
formatting, validation-error mapping, metrics, the stats log line, port binding, and the
`bench serve` report. No server, no engine."""

from __future__ import annotations

import logging
import socket

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from sluice.bench.datasets import BenchRequest
from sluice.bench.serve import RequestResult, format_report, make_payload, summarize
from sluice.entrypoints.openai.chat import chat_logprobs
from sluice.entrypoints.openai.completions import completion_logprobs
from sluice.entrypoints.openai.errors import error_from_exception, validation_error
from sluice.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest,
                                                DeltaMessage)
from sluice.entrypoints.serve_cmd import bind_socket
from sluice.errors import EngineDeadError, InvalidRequestError, SluiceError
from sluice.frontend.stats import FinishedRequestStats, FrontendStats
from sluice.messages import SchedulerStats
from sluice.metrics.loggers import LoggingStatLogger
from sluice.metrics.prometheus import PrometheusMetrics, build_1_2_5_buckets
from sluice.outputs import Logprob
from sluice.sampling_params import RequestOutputKind


@pytest.mark.parametrize("prompt,expected", [
    ("hi", ["hi"]), (["a", "b"], ["a", "b"]), ([1, 2], [[1, 2]]),
    ([[1], [2, 3]], [[1], [2, 3]]), ([], [[]]), (["1"], ["1"]),
])
def test_completion_prompts(prompt, expected):
    assert CompletionRequest(prompt=prompt).prompts() == expected


def test_completion_sampling_params():
    req = CompletionRequest(prompt="x", max_tokens=5, temperature=0, logprobs=2, echo=True,
                            stop="##", seed=3, top_k=4, ignore_eos=True, stream=True,
                            logit_bias={"7": 1.5})
    params = req.to_sampling_params()
    assert params.max_tokens == 5 and params.logprobs == 2 and params.prompt_logprobs == 2
    assert params.stop == ["##"] and params.seed == 3 and params.top_k == 4
    assert params.ignore_eos and params.logit_bias == {7: 1.5}
    assert params.output_kind == RequestOutputKind.DELTA
    assert CompletionRequest(prompt="x").to_sampling_params().output_kind == \
        RequestOutputKind.FINAL_ONLY
    assert CompletionRequest(prompt="x").to_sampling_params().max_tokens == 16


@pytest.mark.parametrize("fields,param", [
    ({"suffix": "s"}, "suffix"), ({"n": 3, "best_of": 2}, "best_of"),
    ({"temperature": -1}, "temperature"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"not_a_field": 1}, "not_a_field"),  # unknown fields are refused, not ignored
])
def test_completion_rejections(fields, param):
    with pytest.raises(InvalidRequestError) as info:
        CompletionRequest(prompt="x", **fields).to_sampling_params()
    assert info.value.param == param


def test_chat_request():
    req = ChatCompletionRequest(
        messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                               {"type": "text", "text": "b"}]}],
        max_tokens=9, max_completion_tokens=4, logprobs=True, top_logprobs=3)
    assert req.conversation() == [{"role": "user", "content": "a\nb"}]
    params = req.to_sampling_params()
    assert params.max_tokens == 4 and params.logprobs == 3
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]
                                 ).to_sampling_params().max_tokens is None
    with pytest.raises(InvalidRequestError) as info:
        ChatCompletionRequest(messages=[{"role": "user", "content": "x"}],
                              top_logprobs=2).to_sampling_params()
    assert info.value.param == "top_logprobs"
    image = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    with pytest.raises(InvalidRequestError):
        image.conversation()


def test_delta_message_leaves_out_none():
    assert DeltaMessage(role="assistant", content="").model_dump() == \
        {"role": "assistant", "content": ""}
    assert DeltaMessage(content="x").model_dump() == {"content": "x"}
    assert DeltaMessage().model_dump() == {}


def _validation_error(model, data) -> RequestValidationError:
    try:
        model.model_validate(data)
    except ValidationError as e:
        return RequestValidationError([{**err, "loc": ("body", *err["loc"])}
                                       for err in e.errors()])
    raise AssertionError("no validation error")


def test_validation_error_names_the_field():
    message, param = validation_error(_validation_error(CompletionRequest, {"prompt": 3}))
    assert param == "prompt" and "prompt" in message
    message, param = validation_error(
        _validation_error(CompletionRequest, {"prompt": "x", "temperature": "hot"}))
    assert param == "temperature"
    message, param = validation_error(
        _validation_error(ChatCompletionRequest, {"messages": [{"content": "x"}]}))
    assert param == "messages.0.role"


def test_error_from_exception():
    status, body = error_from_exception(InvalidRequestError("bad n", param="n"))
    assert status == 400 and body["error"] == {"message": "bad n", "type": "BadRequestError",
                                               "param": "n", "code": 400}
    status, body = error_from_exception(EngineDeadError())
    assert status == 503 and body["error"]["type"] == "ServiceUnavailableError"
    status, body = error_from_exception(RuntimeError("secret internals"))
    assert status == 500 and "secret" not in body["error"]["message"]


class _Tok:
    def decode_token(self, token_id: int) -> str:
        return f"<{token_id}>"


def test_completion_logprobs_format():
    positions = [None, {5: Logprob(-0.1, 1, "a"), 6: Logprob(-2.0, 2, "b")},
                 {9: Logprob(-3.0, 3, "zz"), 5: Logprob(-0.2, 1, "a"), 6: Logprob(-1.0, 2, "b")}]
    out = completion_logprobs([4, 5, 9], positions, _Tok(), num_top=1, text_offset=10)
    assert out.tokens == ["<4>", "a", "zz"]
    assert out.token_logprobs == [None, -0.1, -3.0]
    assert out.top_logprobs == [None, {"a": -0.1}, {"zz": -3.0, "a": -0.2}]
    assert out.text_offset == [10, 13, 14]


def test_chat_logprobs_format():
    positions = [{9: Logprob(float("-inf"), 3, "é"), 5: Logprob(-0.2, 1, "a"),
                  6: Logprob(-1.0, 2, None)}]
    content = chat_logprobs([9], positions, _Tok(), num_top=2).content
    assert content[0].token == "é" and content[0].bytes == [195, 169]
    assert content[0].logprob == -9999.0
    assert [t.token for t in content[0].top_logprobs] == ["a", "<6>"]


def test_token_buckets():
    """vLLM's build_1_2_5_buckets: up to max_model_len inclusive."""
    assert build_1_2_5_buckets(256) == [1, 2, 5, 10, 20, 50, 100, 200]
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert build_1_2_5_buckets(1) == [1]


def _stats() -> tuple[SchedulerStats, FrontendStats]:
    finished = FinishedRequestStats("r", "length", 0.0, 2.0, 0.5, 1.9, 10, 8)
    return (SchedulerStats(num_running_reqs=2, num_waiting_reqs=1, kv_cache_usage=0.25,
                           prefix_cache_queries=100, prefix_cache_hits=40),
            FrontendStats(ttfts=[0.5], itls=[0.1, 0.2], num_prompt_tokens=10,
                          num_generation_tokens=8, finished_requests=[finished]))


def test_prometheus_metrics_record_and_render():
    first, second = PrometheusMetrics("m1", 256), PrometheusMetrics("m2", 256)
    first.record(*_stats())
    text = first.render()[0].decode()
    labels = 'engine="0",model_name="m1"'
    assert f'vllm:num_requests_running{{{labels}}} 2.0' in text
    assert f'vllm:kv_cache_usage_perc{{{labels}}} 0.25' in text
    assert f'vllm:prefix_cache_hits_total{{{labels}}} 40.0' in text
    assert ('vllm:request_success_total{engine="0",finished_reason="length",model_name="m1"}'
            ' 1.0' in text)
    assert f'vllm:inter_token_latency_seconds_count{{{labels}}} 2.0' in text
    assert "_created" not in text
    assert 'model_name="m1"' not in second.render()[0].decode()


def test_stats_log_line(caplog):
    stat_logger = LoggingStatLogger(interval_s=10.0)
    assert stat_logger.log(now=stat_logger._last_time + 10) is None  # idle: no line
    stat_logger.record(*_stats())
    with caplog.at_level(logging.INFO, logger="sluice.stats"):
        line = stat_logger.log(now=stat_logger._last_time + 10.0)
    assert line is not None and line in caplog.text
    assert "Avg prompt throughput: 1.0 tokens/s" in line
    assert "Running: 2 reqs, Waiting: 1 reqs, KV cache usage: 25.0%" in line
    assert "Prefix cache hit rate: 40.0%" in line


def test_bind_socket_reports_port_in_use():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SluiceError, match=f"port {port} on 127.0.0.1 is in use; pass "
                                              "--port to choose another"):
            bind_socket("127.0.0.1", port)
    sock = bind_socket("127.0.0.1", 0)
    assert sock.getsockname()[1] > 0
    sock.close()


def test_bench_serve_payload_and_report():
    request = BenchRequest([5, 6, 7], 4)
    payload = make_payload("/v1/completions", "m", request, None)
    assert payload["prompt"] == [5, 6, 7] and payload["max_tokens"] == 4
    assert payload["ignore_eos"] and payload["stream_options"] == {"include_usage": True}
    results = [RequestResult(True, 3, 4, ttft=0.1, e2e=0.4, itl=[0.1, 0.1, 0.1]),
               RequestResult(False, 3, error="HTTP 500")]
    report = summarize(results, duration=2.0)
    assert report["completed"] == 1 and report["failed"] == 1
    assert report["output_throughput"] == pytest.approx(2.0)
    assert report["mean_tpot_ms"] == pytest.approx(100.0)
    table = format_report(report)
    assert "Serving Benchmark Result" in table and "Mean TTFT (ms):" in table
