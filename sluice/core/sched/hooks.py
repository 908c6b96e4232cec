"""Protocols the scheduler calls: admit, after-allocate, step metadata, on-output, on-finish
(may hold blocks). Features that change what a request needs from the KV cache plug in here
(today: the KV connectors of `sluice.kv_transfer`, through `ConnectorSchedulerHooks`), never as
branches inside `Scheduler.schedule()`. Without hooks (`Scheduler.hooks is None`) the scheduler
behaves exactly as before. No torch.

Where each hook runs in one step (`sluice.core.sched.scheduler`)::

    schedule():
        released()                    → free held requests whose hold ended (lease expired)
        per waiting request:
          on_admit(request, num_hit)  → (num_external_tokens, load_async)
          after_allocate(request, block_ids, num_external_tokens)
                                        (load_async: the request waits in WAITING_FOR_REMOTE_KV,
                                         holding blocks for num_hit + num_external tokens)
        step_metadata()               → SchedulerOutput.kv_connector_metadata
    update_from_output():
        on_output(model_runner_output) → HookReport: loads finished / failed, holds released
        on_finish(request, block_ids)  → (hold_blocks, kv_transfer_params) for a finished request

A second, independent seam decides which waiting requests may join a step at all
(`AdmissionPolicy`, e.g. the `--max-loras` limit of `sluice.lora.admission`)::

    _schedule_waiting():
        begin_step(running)           → once, before the waiting queue is walked
        per waiting request, in queue order:
          may_admit(request)          → False: skipped this step, keeps its place in the queue
          admitted(request)             (after its blocks were allocated)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    from sluice.core.request import Request
    from sluice.kv_transfer.metadata import KVConnectorMetadata
    from sluice.step import ModelRunnerOutput


@dataclass
class HookReport:
    """What `on_output` learned from a step: requests whose external KV finished loading
    (schedulable now), whose load failed (recompute them), and held requests to free."""
    finished_loading: list[str] = field(default_factory=list)
    failed_loading: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)


@dataclass
class HookStats:
    """Counters since the previous `take_stats` (for `SchedulerStats`)."""
    transfer_failures: int = 0
    bytes_received: int = 0
    transfer_seconds: list[float] = field(default_factory=list)


class SchedulerHooks(Protocol):
    def on_admit(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        """Prompt tokens after the first `num_computed_tokens` (the local prefix hit) that an
        outside source supplies, and whether they arrive asynchronously (then the request
        waits in WAITING_FOR_REMOTE_KV holding its blocks until `on_output` reports the load).
        Never all of the prompt: the last prompt token is always computed here."""

    def after_allocate(self, request: "Request", block_ids: list[int],
                       num_external_tokens: int) -> None:
        """The request now holds `block_ids` (all of its blocks); the external tokens go into
        those after its first `request.num_computed_tokens` tokens."""

    def step_metadata(self) -> "KVConnectorMetadata | None":
        """This step's instructions for the workers (None: nothing to send)."""

    def on_output(self, output: "ModelRunnerOutput") -> HookReport: ...

    def on_finish(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict | None]:
        """A request finished (not aborted): whether to hold its blocks after it leaves (freed
        when a later report or `released` names it) and the parameters for its output."""

    def released(self) -> list[str]:
        """Held requests whose hold ended without a report (a lease expired)."""

    def take_stats(self) -> HookStats: ...


class AdmissionPolicy(Protocol):
    """Which waiting requests may be admitted this step, beyond budget and blocks. A skipped
    request stays where it was in the waiting queue; the scheduler keeps walking the queue
    behind it (unlike a budget or block shortage, which ends the walk). The policy owns its
    fairness rule (no starvation of skipped requests)."""

    def begin_step(self, running: Sequence["Request"]) -> None:
        """A new walk of the waiting queue starts; `running` are the running requests."""

    def may_admit(self, request: "Request") -> bool: ...

    def admitted(self, request: "Request") -> None:
        """`request` was admitted (it runs from this step on)."""
