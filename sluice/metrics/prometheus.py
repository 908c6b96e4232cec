"""Prometheus metrics under vLLM's names with a `sluice:` prefix, in a dedicated registry.

    gauges      sluice:num_requests_running, sluice:num_requests_waiting, sluice:kv_cache_usage_perc
    counters    sluice:prefix_cache_queries, sluice:prefix_cache_hits, sluice:prompt_tokens,
                sluice:generation_tokens, sluice:num_preemptions,
                sluice:request_success{finished_reason}
    histograms  sluice:time_to_first_token_seconds, sluice:inter_token_latency_seconds,
                sluice:e2e_request_latency_seconds, sluice:request_prompt_tokens,
                sluice:request_generation_tokens

Every metric has the label `model_name`. Counters are exported with prometheus' `_total`
suffix. Feed it with `engine.add_stats_listener(metrics.record)`; `render()` gives the text
exposition. Each instance owns its `CollectorRegistry`, so several apps can live in one process.
"""

from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, disable_created_metrics, generate_latest)

from sluice.frontend.stats import FrontendStats
from sluice.messages import SchedulerStats

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISHED_REASONS = ("stop", "length", "abort")


def token_buckets(max_value: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, … up to and including the first value >= `max_value`."""
    buckets: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10 ** exponent
            buckets.append(float(value))
            if value >= max_value:
                return buckets
        exponent += 1


class PrometheusMetrics:
    """The server's metrics for one served model."""

    def __init__(self, model_name: str, max_model_len: int,
                 registry: CollectorRegistry | None = None):
        disable_created_metrics()  # no `*_created` series (as vLLM)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        reg = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"sluice:{name}", doc, labels, registry=reg)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(f"sluice:{name}", doc, labels + list(extra), registry=reg)

        def histogram(name: str, doc: str, buckets: tuple[float, ...] | list[float]
                      ) -> Histogram:
            return Histogram(f"sluice:{name}", doc, labels, buckets=buckets, registry=reg)

        self.num_requests_running = gauge("num_requests_running",
                                          "Number of requests running on the engine.")
        self.num_requests_waiting = gauge("num_requests_waiting",
                                          "Number of requests waiting to be scheduled.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc",
                                         "KV-cache usage: 1 means 100 percent of blocks used.")
        self.prefix_cache_queries = counter("prefix_cache_queries",
                                            "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = counter("prefix_cache_hits",
                                         "Prompt tokens found in the prefix cache.")
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Generation tokens processed.")
        self.num_preemptions = counter("num_preemptions", "Cumulative number of preemptions.")
        self.request_success = counter("request_success", "Finished requests.",
                                       ("finished_reason",))
        self.ttft = histogram("time_to_first_token_seconds",
                              "Time to first token in seconds.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds",
                             "Inter-token latency in seconds.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds",
                             "End-to-end request latency in seconds.", E2E_BUCKETS)
        tokens = token_buckets(max_model_len)
        self.request_prompt_tokens = histogram("request_prompt_tokens",
                                               "Prompt tokens per finished request.", tokens)
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per finished request.", tokens)

        name = model_name
        for reason in FINISHED_REASONS:  # export zeros before the first request
            self.request_success.labels(name, reason)
        for metric in (self.num_requests_running, self.num_requests_waiting,
                       self.kv_cache_usage_perc, self.prefix_cache_queries,
                       self.prefix_cache_hits, self.prompt_tokens, self.generation_tokens,
                       self.num_preemptions, self.ttft, self.itl, self.e2e,
                       self.request_prompt_tokens, self.request_generation_tokens):
            metric.labels(name)

    def record(self, scheduler_stats: SchedulerStats | None,
               frontend_stats: FrontendStats) -> None:
        """Fold one stats report in (the signature of an engine stats listener)."""
        name = self.model_name
        if scheduler_stats is not None:
            self.num_requests_running.labels(name).set(scheduler_stats.num_running_reqs)
            self.num_requests_waiting.labels(name).set(scheduler_stats.num_waiting_reqs)
            self.kv_cache_usage_perc.labels(name).set(scheduler_stats.kv_cache_usage)
            self.prefix_cache_queries.labels(name).inc(scheduler_stats.prefix_cache_queries)
            self.prefix_cache_hits.labels(name).inc(scheduler_stats.prefix_cache_hits)
            self.num_preemptions.labels(name).inc(scheduler_stats.num_preemptions)
        self.prompt_tokens.labels(name).inc(frontend_stats.num_prompt_tokens)
        self.generation_tokens.labels(name).inc(frontend_stats.num_generation_tokens)
        ttft, itl = self.ttft.labels(name), self.itl.labels(name)
        for value in frontend_stats.ttfts:
            ttft.observe(value)
        for value in frontend_stats.itls:
            itl.observe(value)
        for finished in frontend_stats.finished_requests:
            self.request_success.labels(name, finished.finish_reason).inc()
            self.e2e.labels(name).observe(finished.e2e_latency)
            self.request_prompt_tokens.labels(name).observe(finished.num_prompt_tokens)
            self.request_generation_tokens.labels(name).observe(
                finished.num_generation_tokens)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
