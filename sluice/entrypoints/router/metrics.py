"""The router's /metrics (Prometheus text), read from the live worker objects at scrape time.

    sluice_router_worker_healthy{worker}                     1 while in the routing set
    sluice_router_worker_outstanding_requests{worker}        requests in flight via this router
    sluice_router_routed_requests_total{worker,mode}         routing decisions
    sluice_router_worker_errors_total{worker,kind}           connect / upstream failures
    sluice_router_worker_kv_blocks{worker}                   block hashes in its KV index
    sluice_router_kv_events_total{worker}                    KV events applied
    sluice_router_kv_event_batches_replayed_total{worker}    batches recovered through replay
    sluice_router_kv_event_batches_lost_total{worker}        batches the replay could not supply
    sluice_router_kv_prompt_blocks_total                     prompt blocks of kv-routed requests
    sluice_router_kv_overlap_blocks_total                    of those, predicted cached on the
                                                             chosen worker
    sluice_router_kv_hit_rate                                overlap / prompt blocks (0 if none)
    sluice_router_requests_total{status}                     responses by HTTP status class

Disaggregated mode (`--prefill` / `--decode`) adds:

    sluice_router_disagg_prefill_requests_total              prefill hops answered
    sluice_router_disagg_prefill_seconds_total               their summed latency
    sluice_router_disagg_kv_transfers_total                  decode hops sent with KV params
    sluice_router_disagg_kv_params_missing_total             prefills that returned none
    sluice_router_worker_kv_transfer_bytes_total{worker}     KV bytes the worker loaded
    sluice_router_worker_kv_transfer_failures_total{worker}  its loads that fell back
    sluice_router_worker_kv_transfer_seconds_total{worker}   summed per-request load time
    sluice_router_worker_kv_transfer_requests_total{worker}  loads timed (count of the above)

The worker_kv_transfer series are the workers' own vllm:kv_transfer_* series, scraped from
their /metrics when the router's /metrics is read.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Iterable

import httpx

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sluice.entrypoints.router.workers import WorkerPool


class RouterStats:
    """Router-wide counters (per-worker ones live on `Worker`)."""

    def __init__(self) -> None:
        self.kv_prompt_blocks = 0
        self.kv_overlap_blocks = 0
        self.responses: Counter = Counter()   # "2xx", "4xx", "5xx"
        # disaggregated mode
        self.prefill_count = 0
        self.prefill_seconds_sum = 0.0
        self.kv_transfers = 0
        self.kv_transfers_missing = 0

    @property
    def kv_hit_rate(self) -> float:
        return self.kv_overlap_blocks / self.kv_prompt_blocks if self.kv_prompt_blocks else 0.0


class _Collector:
    def __init__(self, pool: WorkerPool, stats: RouterStats):
        self.pool = pool
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        workers = list(self.pool)
        healthy = GaugeMetricFamily("sluice_router_worker_healthy",
                                    "1 while the worker is in the routing set.", labels=["worker"])
        load = GaugeMetricFamily("sluice_router_worker_outstanding_requests",
                                 "Requests in flight on the worker via this router.",
                                 labels=["worker"])
        routed = CounterMetricFamily("sluice_router_routed_requests",
                                     "Requests routed to the worker, by router mode.",
                                     labels=["worker", "mode"])
        errors = CounterMetricFamily("sluice_router_worker_errors",
                                     "Failures talking to the worker, by kind.",
                                     labels=["worker", "kind"])
        blocks = GaugeMetricFamily("sluice_router_worker_kv_blocks",
                                   "Block hashes in the worker's KV index (from its events).",
                                   labels=["worker"])
        events = CounterMetricFamily("sluice_router_kv_events", "KV events applied.",
                                     labels=["worker"])
        replayed = CounterMetricFamily("sluice_router_kv_event_batches_replayed",
                                       "KV event batches recovered through replay.",
                                       labels=["worker"])
        lost = CounterMetricFamily("sluice_router_kv_event_batches_lost",
                                   "KV event batches missed and not replayable.",
                                   labels=["worker"])
        for w in workers:
            healthy.add_metric([w.url], 1.0 if w.healthy else 0.0)
            load.add_metric([w.url], w.outstanding)
            for mode, n in w.routed.items():
                routed.add_metric([w.url, mode], n)
            for kind, n in w.errors.items():
                errors.add_metric([w.url, kind], n)
            blocks.add_metric([w.url], len(w.index))
            events.add_metric([w.url], w.index.num_events)
            sub = w.subscriber
            replayed.add_metric([w.url], sub.num_replayed if sub else 0)
            lost.add_metric([w.url], sub.num_lost if sub else 0)
        yield from (healthy, load, routed, errors, blocks, events, replayed, lost)
        s = self.stats
        yield CounterMetricFamily("sluice_router_kv_prompt_blocks",
                                  "Full prompt blocks of kv-routed requests.",
                                  value=s.kv_prompt_blocks)
        yield CounterMetricFamily("sluice_router_kv_overlap_blocks",
                                  "Prompt blocks predicted cached on the chosen worker.",
                                  value=s.kv_overlap_blocks)
        yield GaugeMetricFamily("sluice_router_kv_hit_rate",
                                "Predicted KV hit rate: overlap blocks / prompt blocks.",
                                value=s.kv_hit_rate)
        responses = CounterMetricFamily("sluice_router_requests",
                                        "Proxied responses by HTTP status class.",
                                        labels=["status"])
        for status, n in sorted(s.responses.items()):
            responses.add_metric([status], n)
        yield responses
        if s.prefill_count or any(w.role != "both" for w in workers):
            yield from self._disagg(workers)

    def _disagg(self, workers: list) -> Iterable[Metric]:
        s = self.stats
        for name, doc, value in (
                ("prefill_requests", "Prefill hops answered.", s.prefill_count),
                ("prefill_seconds", "Summed latency of the prefill hops.", s.prefill_seconds_sum),
                ("kv_transfers", "Decode hops sent with kv_transfer_params.", s.kv_transfers),
                ("kv_params_missing", "Prefill hops that returned no kv_transfer_params.",
                 s.kv_transfers_missing)):
            yield CounterMetricFamily(f"sluice_router_disagg_{name}", doc, value=value)
        for key, doc in (("bytes", "KV bytes the worker loaded from prefill workers."),
                         ("failures", "The worker's KV loads that fell back to recompute."),
                         ("seconds", "Summed per-request KV load time on the worker."),
                         ("requests", "KV loads the worker timed.")):
            family = CounterMetricFamily(f"sluice_router_worker_kv_transfer_{key}", doc,
                                         labels=["worker"])
            for w in workers:
                if key in w.kv_transfer:
                    family.add_metric([w.url], w.kv_transfer[key])
            yield family


def make_registry(pool: WorkerPool, stats: RouterStats) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(pool, stats))
    return registry


_SCRAPED = {"vllm:kv_transfer_bytes_total": "bytes",
            "vllm:kv_transfer_failures_total": "failures",
            "vllm:kv_transfer_latency_seconds_sum": "seconds",
            "vllm:kv_transfer_latency_seconds_count": "requests"}


async def scrape_kv_transfer(pool: WorkerPool, client: httpx.AsyncClient,
                             api_key: str | None = None, timeout_s: float = 2.0) -> None:
    """Read the vllm:kv_transfer_* series of every healthy worker into `worker.kv_transfer`
    (summed over engines; a worker that does not answer keeps its last values)."""
    async def one(worker) -> None:
        try:
            response = await client.get(worker.url + "/metrics", timeout=timeout_s, headers=(
                {"Authorization": f"Bearer {api_key}"} if api_key else None))
        except httpx.HTTPError:
            return
        if response.status_code != 200:
            return
        totals: dict[str, float] = {}
        for line in response.text.splitlines():
            name, _, rest = line.partition("{")
            key = _SCRAPED.get(name)
            if key is not None:
                try:
                    totals[key] = totals.get(key, 0.0) + float(rest.rsplit(" ", 1)[-1])
                except ValueError:
                    continue
        worker.kv_transfer = totals

    await asyncio.gather(*(one(w) for w in pool.healthy()))


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
