"""Executor: drives the worker(s) with typed method calls (no string RPC).

`UniprocExecutor` holds one in-process worker (one rank); `MultiprocExecutor` drives one worker
process per rank with the same methods. `factory.make_executor` picks one from the parallel
config.

A step's result is the `ModelRunnerOutput` of the output rank (`ParallelConfig.output_rank`:
the driver of the last pipeline stage). `execute_model` runs one step and waits for it;
`submit_step` starts one and returns a `Future` at once, so that under pipeline parallelism the
engine core keeps up to `pipeline_parallel_size` steps in the pipeline (its batch queue). Steps
complete in submission order; their futures must be waited for in that order, and no other
call is made while one is pending. An executor that cannot overlap steps inherits the default
`submit_step`, which runs the step at once and returns a finished future.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future

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

    def submit_step(self, scheduler_output: SchedulerOutput) -> Future[ModelRunnerOutput]:
        """Start one step without waiting for it (see the module docstring). Default: run it
        now; the future is already done."""
        future: Future[ModelRunnerOutput] = Future()
        try:
            future.set_result(self.execute_model(scheduler_output))
        except Exception as e:   # raised where the caller waits, as a real future would
            future.set_exception(e)
        return future

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
