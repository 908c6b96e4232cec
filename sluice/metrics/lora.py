"""`vllm:lora_requests_info` (with --enable-lora), as vLLM's: a gauge whose value is the Unix
time of the latest scheduler report and whose labels carry the state —
`max_lora` (--max-loras), `running_lora_adapters` and `waiting_lora_adapters` (comma-separated
adapter names with requests running / waiting, in the scheduler's order; empty when none).

Unlike vLLM, which leaves every label combination it ever saw in the exposition, the previous
series is removed when the labels change, so the metric always has exactly one series: the
current state (a dashboard's `topk(1, vllm:lora_requests_info)` works with both). With data
parallelism the latest report of any engine wins.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from sluice.messages import SchedulerStats

LORA_INFO_LABELS = ("max_lora", "waiting_lora_adapters", "running_lora_adapters")


class LoRAInfoGauge:
    def __init__(self, registry: CollectorRegistry, max_loras: int):
        self.max_lora = str(max_loras)
        self.gauge = Gauge("vllm:lora_requests_info", "Running stats on lora requests.",
                           LORA_INFO_LABELS, registry=registry)
        self._labels: tuple[str, str, str] | None = None
        self.record(SchedulerStats())   # present (no adapters) from the start

    def record(self, stats: SchedulerStats) -> None:
        labels = (self.max_lora, ",".join(stats.waiting_lora_adapters),
                  ",".join(stats.running_lora_adapters))
        if labels != self._labels:
            if self._labels is not None:
                self.gauge.remove(*self._labels)
            self._labels = labels
        self.gauge.labels(*labels).set_to_current_time()
