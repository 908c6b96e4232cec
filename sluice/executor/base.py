"""Executor: drives the worker(s) with typed method calls (no string RPC).

`UniprocExecutor` holds one in-process worker (one rank); `MultiprocExecutor` drives one worker
process per rank with the same methods. `factory.make_executor` picks one from the parallel
config.

A step is two calls, as vLLM's: `execute_model(scheduler_output)` starts the forward (the
multi-process executor returns while the workers compute), then `sample_tokens(grammar_output)`
hands over the step's grammar bitmask (structured output, computed by the engine core
meanwhile; None when no sampling row has a grammar) and returns the step's result, the
`ModelRunnerOutput` of the output rank (`ParallelConfig.output_rank`: the driver of the last
pipeline stage; only it samples and applies the mask). Every `execute_model` is followed by
exactly one `sample_tokens`. `grammar_follows=False` promises `sample_tokens(None)`: an
executor may then send forward and sampling as one message, so a step without grammars costs
what it did before the split.

`submit_step(scheduler_output, grammar_output)` sends a whole step and returns a `Future` at
once, so that under pipeline parallelism the engine core keeps up to `pipeline_parallel_size`
steps in the pipeline (its batch queue; the bitmask is computed before submitting, since a
request is never in two batches at once). Steps complete in submission order; their futures
must be waited for in that order, and no other call is made while one is pending. An executor
that cannot overlap steps inherits the default `submit_step`, which runs the step at once and
returns a finished future.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import Future

from sluice.step import ModelRunnerOutput, SchedulerOutput
from sluice.structured_output.output import GrammarOutput


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
    def execute_model(self, scheduler_output: SchedulerOutput, *,
                      grammar_follows: bool = True) -> None:
        """Start the step's forward (see the module docstring)."""

    @abstractmethod
    def sample_tokens(self, grammar_output: GrammarOutput | None) -> ModelRunnerOutput:
        """Sample the step `execute_model` started, under `grammar_output`; its result."""

    def step(self, scheduler_output: SchedulerOutput,
             grammar_output: GrammarOutput | None = None) -> ModelRunnerOutput:
        """One whole step whose bitmask is known up front."""
        self.execute_model(scheduler_output, grammar_follows=grammar_output is not None)
        return self.sample_tokens(grammar_output)

    def submit_step(self, scheduler_output: SchedulerOutput,
                    grammar_output: GrammarOutput | None = None) -> Future[ModelRunnerOutput]:
        """Start one step without waiting for it (see the module docstring). Default: run it
        now; the future is already done."""
        future: Future[ModelRunnerOutput] = Future()
        try:
            future.set_result(self.step(scheduler_output, grammar_output))
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
