"""Speculative-decoding metrics (with --speculative-config only), under vLLM's names:

    counters  vllm:spec_decode_num_drafts          requests given drafts, summed over steps
              vllm:spec_decode_num_draft_tokens    draft tokens proposed
              vllm:spec_decode_num_accepted_tokens draft tokens accepted
              vllm:spec_decode_num_accepted_tokens_per_pos{position}   per draft position
              vllm:spec_decode_num_emitted_tokens  accepted drafts + one target token per draft
    gauges    vllm:spec_decode_draft_acceptance_rate    accepted / proposed, since start
              vllm:spec_decode_mean_acceptance_length   1 + accepted / drafts, since start

Labels `model_name` and `engine`, as the other metrics (`prometheus.LABELS`). The counters
feed PromQL's rates (acceptance rate over a window = rate(accepted) / rate(draft_tokens));
the gauges are the whole-run figures the engine log also prints.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from sluice.messages import SchedulerStats

_LABELS = ("model_name", "engine")


class SpecDecodeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(f"vllm:{name}", doc, (*_LABELS, *extra), registry=registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"vllm:{name}", doc, _LABELS, registry=registry)

        self.drafts = counter("spec_decode_num_drafts",
                              "Requests given draft tokens, summed over steps.")
        self.draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens proposed.")
        self.accepted = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.accepted_per_pos = counter("spec_decode_num_accepted_tokens_per_pos",
                                        "Draft tokens accepted, per draft position (0-based).",
                                        ("position",))
        self.emitted = counter("spec_decode_num_emitted_tokens",
                               "Tokens emitted by speculative steps: accepted drafts plus one "
                               "token of the target model per draft.")
        self.acceptance_rate = gauge("spec_decode_draft_acceptance_rate",
                                     "Accepted / proposed draft tokens since start.")
        self.mean_acceptance_length = gauge("spec_decode_mean_acceptance_length",
                                            "Tokens emitted per speculative request step "
                                            "(1 + accepted / drafts) since start.")
        self._totals: dict[tuple[str, str], list[int]] = {}   # drafts, draft tokens, accepted

    def record(self, stats: SchedulerStats, labels: tuple[str, str]) -> None:
        """Fold one scheduler snapshot of the engine `labels` (model_name, engine) in."""
        drafts = stats.spec_decode_num_drafts
        if not drafts:
            return
        draft_tokens, accepted = (stats.spec_decode_num_draft_tokens,
                                  stats.spec_decode_num_accepted_tokens)
        self.drafts.labels(*labels).inc(drafts)
        self.draft_tokens.labels(*labels).inc(draft_tokens)
        self.accepted.labels(*labels).inc(accepted)
        self.emitted.labels(*labels).inc(accepted + drafts)
        for position, n in enumerate(stats.spec_decode_accepted_per_position):
            self.accepted_per_pos.labels(*labels, str(position)).inc(n)
        totals = self._totals.setdefault(labels, [0, 0, 0])
        totals[0] += drafts
        totals[1] += draft_tokens
        totals[2] += accepted
        self.acceptance_rate.labels(*labels).set(totals[2] / max(totals[1], 1))
        self.mean_acceptance_length.labels(*labels).set(1 + totals[2] / totals[0])
