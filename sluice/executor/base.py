"""Executor: drives the worker(s) with typed method calls (no string RPC).

`UniprocExecutor` holds one in-process worker (one rank); `MultiprocExecutor` drives one worker
process per rank with the same methods. `factory.make_executor` picks one from the parallel
config.
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

    def check_health(self) -> None:
        """Raise (an `EngineDeadError`) if a worker is gone; called between steps (default:
        nothing that can die on its own)."""

    def shutdown(self) -> None:
        """Release workers; safe to call twice."""
