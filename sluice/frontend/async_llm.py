"""AsyncLLM: the asyncio frontend the OpenAI server drives. Never imports torch.

    llm = AsyncLLM.from_config(config)          # spawns the engine core, waits for the handshake
    async for out in llm.generate(prompt, params, request_id):   # RequestOutputs as they come
        ...
    llm.shutdown()

Contract:
* `generate` is an async generator. Its first `__anext__` validates the request
  (`InvalidRequestError` → HTTP 400, raised before any output; a large text prompt is tokenized
  on the `offloader`'s threads, off the event loop), registers it with the
  `OutputProcessor` and sends it to the engine; outputs then arrive on a per-request queue.
  If the consumer stops early (generator closed, task cancelled: the client disconnected), the
  request is aborted in the engine so its KV blocks are freed. `abort(request_id)` ends the
  matching `generate` without a further output.
* One background task per event loop (the output handler) pulls `EngineCoreOutputs`, runs
  `process_outputs`, aborts stop-string hits in the engine, routes each `RequestOutput` by
  request id, and calls the stats listeners.
* Data parallelism (--data-parallel-size N): the client is a `DPAsyncMPClient` over N engine
  cores (`dp_client.py`); each step's outputs and stats name their engine (`engine_index`),
  utility calls (reset_prefix_cache, sleep, wake_up, is_sleeping, health) reach every engine,
  and one engine dying is the engine dying.
* When the engine core dies, every waiting and later `generate` raises `EngineDeadError`
  (naming the cause), `is_dead` turns True and `check_health` raises. After `shutdown()` calls
  raise `EngineDeadError` too; `shutdown` is idempotent.
* Sleep mode (`--enable-sleep-mode`): `sleep(level)` only on an idle engine (`EngineBusyError`
  otherwise); from the moment it is called until `wake_up()` has returned, `generate` raises
  `EngineSleepingError` before sending anything. `sleep_level` is this frontend's view (all
  changes go through it); `is_sleeping()` asks the engine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, AsyncIterator, Callable, Sequence

from sluice.config import EngineConfig
from sluice.engine.launch import launch_engines, shutdown_processes, wait_all_ready
from sluice.errors import (EngineBusyError, EngineDeadError, EngineSleepingError,
                           InvalidRequestError)
from sluice.frontend.client import HEALTH_TIMEOUT_S, EngineCoreClient, client_for
from sluice.frontend.input_processor import InputProcessor
from sluice.frontend.offload import Offloader
from sluice.frontend.output_processor import OutputProcessor
from sluice.frontend.stats import FrontendStats
from sluice.frontend.tokenizer import Tokenizer, load_tokenizer
from sluice.lora.registry import check_lora_request, validator_from_config
from sluice.lora.request import LoRARequest
from sluice.model_spec.resolve import resolve_model_config
from sluice.messages import EngineCoreOutputs, SchedulerStats
from sluice.outputs import RequestOutput
from sluice.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

StatsListener = Callable[[SchedulerStats | None, FrontendStats], None]
"""Called on the event loop once per engine step's outputs with that step's scheduler stats
(None if the step carried none) and the frontend stats gathered since the previous call (the
same `FrontendStats` object is passed to every listener; do not mutate it). Both name the
engine that stepped (`engine_index`)."""

_ABORTED = object()  # queued by `abort()`: end the matching generate() quietly


class AsyncLLM:
    """Engine core(s) in child processes behind an asyncio API (see the module docstring).

    Attributes: `config`, `ready` (EngineReady), `model_name`, `tokenizer`, `client`,
    `engine_indexes` (the data-parallel engines served: (0,) without data parallelism).
    Use one event loop at a time; a new loop may take over after the previous one closed.
    """

    def __init__(self, config: EngineConfig, client: EngineCoreClient, tokenizer: Tokenizer):
        self.config = config
        self.client = client
        self.ready = client.ready
        self.engine_indexes = client.engine_indexes
        self.model_name: str = client.ready.model_name
        self.tokenizer = tokenizer
        self.input_processor = InputProcessor.from_ready(tokenizer, self.ready,
                                                         config.model.max_logprobs)
        self.output_processor = OutputProcessor(tokenizer, log_stats=True)
        self.offloader = Offloader(name="sluice-tokenize")
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._handler: asyncio.Task[None] | None = None
        self._handler_loop: asyncio.AbstractEventLoop | None = None
        self._handler_error: str | None = None
        self._stats_listeners: list[StatsListener] = []
        self._scheduler_stats: dict[int, SchedulerStats] = {}  # the latest, per engine
        self._log_requests = not config.observability.disable_log_requests
        self._sleep_level = 0
        self._lora_validator = validator_from_config(config)   # None without --enable-lora

    @classmethod
    def from_config(cls, config: EngineConfig, *,
                    startup_timeout_s: float | None = None) -> "AsyncLLM":
        """Spawn the engine core(s) and load the tokenizer meanwhile; block until all are
        ready. Raises `EngineStartupError` with the engine's own message, or the tokenizer's
        `ModelLoadError`. A hub id or .gguf model is resolved to a local directory first."""
        config = resolve_model_config(config)
        processes = launch_engines(config)
        loaded: dict[str, Any] = {}

        def load() -> None:
            try:
                loaded["tokenizer"] = load_tokenizer(config.model.tokenizer or config.model.model,
                                                     chat_template=config.model.chat_template)
            except BaseException as e:
                loaded["error"] = e

        thread = threading.Thread(target=load, name="sluice-load-tokenizer", daemon=True)
        thread.start()
        try:
            wait_all_ready(processes, startup_timeout_s)  # its error wins over the tokenizer's
            thread.join()
            if "error" in loaded:
                raise loaded["error"]
            client = client_for(processes)
        except BaseException:
            shutdown_processes(processes)
            raise
        return cls(config, client, loaded["tokenizer"])

    # ---- requests ---------------------------------------------------------------------------

    async def generate(self, prompt: str | Sequence[int], sampling_params: SamplingParams,
                       request_id: str, *, priority: int = 0, add_special_tokens: bool = True,
                       prompt_text: str | None = None, cache_salt: str | None = None,
                       kv_transfer_params: dict | None = None,
                       lora_request: LoRARequest | None = None,
                       ) -> AsyncIterator[RequestOutput]:
        """Stream the `RequestOutput`s of one request (kind per `sampling_params.output_kind`);
        the last one has `finished=True`. `prompt_text` is echoed as `RequestOutput.prompt`
        (default: the prompt when it is text); `cache_salt` keeps its prefix-cache blocks apart
        from those of other salts; `lora_request` runs it with that adapter (needs
        --enable-lora; None: the base model). Raises `InvalidRequestError` before the first
        output, `EngineDeadError` whenever the engine is or becomes dead."""
        self._check_alive()
        self._check_awake()
        check_lora_request(self._lora_validator, lora_request)
        loop = asyncio.get_running_loop()
        self._ensure_output_handler(loop)
        request = await self.offloader.run_if_large(
            len(prompt), self.input_processor.process, request_id, prompt, sampling_params,
            None, priority, add_special_tokens=add_special_tokens, cache_salt=cache_salt,
            kv_transfer_params=kv_transfer_params, lora_request=lora_request)
        if prompt_text is None and isinstance(prompt, str):
            prompt_text = prompt
        self._check_awake()  # again: sleep() may have begun while the prompt was tokenized
        engine_requests = self.output_processor.add_request(request, prompt_text)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queues[request_id] = queue
        if self._log_requests:
            self._log_request(request_id, prompt_text, request.prompt_token_ids,
                              request.sampling_params)
        finished = False
        try:
            for engine_request in engine_requests:
                await self.client.add_request(engine_request)
            while not finished:
                item = await queue.get()
                if item is _ABORTED:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    raise item  # the finally drops the request's state
                finished = item.finished
                yield item
        finally:
            if self._queues.get(request_id) is queue:
                del self._queues[request_id]
            if not finished:
                self._abort_now(request_id)

    def _log_request(self, request_id: str, prompt: str | None, token_ids: Sequence[int],
                     params: SamplingParams) -> None:
        """vLLM's request log line: id, prompt and prompt token ids (each cut to
        --max-log-len), sampling parameters."""
        n = self.config.observability.max_log_len
        shown_ids = list(token_ids) if n is None else list(token_ids[:n])
        more = "" if n is None or len(token_ids) <= n else f" ... ({len(token_ids)} in all)"
        logger.info("Received request %s: prompt: %r, params: %s, prompt_token_ids: %s%s",
                    request_id, None if prompt is None else prompt[:n], params, shown_ids, more)

    async def abort(self, request_id: str) -> None:
        """Abort a request (unknown or finished ids are ignored); its `generate` ends."""
        self._abort_now(request_id)
        queue = self._queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(_ABORTED)

    def _abort_now(self, request_id: str) -> None:
        engine_ids = self.output_processor.abort_requests([request_id])
        self.client.abort_requests_nowait(engine_ids)
        if engine_ids and self._log_requests:
            logger.info("request %s aborted", request_id)

    # ---- the output handler -----------------------------------------------------------------

    def _ensure_output_handler(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._handler is not None and self._handler_loop is loop:
            return
        if self._handler_loop is not None and not self._handler_loop.is_closed():
            raise RuntimeError("AsyncLLM is in use by another running event loop.")
        self._queues.clear()  # leftovers of a closed loop
        self._handler_loop = loop
        self._handler = loop.create_task(self._run_output_handler(), name="sluice-output-handler")

    async def _run_output_handler(self) -> None:
        try:
            while True:
                outputs = await self.client.get_output()
                self._process(outputs)
        except asyncio.CancelledError:
            raise
        except EngineDeadError:
            pass
        except Exception as e:
            logger.exception("AsyncLLM output handler failed")
            self._handler_error = f"The AsyncLLM output handler failed: {e!r}"
        self._fail_all()

    def _process(self, outputs: EngineCoreOutputs) -> None:
        processed = self.output_processor.process_outputs(outputs.outputs)
        if processed.request_ids_to_abort:
            self.client.abort_requests_nowait(processed.request_ids_to_abort)
        for request_output in processed.request_outputs:
            queue = self._queues.get(request_output.request_id)
            if queue is not None:
                queue.put_nowait(request_output)
        if outputs.scheduler_stats is not None:
            self._scheduler_stats[outputs.engine_index] = outputs.scheduler_stats
        frontend_stats = self.output_processor.take_stats()
        frontend_stats.engine_index = outputs.engine_index
        for listener in list(self._stats_listeners):
            try:
                listener(outputs.scheduler_stats, frontend_stats)
            except Exception:
                logger.exception("stats listener %r failed", listener)

    def _fail_all(self) -> None:
        """Wake every waiting generate() with its own EngineDeadError (on the loop thread)."""
        for request_id in list(self._queues):
            self._queues.pop(request_id).put_nowait(self._dead_error())

    # ---- health, stats, lifecycle -------------------------------------------------------------

    @property
    def is_dead(self) -> bool:
        """True once the engine core died (or the output handler failed)."""
        return self.client.is_dead or self._handler_error is not None

    errored = is_dead

    def _dead_error(self) -> EngineDeadError:
        if self._handler_error is not None:
            return EngineDeadError(self._handler_error)
        return self.client.dead_error()

    def _check_alive(self) -> None:
        if self.is_dead or self.client.closed:
            raise self._dead_error()

    async def check_health(self, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
        """Raise `EngineDeadError` if the engine is dead, or does not answer a ping through its
        loop within `timeout_s` (hung)."""
        self._check_alive()
        await self.client.check_health(timeout_s)

    async def reset_prefix_cache(self) -> bool:
        """Drop the engine's cached prefix blocks; False (nothing changed) while requests
        hold KV blocks, as vLLM."""
        self._check_alive()
        return await self.client.reset_prefix_cache()

    # ---- sleep mode ---------------------------------------------------------------------------

    @property
    def sleep_level(self) -> int:
        """0 when awake; 1 or 2 from the moment `sleep` was called until `wake_up` returned."""
        return self._sleep_level

    def sleeping_error(self) -> EngineSleepingError:
        """The error generation gets while asleep (says why and what to do)."""
        released = "KV cache" if self._sleep_level == 1 else "KV cache and weights"
        return EngineSleepingError(
            f"The model is sleeping (sleep level {self._sleep_level}: its {released} "
            "released); generation is unavailable until it is woken up (POST /wake_up).")

    def _check_awake(self) -> None:
        if self._sleep_level:
            raise self.sleeping_error()

    async def sleep(self, level: int = 1) -> None:
        """Put the engine to sleep: level 1 frees the KV cache, level 2 the weights too.
        Raises `EngineBusyError` while requests are in flight (nothing changes then)."""
        self._check_alive()
        if level not in (1, 2):
            raise InvalidRequestError(f"level must be 1 or 2, got {level}.", param="level")
        if self.output_processor.has_unfinished_requests():
            raise EngineBusyError(
                f"Cannot sleep with {self.num_unfinished_requests} requests in flight; retry "
                "once they have finished.")
        previous = self._sleep_level
        self._sleep_level = max(previous, level)  # refuse new requests from now on
        try:
            await self.client.sleep(level)
        except BaseException:
            self._sleep_level = previous
            raise

    async def wake_up(self) -> None:
        """Reallocate the KV cache (and reload the weights after level 2); generation is
        accepted again once this returns. No-op when awake."""
        self._check_alive()
        await self.client.wake_up()
        self._sleep_level = 0

    async def is_sleeping(self) -> bool:
        """Whether the engine reports itself asleep (a round trip through its loop)."""
        self._check_alive()
        return await self.client.sleep_level() > 0

    def add_stats_listener(self, listener: StatsListener) -> None:
        """Register `listener(scheduler_stats, frontend_stats)`, called after every engine
        step's outputs (see `StatsListener`); exceptions are logged, not raised."""
        self._stats_listeners.append(listener)

    def remove_stats_listener(self, listener: StatsListener) -> None:
        self._stats_listeners.remove(listener)

    @property
    def latest_scheduler_stats(self) -> SchedulerStats | None:
        """The scheduler snapshot of the most recent engine step (None before the first);
        with several engines, their latest snapshots summed (KV-cache usage: the mean)."""
        snapshots = list(self._scheduler_stats.values())
        if len(snapshots) <= 1:
            return snapshots[0] if snapshots else None
        return SchedulerStats(
            num_running_reqs=sum(s.num_running_reqs for s in snapshots),
            num_waiting_reqs=sum(s.num_waiting_reqs for s in snapshots),
            kv_cache_usage=sum(s.kv_cache_usage for s in snapshots) / len(snapshots))

    @property
    def num_unfinished_requests(self) -> int:
        """User requests registered here and not finished (running or waiting)."""
        return self.output_processor.get_num_unfinished_requests()

    @property
    def num_waiting_requests(self) -> int:
        """Estimate of requests not yet running: unfinished here minus the engine's running
        count at its last step (n > 1 requests count once here, n times there)."""
        stats = self.latest_scheduler_stats
        running = stats.num_running_reqs if stats is not None else 0
        return max(0, self.num_unfinished_requests - running)

    @property
    def max_num_queued_requests(self) -> int | None:
        """`--max-num-queued-requests`: the server answers 429 beyond it (None: no limit)."""
        return self.config.scheduler.max_num_queued_requests

    def shutdown(self) -> None:
        """Stop the engine core(s); waiting generate() calls raise EngineDeadError.
        Idempotent."""
        self.client.shutdown()
        self.offloader.shutdown()

    def __enter__(self) -> "AsyncLLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
