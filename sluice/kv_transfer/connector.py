"""The KV-connector API (the shape of vLLM's KVConnectorBase_V1): two halves of one connector.

The scheduler half lives in the engine-core process (torch-free). The worker half lives in every
worker (one per TP rank) next to the KV-cache tensors. They talk only through the step contract:
`KVConnectorMetadata` rides in each `SchedulerOutput`, `KVConnectorOutput` comes back in the
output rank's `ModelRunnerOutput`.

    scheduler half                                   worker half
    get_num_new_matched_tokens  (admit)              start_load_kv(metadata)   before the forward
    update_state_after_alloc    (after allocate)     wait_for_layer_load(i)    in layer i (if used)
    build_connector_meta        (per step)           save_kv_layer(i, ...)     in layer i (if used)
    update_connector_output     (worker reports)     wait_for_save()           after the forward
    request_finished            (may hold blocks)    get_finished(ids) → (finished_sending,
    take_expired / take_stats                                              finished_recving)

The scheduler reaches the scheduler half only through `sluice.core.sched.hooks.SchedulerHooks`
(`ConnectorSchedulerHooks` adapts one); the worker calls the worker half around its forward.
A pull connector (`ZmqPullConnector`) moves whole blocks before the forward, so its per-layer
hooks do nothing; a push connector would save each layer as the forward writes it.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

from sluice.core.sched.hooks import HookReport, HookStats
from sluice.kv_transfer.metadata import KVConnectorMetadata, KVConnectorOutput

if TYPE_CHECKING:
    from sluice.core.request import Request
    from sluice.step import ModelRunnerOutput


class KVConnectorScheduler(abc.ABC):
    """The engine-core half: decides what is loaded, what is held, and for how long."""

    @abc.abstractmethod
    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens after `num_computed_tokens` a remote engine can supply for `request` (never
        the last prompt token), and whether they load asynchronously."""

    @abc.abstractmethod
    def update_state_after_alloc(self, request: "Request", block_ids: list[int],
                                 num_external_tokens: int) -> None:
        """The request holds `block_ids`; plan loading its external tokens into them."""

    @abc.abstractmethod
    def build_connector_meta(self) -> KVConnectorMetadata | None:
        """This step's instructions for the worker half (consumes what was planned)."""

    @abc.abstractmethod
    def update_connector_output(self, output: KVConnectorOutput) -> None:
        """Take the finished sends / receives the workers reported."""

    @abc.abstractmethod
    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """`(delay_free, kv_transfer_params)`: whether the blocks outlive the request (until
        a consumer pulled them or the lease ended) and the params for the client."""

    def take_expired(self) -> list[str]:
        """Held requests whose lease ended since the previous call (free their blocks)."""
        return []

    def take_stats(self) -> HookStats:
        return HookStats()


class KVConnectorWorker(abc.ABC):
    """The worker half: moves KV between this rank's cache tensors and the other engine."""

    def register_kv_caches(self, kv_caches: list[Any]) -> None:
        """The rank's per-layer caches, once allocated (again after a wake-up)."""

    @abc.abstractmethod
    def start_load_kv(self, metadata: KVConnectorMetadata | None) -> None:
        """Before the forward: start (or do) this step's loads."""

    def wait_for_layer_load(self, layer_index: int) -> None:
        """Block until layer `layer_index`'s KV has arrived (no-op for whole-step loads)."""

    def save_kv_layer(self, layer_index: int, kv_cache: Any, attn_metadata: Any) -> None:
        """Push layer `layer_index`'s new KV somewhere (no-op for pull connectors)."""

    def wait_for_save(self) -> None:
        """After the forward: block until this step's saves are done."""

    @abc.abstractmethod
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """`(finished_sending, finished_recving)` request ids since the previous call."""

    def build_output(self, finished_req_ids: set[str],
                     idle: bool = False) -> KVConnectorOutput | None:
        """This step's report for the scheduler half (None: nothing to report). `idle`:
        nothing ran this step (a connector may wait briefly for transfers instead of letting
        the engine loop spin)."""
        sending, recving = self.get_finished(finished_req_ids)
        output = KVConnectorOutput(sorted(sending), sorted(recving))
        return None if output.is_empty else output

    def shutdown(self) -> None:
        """Stop threads and close sockets."""


class ConnectorSchedulerHooks:
    """`SchedulerHooks` over a connector's scheduler half (the scheduler never sees one)."""

    def __init__(self, connector: KVConnectorScheduler):
        self.connector = connector

    def on_admit(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        return self.connector.get_num_new_matched_tokens(request, num_computed_tokens)

    def after_allocate(self, request: "Request", block_ids: list[int],
                       num_external_tokens: int) -> None:
        self.connector.update_state_after_alloc(request, block_ids, num_external_tokens)

    def step_metadata(self) -> KVConnectorMetadata | None:
        return self.connector.build_connector_meta()

    def on_output(self, output: "ModelRunnerOutput") -> HookReport:
        kv_output = output.kv_connector_output
        if kv_output is None:
            return HookReport()
        self.connector.update_connector_output(kv_output)
        return HookReport(finished_loading=list(kv_output.finished_recving),
                          failed_loading=list(kv_output.failed_recving),
                          released=list(kv_output.finished_sending))

    def on_finish(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict | None]:
        return self.connector.request_finished(request, block_ids)

    def released(self) -> list[str]:
        return self.connector.take_expired()

    def take_stats(self) -> HookStats:
        return self.connector.take_stats()
