"""Prometheus metrics under vLLM v1's names, labels and buckets, in a dedicated registry, so that
dashboards and alerts written for vLLM work unchanged. docs/metrics.md lists every metric.

    gauges      vllm:num_requests_running, vllm:num_requests_waiting, vllm:kv_cache_usage_perc,
                vllm:gpu_cache_usage_perc (deprecated alias), vllm:engine_sleep_state{sleep_state}
    counters    vllm:prefix_cache_queries, vllm:prefix_cache_hits, vllm:num_preemptions,
                vllm:prompt_tokens, vllm:generation_tokens, vllm:request_success{finished_reason}
    histograms  token counts: vllm:request_prompt_tokens, vllm:request_generation_tokens,
                vllm:request_prefill_kv_computed_tokens, vllm:iteration_tokens_total,
                vllm:request_max_num_generation_tokens, vllm:request_params_n,
                vllm:request_params_max_tokens;
                latencies: vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds,
                vllm:time_per_output_token_seconds (deprecated alias),
                vllm:request_time_per_output_token_seconds, vllm:e2e_request_latency_seconds,
                vllm:request_queue_time_seconds, vllm:request_inference_time_seconds,
                vllm:request_prefill_time_seconds, vllm:request_decode_time_seconds
    spec decode vllm:spec_decode_* (with --speculative-config only; spec_decode.py)
    info        vllm:lora_requests_info{max_lora, waiting_lora_adapters, running_lora_adapters}
                (with --enable-lora only; no model_name/engine labels, as vLLM's; lora.py)

Every metric carries vLLM v1's labels `model_name` (the served model name) and `engine` (the
engine-core index: "0" to "N-1" with --data-parallel-size N, each engine its own series; "R"
for a server run with --data-parallel-rank R). Counters are exported with prometheus' `_total`
suffix, as vLLM's. Feed it with `engine.add_stats_listener(metrics.record)` (each report is
booked to the engine its `FrontendStats.engine_index` names) and `set_sleep_level` on sleep /
wake-up; `render()` gives the text exposition. Each instance owns its `CollectorRegistry`, so
several apps can live in one process.
"""

from __future__ import annotations

from typing import Any, Sequence

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, disable_created_metrics, generate_latest)

from sluice.frontend.stats import FinishedRequestStats, FrontendStats
from sluice.messages import SchedulerStats
from sluice.metrics.lora import LoRAInfoGauge
from sluice.metrics.spec_decode import SpecDecodeMetrics

PREFIX = "vllm:"
LABELS = ("model_name", "engine")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
KV_TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                       10.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)
FINISHED_REASONS = ("stop", "length", "abort")
SLEEP_STATES = ("awake", "weights_offloaded", "discard_all")
"""`vllm:engine_sleep_state` label values: awake; level 1 (vLLM offloads the weights, sluice
keeps them and frees the KV cache); level 2 (weights and KV cache discarded)."""


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, … up to `max_value` inclusive (vLLM's token-count buckets)."""
    buckets: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10 ** exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


class PrometheusMetrics:
    """The server's metrics for one served model: one `EngineMetrics` (one set of series) per
    engine in `engine_indexes` (see the module docstring)."""

    def __init__(self, model_name: str, max_model_len: int,
                 registry: CollectorRegistry | None = None,
                 engine_indexes: Sequence[int] = (0,), max_loras: int | None = None,
                 speculative: bool = False):
        disable_created_metrics()  # no `*_created` series (as vLLM)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        self._families = _families(self.registry, max_model_len)
        self._sleep_level = 0
        # with --enable-lora (`max_loras` given): vllm:lora_requests_info
        self.lora_info = (LoRAInfoGauge(self.registry, max_loras) if max_loras is not None
                          else None)
        # with --speculative-config: vllm:spec_decode_*
        self.spec_decode = SpecDecodeMetrics(self.registry) if speculative else None
        self.engines: dict[int, EngineMetrics] = {}
        for index in engine_indexes:
            self.engine(index)

    def engine(self, index: int) -> "EngineMetrics":
        """The series of engine `index` (created on first use)."""
        metrics = self.engines.get(index)
        if metrics is None:
            metrics = EngineMetrics(self._families, (self.model_name, str(index)))
            metrics.set_sleep_level(self._sleep_level)
            self.engines[index] = metrics
        return metrics

    def set_sleep_level(self, level: int) -> None:
        """Show sleep level `level` (0: awake) in every engine's `vllm:engine_sleep_state`."""
        self._sleep_level = level
        for metrics in self.engines.values():
            metrics.set_sleep_level(level)

    def record(self, scheduler_stats: SchedulerStats | None,
               frontend_stats: FrontendStats) -> None:
        """Fold one stats report in (the signature of an engine stats listener), under the
        engine that produced it."""
        self.engine(frontend_stats.engine_index).record(scheduler_stats, frontend_stats)
        if self.lora_info is not None and scheduler_stats is not None:
            self.lora_info.record(scheduler_stats)
        if self.spec_decode is not None and scheduler_stats is not None:
            self.spec_decode.record(scheduler_stats,
                                    (self.model_name, str(frontend_stats.engine_index)))

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _families(reg: CollectorRegistry, max_model_len: int) -> dict[str, Any]:
    """Every metric family (labels `LABELS`, plus sleep_state / finished_reason where named),
    by the attribute name `EngineMetrics` gives its series."""
    families: dict[str, Any] = {}

    def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> None:
        families[name] = Gauge(PREFIX + name, doc, (*LABELS, *extra), registry=reg)

    def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> None:
        families[name] = Counter(PREFIX + name, doc, (*LABELS, *extra), registry=reg)

    def histogram(attr: str, name: str, doc: str, buckets: Sequence[float]) -> None:
        families[attr] = Histogram(PREFIX + name, doc, LABELS, buckets=buckets, registry=reg)

    # scheduler state
    gauge("num_requests_running", "Number of requests in model execution batches.")
    gauge("num_requests_waiting", "Number of requests waiting to be processed.")
    gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
    gauge("gpu_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage. "
          "DEPRECATED: Use vllm:kv_cache_usage_perc instead.")
    gauge("engine_sleep_state", "Engine sleep state; awake = 0 means engine is sleeping; awake "
          "= 1 means engine is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 "
          "means sleep level 2.", ("sleep_state",))
    # counters
    counter("prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.")
    counter("prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
    counter("num_preemptions", "Cumulative number of preemption from the engine.")
    counter("prompt_tokens", "Number of prefill tokens processed.")
    counter("generation_tokens", "Number of generation tokens processed.")
    counter("request_success", "Count of successfully processed requests.",
            ("finished_reason",))
    # KV transfer (disaggregated prefill/decode: --kv-transfer-config)
    counter("kv_transfer_failures", "KV transfers (loads of a remote engine's KV) that failed "
            "or were refused; the request recomputed its prompt.")
    counter("kv_transfer_bytes", "Bytes of KV cache loaded from remote engines.")
    histogram("kv_transfer_latency", "kv_transfer_latency_seconds",
              "Histogram of the time one request's KV load took, in seconds.",
              KV_TRANSFER_BUCKETS)
    # histograms of token counts
    tokens = build_1_2_5_buckets(max_model_len)
    for name, doc in (
            ("request_prompt_tokens", "Number of prefill tokens processed."),
            ("request_generation_tokens", "Number of generation tokens processed."),
            ("request_prefill_kv_computed_tokens", "Histogram of new KV tokens computed during "
             "prefill (excluding cached tokens)."),
            ("request_max_num_generation_tokens",
             "Histogram of maximum number of requested generation tokens."),
            ("request_params_max_tokens", "Histogram of the max_tokens request parameter.")):
        histogram(name, name, doc, tokens)
    histogram("iteration_tokens", "iteration_tokens_total",
              "Histogram of number of tokens per engine_step.", ITERATION_TOKEN_BUCKETS)
    histogram("request_params_n", "request_params_n", "Histogram of the n request parameter.",
              N_BUCKETS)
    # histograms of latencies
    histogram("ttft", "time_to_first_token_seconds",
              "Histogram of time to first token in seconds.", TTFT_BUCKETS)
    histogram("itl", "inter_token_latency_seconds",
              "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
    histogram("tpot", "time_per_output_token_seconds",
              "Histogram of time per output token in seconds. DEPRECATED: Use "
              "vllm:inter_token_latency_seconds instead.", ITL_BUCKETS)
    histogram("request_tpot", "request_time_per_output_token_seconds",
              "Histogram of time_per_output_token_seconds per request.", ITL_BUCKETS)
    for attr, name, doc in (
            ("e2e", "e2e_request_latency_seconds", "Histogram of e2e request latency in seconds."),
            ("queue_time", "request_queue_time_seconds",
             "Histogram of time spent in WAITING phase for request."),
            ("inference_time", "request_inference_time_seconds",
             "Histogram of time spent in RUNNING phase for request."),
            ("prefill_time", "request_prefill_time_seconds",
             "Histogram of time spent in PREFILL phase for request."),
            ("decode_time", "request_decode_time_seconds",
             "Histogram of time spent in DECODE phase for request.")):
        histogram(attr, name, doc, REQUEST_LATENCY_BUCKETS)
    return families


class EngineMetrics:
    """The series of one engine (labels: model name, engine index)."""

    def __init__(self, families: dict[str, Any], labels: tuple[str, str]):
        def series(name: str) -> Any:
            return families[name].labels(*labels)

        self.num_requests_running = series("num_requests_running")
        self.num_requests_waiting = series("num_requests_waiting")
        self.kv_cache_usage_perc = series("kv_cache_usage_perc")
        self.gpu_cache_usage_perc = series("gpu_cache_usage_perc")
        self.engine_sleep_state = {s: families["engine_sleep_state"].labels(*labels, s)
                                   for s in SLEEP_STATES}
        self.prefix_cache_queries = series("prefix_cache_queries")
        self.prefix_cache_hits = series("prefix_cache_hits")
        self.num_preemptions = series("num_preemptions")
        self.prompt_tokens = series("prompt_tokens")
        self.generation_tokens = series("generation_tokens")
        self.request_success = {r: families["request_success"].labels(*labels, r)
                                for r in FINISHED_REASONS}
        self.request_prompt_tokens = series("request_prompt_tokens")
        self.request_generation_tokens = series("request_generation_tokens")
        self.request_prefill_kv_computed_tokens = series("request_prefill_kv_computed_tokens")
        self.iteration_tokens = series("iteration_tokens")
        self.request_max_num_generation_tokens = series("request_max_num_generation_tokens")
        self.request_params_n = series("request_params_n")
        self.request_params_max_tokens = series("request_params_max_tokens")
        self.ttft = series("ttft")
        self.itl = series("itl")
        self.tpot = series("tpot")
        self.request_tpot = series("request_tpot")
        self.e2e = series("e2e")
        self.queue_time = series("queue_time")
        self.inference_time = series("inference_time")
        self.prefill_time = series("prefill_time")
        self.decode_time = series("decode_time")
        self.kv_transfer_failures = series("kv_transfer_failures")
        self.kv_transfer_bytes = series("kv_transfer_bytes")
        self.kv_transfer_latency = series("kv_transfer_latency")

    def set_sleep_level(self, level: int) -> None:
        """Show sleep level `level` (0: awake) in `vllm:engine_sleep_state`."""
        self.engine_sleep_state["awake"].set(1 if level == 0 else 0)
        self.engine_sleep_state["weights_offloaded"].set(1 if level == 1 else 0)
        self.engine_sleep_state["discard_all"].set(1 if level == 2 else 0)

    def record(self, scheduler_stats: SchedulerStats | None,
               frontend_stats: FrontendStats) -> None:
        """Fold one stats report of this engine in."""
        if scheduler_stats is not None:
            self._record_scheduler(scheduler_stats)
        self.prompt_tokens.inc(frontend_stats.num_prompt_tokens)
        self.generation_tokens.inc(frontend_stats.num_generation_tokens)
        for value in frontend_stats.ttfts:
            self.ttft.observe(value)
        for value in frontend_stats.itls:
            self.itl.observe(value)
            self.tpot.observe(value)
        for n in frontend_stats.n_params:
            self.request_params_n.observe(n)
        for value in frontend_stats.max_num_generation_tokens:
            self.request_max_num_generation_tokens.observe(value)
        for finished in frontend_stats.finished_requests:
            self._record_finished(finished)

    def _record_scheduler(self, stats: SchedulerStats) -> None:
        self.num_requests_running.set(stats.num_running_reqs)
        self.num_requests_waiting.set(stats.num_waiting_reqs)
        self.kv_cache_usage_perc.set(stats.kv_cache_usage)
        self.gpu_cache_usage_perc.set(stats.kv_cache_usage)
        self.prefix_cache_queries.inc(stats.prefix_cache_queries)
        self.prefix_cache_hits.inc(stats.prefix_cache_hits)
        self.num_preemptions.inc(stats.num_preemptions)
        self.kv_transfer_failures.inc(stats.kv_transfer_failures)
        self.kv_transfer_bytes.inc(stats.kv_transfer_bytes)
        for seconds in stats.kv_transfer_seconds:
            self.kv_transfer_latency.observe(seconds)
        step_tokens = stats.num_prompt_tokens + stats.num_generation_tokens
        if step_tokens:  # idle snapshots are not engine steps
            self.iteration_tokens.observe(step_tokens)

    def _record_finished(self, finished: FinishedRequestStats) -> None:
        """One finished engine request. Phases the request never reached (never scheduled,
        no token) are not observed."""
        success = self.request_success.get(finished.finish_reason)
        if success is not None:
            success.inc()
        self.e2e.observe(finished.e2e_latency)
        self.request_prompt_tokens.observe(finished.num_prompt_tokens)
        self.request_generation_tokens.observe(finished.num_generation_tokens)
        self.request_prefill_kv_computed_tokens.observe(
            max(0, finished.num_prompt_tokens - finished.num_cached_tokens))
        if finished.max_tokens:
            self.request_params_max_tokens.observe(finished.max_tokens)
        for histogram, value in ((self.queue_time, finished.queue_time),
                                 (self.prefill_time, finished.prefill_time),
                                 (self.inference_time, finished.inference_time),
                                 (self.request_tpot, finished.mean_time_per_output_token)):
            if value is not None:
                histogram.observe(value)
        if finished.first_token_time is not None:
            self.decode_time.observe(finished.decode_time)
