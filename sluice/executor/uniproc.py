"""The single-process executor: one worker in the engine-core process."""

from __future__ import annotations

from sluice.config import EngineConfig
from sluice.executor.base import Executor
from sluice.hf_config import ModelSpec
from sluice.step import ModelRunnerOutput, SchedulerOutput
from sluice.structured_output.output import GrammarOutput
from sluice.worker.worker import Worker


class UniprocExecutor(Executor):
    def __init__(self, config: EngineConfig, spec: ModelSpec, max_model_len: int):
        self.worker = Worker(config, spec, max_model_len, rank=0)

    def load_model(self) -> None:
        self.worker.load_model()

    def determine_available_kv_memory(self) -> int:
        return self.worker.determine_available_kv_memory()

    def kv_cache_bytes_per_block(self) -> int:
        return self.worker.kv_cache_bytes_per_block()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.worker.initialize_kv_cache(num_blocks)

    def warm_up(self) -> None:
        self.worker.warm_up()

    def execute_model(self, scheduler_output: SchedulerOutput, *,
                      grammar_follows: bool = True) -> None:
        self.worker.execute_model(scheduler_output)   # in this process: runs to completion

    def sample_tokens(self, grammar_output: GrammarOutput | None) -> ModelRunnerOutput:
        return self.worker.sample_tokens(grammar_output)

    def sleep(self, level: int) -> None:
        self.worker.sleep(level)

    def wake_up(self) -> None:
        self.worker.wake_up()
