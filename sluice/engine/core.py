"""EngineCore: the scheduler, the KV-cache manager and the executor, stepping together.

One step is `schedule()` → `executor.execute_model()` → `update_from_output()`. Construction
runs the startup stages (load weights → size and allocate the KV cache → warm up), each timed in
`startup_seconds`, and publishes the runtime facts as an `EngineReady`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from sluice.config import EngineConfig
from sluice.errors import ConfigError, KVCacheTooSmallError
from sluice.executor.uniproc import UniprocExecutor
from sluice.hf_config import ModelSpec, load_model_spec
from sluice.messages import EngineCoreOutputs, EngineCoreRequest, EngineReady
from sluice.core.request import Request, RequestStatus
from sluice.core.sched.scheduler import Scheduler

logger = logging.getLogger(__name__)


def with_platform_defaults(config: EngineConfig) -> EngineConfig:
    """`config` with the fields left to the platform filled in: `--block-size`."""
    if config.cache.block_size is not None:
        return config
    from sluice.platform import current_platform
    block_size = current_platform(config.device).default_block_size
    return dataclasses.replace(config, cache=dataclasses.replace(config.cache,
                                                                 block_size=block_size))


def resolve_max_model_len(config: EngineConfig, spec: ModelSpec) -> int:
    """`--max-model-len`, defaulting to the model's max_position_embeddings (never above it)."""
    requested = config.model.max_model_len
    if requested is None:
        return spec.max_position_embeddings
    if requested > spec.max_position_embeddings:
        raise ConfigError(
            f"--max-model-len {requested} exceeds the model's max_position_embeddings "
            f"({spec.max_position_embeddings}) in {spec.path}/config.json; use at most "
            f"{spec.max_position_embeddings}.")
    return requested


def num_kv_blocks_for(config: EngineConfig, max_model_len: int, available_bytes: int,
                      bytes_per_block: int) -> int:
    """Blocks that fit in `available_bytes` (block 0 is the reserved null block), capped at
    what `max_num_seqs` requests of `max_model_len` tokens can ever use; raises
    `KVCacheTooSmallError` when one `max_model_len` request does not fit."""
    block_size = config.cache.block_size
    blocks_per_seq = -(-max_model_len // block_size)
    fit = available_bytes // bytes_per_block
    needed = blocks_per_seq + 1
    if fit < needed:
        largest_len = max(0, (fit - 1) * block_size)
        mib = 1 << 20
        raise KVCacheTooSmallError(
            f"KV cache too small: {available_bytes / mib:.1f} MiB holds {max(fit - 1, 0)} "
            f"blocks of {block_size} tokens, but one request of max_model_len={max_model_len} "
            f"needs {blocks_per_seq} blocks ({blocks_per_seq * bytes_per_block / mib:.1f} MiB). "
            f"Raise --kv-cache-memory to at least {-(-needed * bytes_per_block // mib)}MiB or "
            f"lower --max-model-len to at most {largest_len}.")
    return min(fit, config.scheduler.max_num_seqs * blocks_per_seq + 1)


@contextmanager
def _stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    logger.info("stage %-22s %.2fs", name, timings[name])


class EngineCore:
    """The in-process engine core. Not thread-safe: one caller drives add/abort/step."""

    def __init__(self, config: EngineConfig):
        config = with_platform_defaults(config)
        self.config = config
        timings: dict[str, float] = {}
        with _stage("read model config", timings):
            self.spec = load_model_spec(config.model.model)
            self.max_model_len = resolve_max_model_len(config, self.spec)
        with _stage("load weights", timings):
            self.executor = UniprocExecutor(config, self.spec, self.max_model_len)
            self.executor.load_model()
        with _stage("profile + allocate KV", timings):
            available = self.executor.determine_available_kv_memory()
            self.num_kv_blocks = num_kv_blocks_for(config, self.max_model_len, available,
                                                   self.executor.kv_cache_bytes_per_block())
            self.executor.initialize_kv_cache(self.num_kv_blocks)
        with _stage("warm up", timings):
            self.executor.warm_up()
        self.scheduler = Scheduler(config.scheduler, config.cache, self.max_model_len,
                                   self.num_kv_blocks)
        self.ready = EngineReady(
            num_kv_blocks=self.num_kv_blocks, block_size=config.cache.block_size,
            max_model_len=self.max_model_len, vocab_size=self.spec.vocab_size,
            model_name=(config.model.served_model_name or (Path(self.spec.path).name,))[0],
            eos_token_ids=list(self.spec.eos_token_ids),
            startup_seconds=timings)
        logger.info("engine ready: %d KV blocks of %d tokens, max_model_len %d",
                    self.num_kv_blocks, config.cache.block_size, self.max_model_len)

    def add_request(self, request: EngineCoreRequest) -> None:
        self.scheduler.add_request(Request.from_engine_core_request(request))

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.scheduler.finish_requests(list(request_ids), RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> EngineCoreOutputs:
        """Run one engine step and return what it produced."""
        if not self.scheduler.has_unfinished_requests():
            return EngineCoreOutputs(scheduler_stats=self.scheduler.make_stats(),
                                     timestamp=time.monotonic())
        scheduler_output = self.scheduler.schedule()
        runner_output = self.executor.execute_model(scheduler_output)
        outputs = self.scheduler.update_from_output(scheduler_output, runner_output)
        return EngineCoreOutputs(outputs=outputs, scheduler_stats=self.scheduler.make_stats(),
                                 timestamp=time.monotonic())

    def reset_prefix_cache(self) -> None:
        self.scheduler.reset_prefix_cache()

    def shutdown(self) -> None:
        self.executor.shutdown()
