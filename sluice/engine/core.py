"""EngineCore: the scheduler, the KV-cache manager and the executor, stepping together.

One step is `schedule()` → `executor.execute_model()` (the forward starts) → the grammar
bitmask of the step's structured-output requests, computed here meanwhile
(`sluice.structured_output`) → `executor.sample_tokens(bitmask)` → `update_from_output()`, then
each grammar advances with its request's new tokens. A request with a grammar waits outside
the scheduler until its grammar has compiled (on a pool thread). With pipeline
parallelism (pp > 1) `step` is `step_with_batch_queue` instead (vLLM's): up to pp scheduled
steps are in the pipeline at once (`executor.submit_step` futures in `batch_queue`), so the
stages work on different batches at the same time; the scheduler keeps a request out of later
batches while it is in flight (`Scheduler.in_flight`). `max_batches_in_flight` records the
most steps seen in the pipeline at once. Construction
runs the startup stages (load weights → size and allocate the KV cache → warm up), each timed in
`startup_seconds`, and publishes the runtime facts as an `EngineReady`.

Utility calls between steps: `reset_prefix_cache` (False while requests hold blocks), and sleep
mode (`--enable-sleep-mode`): `sleep(level)` on an idle engine releases the KV cache (1) or
the KV cache and the weights (2) after resetting the prefix cache; `wake_up` restores them.

With `--kv-events-config`, the block pool records KV events and each step (and each reset) hands
them to a publisher thread as one `KVEventBatch` (`_publish_kv_events`; see `sluice.kv_events`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from sluice.config import EngineConfig
from sluice.errors import ConfigError, EngineBusyError, KVCacheTooSmallError
from sluice.executor.factory import make_executor
from sluice.gc_heap import freeze_startup_heap, thaw_heap
from sluice.hf_config import ModelSpec, load_model_spec
from sluice.messages import (EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest,
                             EngineReady, FinishReason)
from sluice.core.request import Request, RequestStatus
from sluice.core.kv_cache.events import KVEventBatch
from sluice.core.sched.scheduler import Scheduler
from sluice.step import ModelRunnerOutput, SchedulerOutput
from sluice.structured_output import make_manager as make_structured_output_manager

if TYPE_CHECKING:
    from sluice.kv_events.publisher import EventPublisher

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
        with _stage("start workers", timings):
            self.executor = make_executor(config, self.spec, self.max_model_len)
        try:
            self._start_executor(timings)
        except BaseException:
            self.executor.shutdown()   # no worker process outlives a failed startup
            raise
        pp = config.parallel.pipeline_parallel_size
        from sluice.kv_transfer.factory import make_scheduler_hooks   # None without a connector
        from sluice.lora.admission import LoRAAdmission   # --max-loras adapters per step
        from sluice.spec_decode.planner import make_speculation_planner   # None: off
        self.scheduler = Scheduler(config.scheduler, config.cache, self.max_model_len,
                                   self.num_kv_blocks, pipeline_parallel_size=pp,
                                   hooks=make_scheduler_hooks(config, self.spec),
                                   admission=(LoRAAdmission(config.lora.max_loras)
                                              if config.lora.enable_lora else None),
                                   speculation=make_speculation_planner(config,
                                                                        self.max_model_len))
        # pp > 1: the steps in the pipeline, oldest first (see step_with_batch_queue)
        self.batch_queue_size = pp
        self.batch_queue: deque[tuple[SchedulerOutput, Future[ModelRunnerOutput]]] | None = (
            deque() if pp > 1 else None)
        self.max_batches_in_flight = 0
        self.structured_output = make_structured_output_manager(config, self.spec)
        self.kv_event_publisher = self._start_kv_event_publisher()
        self.ready = EngineReady(
            num_kv_blocks=self.num_kv_blocks, block_size=config.cache.block_size,
            max_model_len=self.max_model_len, vocab_size=self.spec.vocab_size,
            model_name=(config.model.served_model_name or (Path(self.spec.path).name,))[0],
            eos_token_ids=list(self.spec.eos_token_ids),
            startup_seconds=timings)
        self.sleep_level = 0  # 0 awake; 1: KV cache released; 2: weights released too
        self._refused: list[str] = []  # requests that arrived while asleep, to abort
        logger.info("engine ready: %d KV blocks of %d tokens, max_model_len %d",
                    self.num_kv_blocks, config.cache.block_size, self.max_model_len)
        freeze_startup_heap()   # full collections skip the model and the imports from now on

    def _start_executor(self, timings: dict[str, float]) -> None:
        """Load the weights, size and allocate the KV cache, warm up (timed stages)."""
        config = self.config
        with _stage("load weights", timings):
            self.executor.load_model()
        with _stage("profile + allocate KV", timings):
            available = self.executor.determine_available_kv_memory()
            self.num_kv_blocks = num_kv_blocks_for(config, self.max_model_len, available,
                                                   self.executor.kv_cache_bytes_per_block())
            self.executor.initialize_kv_cache(self.num_kv_blocks)
        with _stage("warm up", timings):
            self.executor.warm_up()

    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue `request`. While asleep it is refused instead: the next step finishes it as
        aborted (the frontend refuses generation while asleep, so this is a safety net)."""
        if self.sleep_level:
            logger.warning("request %s arrived while the engine sleeps; aborting it",
                           request.request_id)
            self._refused.append(request.request_id)
            return
        if request.lora_request is not None and not self.config.lora.enable_lora:
            logger.error("request %s names adapter %r but LoRA is off (--enable-lora); "
                         "aborting it", request.request_id, request.lora_request.lora_name)
            self._refused.append(request.request_id)   # the frontends refuse it first
            return
        if request.sampling_params.structured_outputs is not None:   # scheduled once compiled
            self.structured_output.hold(Request.from_engine_core_request(request))
            return
        self.scheduler.add_request(Request.from_engine_core_request(request))

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        request_ids = list(request_ids)
        self.structured_output.drop(request_ids)
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return (bool(self._refused) or self.scheduler.has_unfinished_requests()
                or bool(self.batch_queue) or self.structured_output.num_waiting > 0)

    def step(self) -> EngineCoreOutputs:
        """Run one engine step and return what it produced."""
        if self.batch_queue is not None:
            return self.step_with_batch_queue()
        if self._refused:
            return self._refused_outputs()
        failed = self._admit_compiled()
        if not self.scheduler.has_unfinished_requests():
            return self._outputs(failed)
        scheduler_output = self.scheduler.schedule()
        structured = self.structured_output
        self.executor.execute_model(scheduler_output, grammar_follows=structured.active)
        grammar = structured.grammar_output(scheduler_output, self.scheduler.requests)
        runner_output = self.executor.sample_tokens(grammar)
        return self._update(scheduler_output, runner_output, failed)

    def step_with_batch_queue(self) -> EngineCoreOutputs:
        """One step with up to pp batches in the pipeline: schedule and submit a batch while
        the queue has room and something can run; while the pipeline is still filling, return
        at once (no outputs); otherwise wait for the oldest batch and update from it."""
        if self._refused:
            return self._refused_outputs()
        failed = self._admit_compiled()
        queue, submitted = self.batch_queue, False
        if len(queue) < self.batch_queue_size and self.scheduler.has_unfinished_requests():
            scheduler_output = self.scheduler.schedule()
            # an empty batch still goes if it carries finished ids for the workers to drop
            if not scheduler_output.is_empty or scheduler_output.finished_request_ids:
                # a request is in one batch at a time, so its grammar is current already
                grammar = self.structured_output.grammar_output(scheduler_output,
                                                                self.scheduler.requests)
                queue.append((scheduler_output,
                              self.executor.submit_step(scheduler_output, grammar)))
                self.max_batches_in_flight = max(self.max_batches_in_flight, len(queue))
                submitted = True
        if not queue or (submitted and len(queue) < self.batch_queue_size):
            return self._outputs(failed)
        scheduler_output, future = queue.popleft()
        return self._update(scheduler_output, future.result(), failed)

    def _update(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput,
                extra: list[EngineCoreOutput] | None = None) -> EngineCoreOutputs:
        """The end of a step: update the scheduler from its output, advance the grammars
        (one that has ended finishes its request as stopped), publish, report."""
        outputs = self.scheduler.update_from_output(scheduler_output, runner_output)
        ended = self.structured_output.advance(outputs)
        if ended:   # finished in an output of their own: their last token is text, not EOS
            ids = self.scheduler.finish_requests(ended, RequestStatus.FINISHED_STOPPED)
            self.structured_output.drop(ended)
            outputs += [EngineCoreOutput(rid, [], finish_reason=FinishReason.STOP) for rid in ids]
        self._publish_kv_events()
        return self._outputs(outputs + extra if extra else outputs)

    def _admit_compiled(self) -> list[EngineCoreOutput]:
        """Hand requests whose grammar has compiled to the scheduler; outputs aborting those
        whose grammar failed. With nothing else to run, wait briefly for a compilation
        instead of spinning."""
        structured = self.structured_output
        if not structured.num_waiting:
            return []
        if not self.scheduler.has_unfinished_requests() and not self.batch_queue:
            structured.wait_for_any(0.05)
        ready, failed = structured.take_ready()
        for request in ready:
            self.scheduler.add_request(request)
        return failed

    def _outputs(self, outputs: list[EngineCoreOutput]) -> EngineCoreOutputs:
        return EngineCoreOutputs(outputs=outputs, scheduler_stats=self.scheduler.make_stats(),
                                 timestamp=time.monotonic())

    # ---- step hook: KV events (--kv-events-config) ----------------------------------------------
    def _start_kv_event_publisher(self) -> EventPublisher | None:
        """With --kv-events-config: make the block pool record KV events and bind the
        publisher's sockets (a taken port fails startup). None when events are off."""
        from sluice.kv_events.config import parse_kv_events_config
        from sluice.kv_events.publisher import make_event_publisher
        try:
            publisher = make_event_publisher(
                parse_kv_events_config(self.config.cache.kv_events_config),
                self.config.parallel.data_parallel_rank)   # one port set per DP engine
        except BaseException:
            self.executor.shutdown()
            raise
        if publisher is not None:
            self.scheduler.kv_cache_manager.enable_kv_cache_events()
            if not self.config.cache.enable_prefix_caching:
                logger.warning("--kv-events-config without prefix caching: no block is ever "
                               "cached, so only AllBlocksCleared can be published")
        return publisher

    def _publish_kv_events(self) -> None:
        """Hand the KV events recorded since the last call to the publisher (a queue put)."""
        if self.kv_event_publisher is None:
            return
        events = self.scheduler.kv_cache_manager.take_events()
        if events:
            self.kv_event_publisher.publish(KVEventBatch(ts=time.time(), events=events))

    def _refused_outputs(self) -> EngineCoreOutputs:
        outputs = [EngineCoreOutput(request_id, [], finish_reason=FinishReason.ABORT)
                   for request_id in self._refused]
        self._refused = []
        return EngineCoreOutputs(outputs=outputs, scheduler_stats=self.scheduler.make_stats(),
                                 timestamp=time.monotonic())

    # ---- utility calls ---------------------------------------------------------------------
    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix block; False (nothing changed) while requests hold
        blocks, as vLLM."""
        done = self.scheduler.reset_prefix_cache()
        self._publish_kv_events()
        if done:
            logger.info("prefix cache reset")
        else:
            logger.warning("prefix cache not reset: running requests still hold KV blocks")
        return done

    def sleep(self, level: int) -> None:
        """Release the KV cache (level 1) or the KV cache and the weights (level 2) until
        `wake_up`. Only an idle engine sleeps (`EngineBusyError` otherwise): the prefix cache
        is reset first, since the blocks' contents are discarded. Asleep already at a level
        >= `level`: no-op; at a lower one: releases the rest."""
        if not self.config.model.enable_sleep_mode:
            raise ConfigError("Sleep mode is off; start the engine with --enable-sleep-mode.")
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}.")
        if level <= self.sleep_level:
            return
        if self.has_unfinished_requests() or not self.scheduler.reset_prefix_cache():
            raise EngineBusyError(
                f"Cannot sleep with {self.scheduler.get_num_unfinished_requests()} requests "
                "in flight; retry once they have finished.")
        self._publish_kv_events()   # the reset's AllBlocksCleared
        thaw_heap()   # the released weights and cache may sit in cycles made before the freeze
        self.executor.sleep(level)
        self.sleep_level = level

    def wake_up(self) -> None:
        """Reallocate the KV cache (and reload the weights after level 2). No-op when awake."""
        if self.sleep_level:
            self.executor.wake_up()
            self.sleep_level = 0
            freeze_startup_heap()

    def check_health(self) -> None:
        """Raise `EngineDeadError` if a worker died (the idle loop calls this each second)."""
        self.executor.check_health()

    def shutdown(self) -> None:
        self.structured_output.shutdown()
        if self.kv_event_publisher is not None:
            self.kv_event_publisher.shutdown()
        self.executor.shutdown()
        thaw_heap()   # this engine's cycles become collectable again (an LLM made and dropped)
