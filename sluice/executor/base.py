"""Executor: drives the worker(s) with typed method calls (no string RPC).

`UniprocExecutor` holds one in-process worker (TP = 1); a multi-process executor for TP ranks
implements the same methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from sluice.step import ModelRunnerOutput, SchedulerOutput


class Executor(ABC):
    @abstractmethod
    def load_model(self) -> None: ...

    @abstractmethod
    def determine_available_kv_memory(self) -> int:
        """Bytes available for the KV cache on the most constrained worker."""

    @abstractmethod
    def kv_cache_bytes_per_block(self) -> int: ...

    @abstractmethod
    def initialize_kv_cache(self, num_blocks: int) -> None: ...

    @abstractmethod
    def warm_up(self) -> None: ...

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    @abstractmethod
    def sleep(self, level: int) -> None:
        """Release every worker's KV cache (level 1) and weights too (level 2); the caller
        guarantees no request is running."""

    @abstractmethod
    def wake_up(self) -> None:
        """Reallocate (and reload) what `sleep` released, on every worker."""

    def shutdown(self) -> None:
        """Release workers; safe to call twice."""
