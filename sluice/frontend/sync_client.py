"""Engine-core clients for blocking callers (the offline `LLM`).

* `SyncClient(client)` wraps any asyncio `EngineCoreClient` (`client.py`): the client's event
  loop runs in a private thread and each call is carried over to it; nothing is written twice.
  `SyncMPClient(config)` is that over `start_engine_client(config)` (the engine core, or one
  per data-parallel engine, in child processes).
* `InprocClient` runs the engine core in this process (the offline `LLM` default):
  `get_output` runs one step.

The death contract is the async client's: once dead or shut down, calls raise
`EngineDeadError` naming the cause. No torch at import (the engine is imported lazily).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from abc import ABC, abstractmethod
from typing import Any, Coroutine, Iterable, TypeVar

from sluice.config import EngineConfig
from sluice.engine.launch import EngineProcess
from sluice.errors import EngineDeadError
from sluice.frontend.client import HEALTH_TIMEOUT_S, EngineCoreClient, start_engine_client
from sluice.messages import EngineCoreOutputs, EngineCoreRequest, EngineReady

T = TypeVar("T")
_DEAD = object()  # queued once the client is dead or closed


class SyncEngineCoreClient(ABC):
    """What the blocking offline `LLM` drives: `InprocClient` or `SyncClient`."""

    ready: EngineReady

    @abstractmethod
    def add_request(self, request: EngineCoreRequest) -> None: ...

    @abstractmethod
    def abort_requests(self, request_ids: Iterable[str]) -> None: ...

    @abstractmethod
    def get_output(self) -> EngineCoreOutputs:
        """The next batch of outputs (blocks until an engine produced a step)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the engine core(s); safe to call twice."""


class InprocClient(SyncEngineCoreClient):
    """The engine core in this process, stepped by the caller."""

    def __init__(self, config: EngineConfig):
        from sluice.engine.core import EngineCore  # lazy: keeps torch out of frontend imports
        self.engine = EngineCore(config)
        self.ready = self.engine.ready

    def add_request(self, request: EngineCoreRequest) -> None:
        self.engine.add_request(request)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.engine.abort_requests(request_ids)

    def get_output(self) -> EngineCoreOutputs:
        return self.engine.step()

    def reset_prefix_cache(self) -> bool:
        return self.engine.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        self.engine.sleep(level)

    def wake_up(self) -> None:
        self.engine.wake_up()

    def sleep_level(self) -> int:
        return self.engine.sleep_level

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


class SyncClient(SyncEngineCoreClient):
    """Blocking calls on an `EngineCoreClient` whose event loop runs in a private thread.
    A pump task moves outputs into a thread-safe queue, so `get_output(timeout_s)` may time
    out without losing one. Methods may be called from any thread."""

    def __init__(self, client: EngineCoreClient):
        self.client = client
        self.ready = client.ready
        self._outputs: queue.Queue[Any] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="sluice-client-loop",
                                        daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._pump(), self._loop)

    def _run_loop(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:  # as asyncio.run: cancel what is left, let it finish, close
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    async def _pump(self) -> None:
        try:
            while True:
                self._outputs.put(await self.client.get_output())
        except EngineDeadError:
            pass
        finally:
            self._outputs.put(_DEAD)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the client's loop and wait for its result."""
        if self._closed:
            coro.close()
            raise self.client.dead_error()
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError:  # the loop closed meanwhile
            coro.close()
            raise self.client.dead_error() from None
        return future.result()

    @property
    def is_dead(self) -> bool:
        return self.client.is_dead

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def processes(self) -> list[EngineProcess]:
        return list(getattr(self.client, "processes", []))

    def add_request(self, request: EngineCoreRequest) -> None:
        self._call(self.client.add_request(request))

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self._call(self.client.abort_requests(list(request_ids)))

    def get_output(self, timeout_s: float | None = None) -> EngineCoreOutputs:
        """The next step's outputs; raises `EngineDeadError`, or `TimeoutError` after
        `timeout_s`."""
        try:
            item = self._outputs.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no engine output within {timeout_s}s") from None
        if item is _DEAD:
            self._outputs.put(_DEAD)
            raise self.client.dead_error()
        return item

    def ping(self, timeout_s: float = HEALTH_TIMEOUT_S) -> float:
        return self._call(self.client.ping(timeout_s))

    def check_health(self, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
        self._call(self.client.check_health(timeout_s))

    def reset_prefix_cache(self) -> bool:
        return self._call(self.client.reset_prefix_cache())

    def sleep(self, level: int = 1) -> None:
        self._call(self.client.sleep(level))

    def wake_up(self) -> None:
        self._call(self.client.wake_up())

    def sleep_level(self) -> int:
        return self._call(self.client.sleep_level())

    def shutdown(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True

        async def shutdown_on_loop() -> None:
            self.client.shutdown()
        try:
            asyncio.run_coroutine_threadsafe(shutdown_on_loop(), self._loop).result()
        except RuntimeError:  # the loop is gone
            self.client.shutdown()
        finally:
            try:
                self._loop.call_soon_threadsafe(self._loop.stop)
            except RuntimeError:
                pass
            self._thread.join(10.0)
            self._outputs.put(_DEAD)


class SyncMPClient(SyncClient):
    """`SyncClient` over `start_engine_client(config)`: the engine core(s) in child processes,
    for blocking callers. `process`: the engine process (one engine)."""

    def __init__(self, config: EngineConfig, *, startup_timeout_s: float | None = None,
                 engine_factory: str | None = None):
        super().__init__(start_engine_client(config, startup_timeout_s=startup_timeout_s,
                                             engine_factory=engine_factory))

    @property
    def process(self) -> EngineProcess:
        assert len(self.processes) == 1, "several engines: use `processes`"
        return self.processes[0]
