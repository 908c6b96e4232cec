"""The setup and sleep methods every executor of several ranks shares: each is one call on
every rank (`_call_all`, in rank order); how a call reaches the ranks (ZMQ for
`MultiprocExecutor`, Ray actors for `RayExecutor`) is the subclass's business."""

from __future__ import annotations

import logging
from abc import abstractmethod
from typing import Any

from sluice.executor.base import Executor
from sluice.executor.wire import WorkerMethod

logger = logging.getLogger(__name__)


class RankedExecutor(Executor):
    """An `Executor` over `world_size` ranks addressed by `_call_all`."""

    @abstractmethod
    def _call_all(self, method: WorkerMethod, arg: Any = None) -> list[Any]:
        """Call `method(arg)` on every rank; their answers in rank order."""

    def load_model(self) -> None:
        self._call_all(WorkerMethod.LOAD_MODEL)

    def determine_available_kv_memory(self) -> int:
        """The minimum over ranks (every rank holds the same number of blocks)."""
        per_rank = self._call_all(WorkerMethod.DETERMINE_KV_MEMORY)
        if len(set(per_rank)) > 1:
            logger.info("KV memory available per rank: %s; using the minimum",
                        ", ".join(f"{b / 2**20:.0f} MiB" for b in per_rank))
        return min(per_rank)

    def kv_cache_bytes_per_block(self) -> int:
        return max(self._call_all(WorkerMethod.KV_BYTES_PER_BLOCK))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._call_all(WorkerMethod.INITIALIZE_KV_CACHE, num_blocks)

    def warm_up(self) -> None:
        self._call_all(WorkerMethod.WARM_UP)

    def sleep(self, level: int) -> None:
        self._call_all(WorkerMethod.SLEEP, level)

    def wake_up(self) -> None:
        self._call_all(WorkerMethod.WAKE_UP)
