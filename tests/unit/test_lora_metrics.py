"""`vllm:lora_requests_info` (sluice.metrics.lora) fed with scheduler stats; no server."""

from __future__ import annotations

import time

from prometheus_client import generate_latest

from sluice.frontend.stats import FrontendStats
from sluice.messages import SchedulerStats
from sluice.metrics.prometheus import PrometheusMetrics


def series(metrics: PrometheusMetrics) -> list[str]:
    text = generate_latest(metrics.registry).decode()
    return [line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{")]


def test_one_series_with_the_current_adapters():
    metrics = PrometheusMetrics("m", 128, max_loras=2)
    assert series(metrics) == [series(metrics)[0]]
    assert 'running_lora_adapters=""' in series(metrics)[0]
    metrics.record(SchedulerStats(running_lora_adapters={"a": 2, "b": 1},
                                  waiting_lora_adapters={"c": 1}), FrontendStats())
    (line,) = series(metrics)
    assert 'max_lora="2"' in line and 'running_lora_adapters="a,b"' in line
    assert 'waiting_lora_adapters="c"' in line
    assert abs(float(line.rsplit(" ", 1)[1]) - time.time()) < 60
    metrics.record(SchedulerStats(), FrontendStats())
    (line,) = series(metrics)
    assert 'running_lora_adapters=""' in line and 'waiting_lora_adapters=""' in line


def test_absent_without_lora():
    assert series(PrometheusMetrics("m", 128)) == []
