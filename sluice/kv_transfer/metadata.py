"""What a KV connector sends between its halves each step (torch-free dataclasses, msgspec-ready).

    scheduler half ── KVConnectorMetadata (in SchedulerOutput) ──► worker half (every rank)
    scheduler half ◄── KVConnectorOutput (in ModelRunnerOutput) ── worker half (output rank)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoadSpec:
    """Pull remote blocks `remote_block_ids` into local blocks `local_block_ids` (same length,
    block i to block i), from the producer worker at `remote_host:remote_port + tp_rank`
    that holds them for `remote_request_id`."""
    request_id: str
    local_block_ids: list[int]
    remote_block_ids: list[int]
    remote_host: str
    remote_port: int
    remote_request_id: str
    remote_engine_id: str = ""


@dataclass
class KVConnectorMetadata:
    """One step's instructions for the worker half.

    `loads`: consumer pulls to run before this step's forward. `sends`: producer requests now
    held for a consumer, by id, with the block ids it may serve. `expired`: producer requests
    whose lease ended: stop serving them (their blocks are freed by this step's scheduler)."""
    loads: list[LoadSpec] = field(default_factory=list)
    sends: dict[str, list[int]] = field(default_factory=dict)
    expired: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (self.loads or self.sends or self.expired)


@dataclass
class KVConnectorOutput:
    """What the worker half reports after a step: requests whose blocks a consumer has pulled
    (`finished_sending`), loads done (`finished_recving`) or failed (`failed_recving`), and
    transfer statistics of the loads (bytes, seconds per request)."""
    finished_sending: list[str] = field(default_factory=list)
    finished_recving: list[str] = field(default_factory=list)
    failed_recving: list[str] = field(default_factory=list)
    bytes_received: int = 0
    transfer_seconds: list[float] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (self.finished_sending or self.finished_recving or self.failed_recving
                    or self.transfer_seconds)
