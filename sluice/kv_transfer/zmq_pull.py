"""ZmqPullConnector, scheduler half (torch-free): the decode engine pulls the prefill engine's
blocks over ZeroMQ/TCP (the worker half, `zmq_pull_worker.py`, moves the bytes).

Producer (kv_producer / kv_both), for a request with `{"do_remote_decode": true}`:
  `request_finished` holds the prompt's blocks (delay_free) under a lease of `lease_seconds`,
  tells the worker to serve them (`metadata.sends`) and returns the params the decode request
  must carry. The blocks are freed when the worker reports the consumer pulled them
  (`finished_sending`) or when the lease expires (`take_expired`; `metadata.expired` stops the
  worker serving them before the step's forward can reuse them).

Consumer (kv_consumer / kv_both), for a request with `{"do_remote_prefill": true, ...}`:
  `get_num_new_matched_tokens` offers the prompt minus its last token (and minus the local
  prefix hit) as an asynchronous load, unless the params do not fit (`params.layout_problem`:
  a warning, a failure counted, local recompute). `update_state_after_alloc` plans the pull
  (local block i ← remote block i, for the blocks after the local hit); the worker pulls at
  the start of the next step and reports `finished_recving` or `failed_recving` (the
  scheduler then recomputes the prompt; `failed` makes the retry local).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from sluice.core.request import RequestStatus
from sluice.core.sched.hooks import HookStats
from sluice.kv_transfer.config import KVTransferConfig
from sluice.kv_transfer.connector import KVConnectorScheduler
from sluice.kv_transfer.metadata import KVConnectorMetadata, KVConnectorOutput, LoadSpec
from sluice.kv_transfer.params import layout_problem, prompt_digest

if TYPE_CHECKING:
    from sluice.core.request import Request

logger = logging.getLogger(__name__)


class ZmqPullScheduler(KVConnectorScheduler):
    def __init__(self, config: KVTransferConfig, layout: dict[str, Any], block_size: int,
                 dp_rank: int = 0, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.layout = layout
        self.block_size = block_size
        self.port = config.port_for(0, layout["tp_size"], dp_rank)
        self.clock = clock
        self._loads: list[LoadSpec] = []
        self._sends: dict[str, list[int]] = {}
        self._expired: list[str] = []
        self._leases: dict[str, float] = {}     # held request id -> monotonic expiry
        self._failed: set[str] = set()          # consumer requests to recompute locally
        self._stats = HookStats()

    # ---- consumer ------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if (not self.config.is_consumer or not params or not params.get("do_remote_prefill")
                or request.request_id in self._failed):
            return 0, False
        problem = layout_problem(params, self.layout, request.prompt_token_ids,
                                 self.block_size)
        if problem is not None:
            logger.warning("request %s: not loading remote KV (%s); recomputing the prompt",
                           request.request_id, problem)
            self._failed.add(request.request_id)
            self._stats.transfer_failures += 1
            return 0, False
        num_external = request.num_prompt_tokens - 1 - num_computed_tokens
        return max(0, num_external), num_external > 0

    def update_state_after_alloc(self, request: "Request", block_ids: list[int],
                                 num_external_tokens: int) -> None:
        if num_external_tokens == 0:
            return
        params = request.kv_transfer_params
        first = request.num_computed_tokens // self.block_size  # the local hit: whole blocks
        end = -(-(request.num_computed_tokens + num_external_tokens) // self.block_size)
        self._loads.append(LoadSpec(
            request_id=request.request_id, local_block_ids=block_ids[first:end],
            remote_block_ids=list(params["remote_block_ids"][first:end]),
            remote_host=params["remote_host"], remote_port=params["remote_port"],
            remote_request_id=params["remote_request_id"],
            remote_engine_id=params.get("remote_engine_id", "")))

    # ---- both ----------------------------------------------------------------------------
    def build_connector_meta(self) -> KVConnectorMetadata | None:
        metadata = KVConnectorMetadata(self._loads, self._sends, self._expired)
        self._loads, self._sends, self._expired = [], {}, []
        return None if metadata.is_empty else metadata

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        for rid in output.finished_sending:
            self._leases.pop(rid, None)
        for rid in output.failed_recving:
            self._failed.add(rid)
        for rid in output.finished_recving:
            self._failed.discard(rid)
        self._stats.transfer_failures += len(output.failed_recving)
        self._stats.bytes_received += output.bytes_received
        self._stats.transfer_seconds.extend(output.transfer_seconds)

    # ---- producer ------------------------------------------------------------------------
    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._failed.discard(request.request_id)
        params = request.kv_transfer_params
        if (not self.config.is_producer or not params or not params.get("do_remote_decode")
                or request.status == RequestStatus.FINISHED_ABORTED):
            return False, None
        rid = request.request_id
        prompt_blocks = block_ids[:-(-request.num_prompt_tokens // self.block_size)]
        self._sends[rid] = prompt_blocks
        self._leases[rid] = self.clock() + self.config.lease_seconds
        return True, {
            "do_remote_prefill": True, "do_remote_decode": False,
            "remote_engine_id": self.config.resolved_engine_id,
            "remote_host": self.config.advertised_host, "remote_port": self.port,
            "remote_block_ids": prompt_blocks, "remote_request_id": rid,
            "remote_num_tokens": request.num_prompt_tokens,
            "remote_prompt_digest": prompt_digest(request.prompt_token_ids),
            "kv_layout": dict(self.layout)}

    def take_expired(self) -> list[str]:
        if not self._leases:
            return []
        now = self.clock()
        expired = [rid for rid, deadline in self._leases.items() if deadline <= now]
        for rid in expired:
            del self._leases[rid]
            self._sends.pop(rid, None)
            logger.warning("KV lease of request %s expired after %.1fs without a consumer "
                           "pulling its blocks; freeing them", rid, self.config.lease_seconds)
        self._expired.extend(expired)
        return expired

    def take_stats(self) -> HookStats:
        stats, self._stats = self._stats, HookStats()
        return stats
