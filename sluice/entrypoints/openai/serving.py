"""What every endpoint shares: the server state, admission (model name, queue limit, engine
health), running several generations at once, and client-disconnect handling.

Contract with the engine (`AsyncLLM`): `generate(...)` is an async iterator that raises
`InvalidRequestError` before its first output for bad input; cancelling the task that iterates
it aborts the request in the engine (its KV blocks are freed). `Generations` therefore runs one
pump task per prompt and aborts everything by cancelling those tasks.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from sluice.config import EngineConfig
from sluice.entrypoints.openai.errors import APIError
from sluice.errors import EngineDeadError, InvalidRequestError
from sluice.outputs import RequestOutput
from sluice.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")

DISCONNECT_POLL_S = 0.25
SSE_DONE = "data: [DONE]\n\n"


def sse(data: str) -> str:
    """One server-sent event carrying `data` (a JSON document)."""
    return f"data: {data}\n\n"


@dataclass
class ServerState:
    """Per-app state: the engine, its config and runtime facts, counters."""

    engine: Any  # AsyncLLM (typed loosely: the frontend must not be imported eagerly)
    config: EngineConfig
    model_name: str
    max_model_len: int
    metrics: Any = None  # sluice.metrics.prometheus.PrometheusMetrics
    num_in_flight: int = 0

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def check_model(self, model: str | None) -> None:
        """404 unless `model` is None or the served model's name."""
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model")

    def num_queued(self) -> int:
        """Requests admitted but not running: unfinished (counted here and by the engine,
        whichever is larger, since a just-admitted request may not be registered yet) minus
        those running at the engine's last step."""
        unfinished = max(self.num_in_flight, int(self.engine.num_unfinished_requests))
        stats = getattr(self.engine, "latest_scheduler_stats", None)
        running = stats.num_running_reqs if stats is not None else 0
        return max(0, unfinished - running)

    def admit(self, num_requests: int = 1) -> "Admission":
        """Admit `num_requests` engine requests until the returned ticket is released, or
        refuse: 503 when the engine is dead, 429 when `--max-num-queued-requests` are already
        waiting."""
        if self.engine.is_dead:
            raise EngineDeadError()
        limit = self.config.scheduler.max_num_queued_requests
        if limit is not None and self.num_queued() + num_requests > limit:
            raise APIError(429, f"The server already has {limit} requests waiting "
                           f"(--max-num-queued-requests {limit}); retry later.")
        self.num_in_flight += num_requests
        return Admission(self, num_requests)


class Admission:
    """A ticket for admitted requests; `release()` is idempotent (also a context manager)."""

    def __init__(self, state: ServerState, num_requests: int):
        self._state: ServerState | None = state
        self._num = num_requests

    def release(self) -> None:
        if self._state is not None:
            self._state.num_in_flight -= self._num
            self._state = None

    def __enter__(self) -> "Admission":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class CleanupStreamingResponse(StreamingResponse):
    """A streaming response that runs `cleanup()` however it ends (finished, client gone
    before the first chunk, cancelled): aborting generations and releasing admission must
    not depend on the body iterator ever being started."""

    def __init__(self, content: AsyncIterator[str], cleanup: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})
        self._cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()


def get_state(request: Request) -> ServerState:
    return request.app.state.sluice


class Generations:
    """Several engine generations (one per prompt) iterated together.

    `start()` waits until every generation produced its first output, so a validation error
    (raised by the engine before the first output) surfaces before any response is sent; it
    then re-raises that error after aborting the others. Iterating yields `(prompt_index,
    RequestOutput)` as they arrive. `abort()` cancels everything (synchronous, so it is safe in
    a `finally` of a cancelled stream).
    """

    _DONE = object()

    def __init__(self, iterators: Sequence[AsyncIterator[RequestOutput]]):
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._num = len(iterators)
        self._tasks = [asyncio.create_task(self._pump(i, it)) for i, it in enumerate(iterators)]
        self._buffer: list[tuple[int, RequestOutput]] = []
        self._open = self._num

    async def _pump(self, index: int, iterator: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in iterator:
                self._queue.put_nowait((index, output))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - delivered to the consumer
            self._queue.put_nowait((index, e))
        finally:
            self._queue.put_nowait((index, self._DONE))

    async def _next(self) -> tuple[int, Any]:
        index, item = await self._queue.get()
        if item is self._DONE:
            self._open -= 1
        elif isinstance(item, BaseException):
            self.abort()
            raise item
        return index, item

    async def start(self) -> None:
        """Wait for the first output of every generation (raises the first error)."""
        pending = set(range(self._num))
        try:
            while pending:
                index, item = await self._next()
                if item is self._DONE:
                    pending.discard(index)
                    continue
                pending.discard(index)
                self._buffer.append((index, item))
        except BaseException:
            self.abort()
            raise

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        try:
            for entry in self._buffer:
                yield entry
            self._buffer.clear()
            while self._open > 0:
                index, item = await self._next()
                if item is not self._DONE:
                    yield index, item
        finally:
            self.abort()

    async def final_outputs(self) -> list[RequestOutput]:
        """The last output of each generation, in prompt order (for FINAL_ONLY requests)."""
        last: dict[int, RequestOutput] = {}
        async for index, output in self:
            last[index] = output
        missing = [i for i in range(self._num) if i not in last]
        if missing:
            raise EngineDeadError("The engine ended a request without a result.")
        return [last[i] for i in range(self._num)]

    def abort(self) -> None:
        for task in self._tasks:
            if not task.done():
                task.cancel()


def start_generations(state: ServerState, prompts: Sequence[str | list[int]],
                      params: SamplingParams, request_id: str, *, priority: int,
                      add_special_tokens: bool) -> Generations:
    """One engine generation per prompt, ids `{request_id}-{i}`."""
    return Generations([
        state.engine.generate(prompt, params, f"{request_id}-{i}", priority=priority,
                              add_special_tokens=add_special_tokens)
        for i, prompt in enumerate(prompts)])


async def run_unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its engine requests) if the client goes away
    first; then raises `APIError(499)` (answered to nobody, logged at info)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if task.cancelled():
        logger.info("Client disconnected; aborted request %s",
                    getattr(request.state, "request_id", "?"))
        raise APIError(499, "The client disconnected before the response was ready.")
    return task.result()


def prompt_error_param(exc: InvalidRequestError, is_chat: bool) -> InvalidRequestError:
    """For chat requests a 'prompt' problem is a 'messages' problem."""
    if is_chat and exc.param == "prompt":
        return InvalidRequestError(exc.message.replace("prompt", "conversation"), "messages")
    return exc
