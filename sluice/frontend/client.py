"""Engine-core clients: how a frontend talks to its engine core(s).

The client is written once, for asyncio (`EngineCoreClient`):

* `AsyncMPClient` runs one engine core in a spawned child process (`sluice.engine.launch`) and
  talks to it over two ZeroMQ `ipc://` sockets with msgspec-encoded messages
  (`sluice.engine.serial`): requests PUSH → child, outputs child → PULL.
* `DPAsyncMPClient` (`dp_client.py`) spreads requests over several of them (data parallelism).

`start_engine_client(config)` spawns the engine core(s) `config` asks for and returns the right
one. Blocking callers (the offline `LLM`) use `sync_client.py`: a thin wrapper that carries
calls to a private event-loop thread, or the engine core in-process.

Death contract of the MP clients: a monitor thread waits on the child's exit, and the child
reports a crash of its busy loop as an ENGINE_DEAD message. Either way the client is marked
dead, and every waiting and later call (`get_output`, `add_request`, utility calls …) raises
`EngineDeadError` whose message names the cause (the child's exception, or its exit code /
signal). Calls after `shutdown()` raise `EngineDeadError` too. `shutdown()` is idempotent.

The engine is imported lazily / spawned, so importing the frontend never imports torch.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from abc import ABC, abstractmethod
from typing import Any, Iterable

import zmq
import zmq.asyncio

from sluice.config import EngineConfig
from sluice.engine.launch import EngineProcess, launch_engines, shutdown_processes, wait_all_ready
from sluice.engine.serial import (EngineFailure, OutputType, RequestType, UtilityMethod,
                                  UtilityRequest, UtilityResult, output_codec, request_codec)
from sluice.errors import (ConfigError, EngineBusyError, EngineDeadError,
                           InvalidRequestError)
from sluice.messages import EngineCoreOutputs, EngineCoreRequest, EngineReady
from sluice.platform.host import describe_exit

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0
"""Default: a health ping not answered within this many seconds means the engine is hung."""
_DEAD = object()  # queued to wake output waiters once the client is dead or closed


class EngineCoreClient(ABC):
    """The engine-core client interface (asyncio). `ready` holds the runtime facts from
    startup, `engine_indexes` the data-parallel engines behind it. Use it from one event loop
    at a time (a later loop may take over once the previous one closed); `shutdown`,
    `abort_requests_nowait` and the state properties may be used from any thread."""

    ready: EngineReady
    engine_indexes: tuple[int, ...]
    # The loop the client's output queue belongs to (set by the subclass when it binds).
    _loop: asyncio.AbstractEventLoop | None
    _outputs: asyncio.Queue[Any] | None

    def _outputs_of(self, loop: asyncio.AbstractEventLoop) -> asyncio.Queue[Any] | None:
        """The output queue if the client is bound to `loop` already; None when the caller
        must bind it to `loop` (never bound, or the previous loop closed). Raises while
        another loop that is still open owns the client."""
        if self._loop is loop:
            assert self._outputs is not None
            return self._outputs
        if self._loop is not None and not self._loop.is_closed():
            raise RuntimeError(f"{type(self).__name__} is in use by another running event "
                               "loop.")
        return None

    @property
    @abstractmethod
    def is_dead(self) -> bool:
        """True once an engine core died (not after a clean `shutdown`)."""

    @property
    @abstractmethod
    def closed(self) -> bool: ...

    @abstractmethod
    def dead_error(self) -> EngineDeadError:
        """A fresh `EngineDeadError` saying why this client cannot serve."""

    @abstractmethod
    async def add_request(self, request: EngineCoreRequest) -> None: ...

    @abstractmethod
    async def abort_requests(self, request_ids: Iterable[str]) -> None: ...

    @abstractmethod
    def abort_requests_nowait(self, request_ids: Iterable[str]) -> None:
        """Best-effort abort that never blocks or raises (for `finally` blocks)."""

    @abstractmethod
    async def get_output(self) -> EngineCoreOutputs:
        """The next step's outputs (of any engine); raises `EngineDeadError` once dead."""

    @abstractmethod
    async def ping(self, timeout_s: float = HEALTH_TIMEOUT_S) -> float:
        """Round trip through the engine loop(s); the slowest one's seconds."""

    @abstractmethod
    async def check_health(self, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
        """Raise `EngineDeadError` if an engine died or does not answer a ping in time."""

    @abstractmethod
    async def reset_prefix_cache(self) -> bool:
        """Drop the cached prefix blocks; False while requests hold blocks."""

    @abstractmethod
    async def sleep(self, level: int = 1) -> None:
        """See `EngineCore.sleep`; raises `EngineBusyError` while requests are in flight."""

    @abstractmethod
    async def wake_up(self) -> None: ...

    @abstractmethod
    async def sleep_level(self) -> int:
        """The engine's sleep level (0: awake)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the engine core(s); idempotent."""


class MPClient:
    """What the ZeroMQ clients share: the child process (spawned, or a pre-launched
    `process` whose handshake may still be pending), the request socket, and the dead state.

    Raises `EngineStartupError` (the child's own message) when the engine fails to start.
    `engine_factory` ("module:callable") replaces the EngineCore class in the child.
    """

    def __init__(self, config: EngineConfig, *, process: EngineProcess | None = None,
                 startup_timeout_s: float | None = None, engine_factory: str | None = None):
        self.config = config
        self.process = process or EngineProcess(config, engine_factory=engine_factory)
        self._dead: str | None = None
        self._closed = False
        self._stopping = False   # SHUTDOWN sent by `request_stop`: an exit is expected
        self._state_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._call_ids = itertools.count()
        try:
            self.ready: EngineReady = self.process.ready or self.process.wait_ready(
                startup_timeout_s)
            self._ctx = zmq.Context()
            self._input = self._ctx.socket(zmq.PUSH)
            self._input.setsockopt(zmq.SNDHWM, 0)   # connect side: queues, never blocks
            self._input.setsockopt(zmq.LINGER, 0)
            self._input.connect(self.process.addresses.input)
            self._request_codec = request_codec()
        except BaseException:
            self.process.shutdown(grace_s=0.0)
            raise

    # ---- dead / closed state ----------------------------------------------------------------

    @property
    def is_dead(self) -> bool:
        """True once the engine core died (not after a clean `shutdown`)."""
        return self._dead is not None

    @property
    def closed(self) -> bool:
        return self._closed

    def dead_error(self) -> EngineDeadError:
        """A fresh `EngineDeadError` describing why this client cannot serve."""
        if self._dead is not None:
            return EngineDeadError(self._dead)
        return EngineDeadError("The engine core was shut down; no more requests can be served.")

    def _check_alive(self) -> None:
        if self._dead is not None or self._closed:
            raise self.dead_error()

    def _set_dead(self, message: str) -> None:
        """Mark the client dead (first cause wins) and wake every waiter. Any thread."""
        with self._state_lock:
            if self._dead is not None or self._closed:
                return
            self._dead = message
        logger.error("%s", message)
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        """Fail pending utility calls and wake `get_output` (any thread)."""
        raise NotImplementedError

    def _start_monitor(self) -> None:
        threading.Thread(target=self._monitor, name="sluice-engine-monitor",
                         daemon=True).start()

    def _monitor(self) -> None:
        self.process.wait_exit()
        if not (self._closed or self._stopping or self.process.closed):  # else: on purpose
            self._set_dead(
                f"The engine core process (pid {self.process.pid}) exited unexpectedly with "
                f"{describe_exit(self.process.exitcode)}; in-flight requests cannot complete. "
                "Check the engine log for the cause and restart.")

    def _on_engine_dead_message(self, failure: EngineFailure) -> None:
        self._set_dead(f"The engine core failed and stopped: {failure.describe()}")

    def _begin_close(self) -> bool:
        """Mark closed; False if it already was. Sends SHUTDOWN and stops the child."""
        with self._state_lock:
            if self._closed:
                return False
            self._closed = True
        if self._dead is None:
            try:
                self._send_raw(RequestType.SHUTDOWN, None)
            except zmq.ZMQError:
                pass
        self.process.shutdown()
        self._wake_waiters()
        return True

    def request_stop(self) -> None:
        """Ask the engine to finish and exit, without waiting (`shutdown` still reaps it), so
        that several engines stop at the same time."""
        if self._dead is None and not self._closed:
            self._stopping = True
            try:
                self._send_raw(RequestType.SHUTDOWN, None)
            except zmq.ZMQError:
                pass

    # ---- sending ----------------------------------------------------------------------------

    def _send(self, kind: RequestType, payload: Any) -> None:
        self._check_alive()
        self._send_raw(kind, payload)

    def _send_raw(self, kind: RequestType, payload: Any) -> None:
        with self._send_lock:
            self._input.send_multipart(self._request_codec.encode(kind, payload),
                                       flags=zmq.NOBLOCK, copy=False)


class AsyncMPClient(MPClient, EngineCoreClient):
    """asyncio client for `AsyncLLM` with the engine core in a child process.

    Construction blocks (spawn + handshake). The output socket and its reader task are bound
    to the event loop of the first async call; once that loop is closed, a later loop may take
    over (e.g. successive `asyncio.run`s). Use it from one event loop thread; `shutdown` and
    `abort_requests_nowait` may be called from any thread.
    """

    def __init__(self, config: EngineConfig, **kwargs: Any):
        super().__init__(config, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outputs: asyncio.Queue[Any] | None = None
        self._output: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[int]] = {}
        self.engine_index = self.process.engine_index
        self.engine_indexes = (self.engine_index,)
        self._start_monitor()

    @property
    def processes(self) -> list[EngineProcess]:
        return [self.process]

    def _ensure_started(self) -> asyncio.Queue[Any]:
        """Bind the output socket and start the reader in the running loop (once per loop)."""
        loop = asyncio.get_running_loop()
        if (outputs := self._outputs_of(loop)) is not None:
            return outputs
        if self._closed:  # sockets are gone: only report
            self._loop, self._outputs = loop, asyncio.Queue()
            self._outputs.put_nowait(_DEAD)
            return self._outputs
        if self._output is not None:
            self._output.close(linger=0)
        self._output = zmq.asyncio.Context.shadow(self._ctx.underlying).socket(zmq.PULL)
        self._output.setsockopt(zmq.RCVHWM, 0)
        self._output.bind(self.process.addresses.output)
        self._loop, self._outputs, self._pending = loop, asyncio.Queue(), {}
        self._reader = loop.create_task(self._read_loop(self._output), name="sluice-outputs")
        if self._dead is not None or self._closed:
            self._outputs.put_nowait(_DEAD)
        return self._outputs

    async def add_request(self, request: EngineCoreRequest) -> None:
        self._ensure_started()
        self._send(RequestType.ADD, request)

    async def abort_requests(self, request_ids: Iterable[str]) -> None:
        self._ensure_started()
        request_ids = list(request_ids)
        if request_ids:
            self._send(RequestType.ABORT, request_ids)

    def abort_requests_nowait(self, request_ids: Iterable[str]) -> None:
        """Best-effort abort that never blocks or raises (for `finally` blocks of cancelled
        tasks); a dead or closed engine has nothing left to abort."""
        request_ids = list(request_ids)
        if request_ids and self._dead is None and not self._closed:
            try:
                self._send_raw(RequestType.ABORT, request_ids)
            except zmq.ZMQError as e:
                logger.warning("could not send abort for %s: %s", request_ids, e)

    async def get_output(self) -> EngineCoreOutputs:
        """The next step's outputs; raises `EngineDeadError` once the engine is dead."""
        outputs = self._ensure_started()
        item = await outputs.get()
        if item is _DEAD:
            outputs.put_nowait(_DEAD)
            raise self.dead_error()
        return item

    async def call_utility(self, method: UtilityMethod, timeout_s: float | None = None,
                           arg: int = 0) -> int:
        """Run `method(arg)` in the engine's loop and return its value (see `UtilityMethod`);
        raises `TimeoutError`, `EngineDeadError`, or the engine's error (`utility_error`)."""
        self._ensure_started()
        self._check_alive()
        assert self._loop is not None
        future: asyncio.Future[int] = self._loop.create_future()
        call_id = next(self._call_ids)
        self._pending[call_id] = future
        try:
            self._send(RequestType.UTILITY, UtilityRequest(call_id, method, arg))
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._pending.pop(call_id, None)

    async def ping(self, timeout_s: float = HEALTH_TIMEOUT_S) -> float:
        """Round trip through the engine loop; returns its duration in seconds."""
        start = time.perf_counter()
        await self.call_utility(UtilityMethod.PING, timeout_s)
        return time.perf_counter() - start

    async def check_health(self, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
        """Raise `EngineDeadError` if the engine died or does not answer a ping in time
        (a hung loop is reported, not marked dead: a later check may pass)."""
        self._check_alive()
        try:
            await self.ping(timeout_s)
        except TimeoutError:
            raise EngineDeadError(_hung_message(self.process.pid, timeout_s)) from None

    async def reset_prefix_cache(self) -> bool:
        """Drop the engine's cached prefix blocks; False while requests hold blocks."""
        return bool(await self.call_utility(UtilityMethod.RESET_PREFIX_CACHE))

    async def sleep(self, level: int = 1) -> None:
        """See `EngineCore.sleep`; raises `EngineBusyError` while requests are in flight."""
        await self.call_utility(UtilityMethod.SLEEP, arg=level)

    async def wake_up(self) -> None:
        await self.call_utility(UtilityMethod.WAKE_UP)

    async def sleep_level(self) -> int:
        """The engine's sleep level (0: awake)."""
        return await self.call_utility(UtilityMethod.IS_SLEEPING)

    def shutdown(self) -> None:
        """Stop the engine core and close the sockets (idempotent, any thread)."""
        if not self._begin_close():
            return
        loop = self._loop
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if loop is None or loop.is_closed() or on_loop:
            self._close_sockets()
        else:
            try:
                loop.call_soon_threadsafe(self._close_sockets)
            except RuntimeError:  # closed meanwhile
                self._close_sockets()

    def _close_sockets(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
        if self._output is not None:
            self._output.close(linger=0)
        self._input.close(linger=0)
        self._ctx.term()

    async def _read_loop(self, socket: zmq.asyncio.Socket) -> None:
        codec = output_codec()
        try:
            while True:
                frames = await socket.recv_multipart(copy=False)
                kind, payload = codec.decode([f.buffer for f in frames])
                if kind == OutputType.OUTPUTS:
                    assert self._outputs is not None
                    self._outputs.put_nowait(payload)
                elif kind == OutputType.UTILITY_RESULT:
                    _resolve(self._pending.pop(payload.call_id, None), payload)
                else:
                    self._on_engine_dead_message(payload)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not self._closed:
                self._set_dead(f"Reading the engine core's output failed: {e!r}")

    def _wake_waiters(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # `_ensure_started` on a new loop queues _DEAD itself
        try:
            loop.call_soon_threadsafe(self._wake_in_loop)
        except RuntimeError:
            pass

    def _wake_in_loop(self) -> None:
        for call_id in list(self._pending):
            future = self._pending.pop(call_id)
            if not future.done():
                future.set_exception(self.dead_error())
        if self._outputs is not None:
            self._outputs.put_nowait(_DEAD)


# ---- construction --------------------------------------------------------------------------

def client_for(processes: list[EngineProcess]) -> EngineCoreClient:
    """The client over started engine processes (handshakes done): an `AsyncMPClient` for
    one, a `DPAsyncMPClient` for several. On failure every process is shut down."""
    clients: list[AsyncMPClient] = []
    try:
        for process in processes:
            clients.append(AsyncMPClient(process.config, process=process))
    except BaseException:
        shutdown_processes(processes)
        raise
    if len(clients) == 1:
        return clients[0]
    from sluice.frontend.dp_client import DPAsyncMPClient
    return DPAsyncMPClient(clients)


def start_engine_client(config: EngineConfig, *, startup_timeout_s: float | None = None,
                        engine_factory: str | None = None) -> EngineCoreClient:
    """Spawn the engine core(s) of `config` (one per data-parallel engine this process runs),
    wait for their handshakes and return their client. Raises `EngineStartupError`."""
    processes = launch_engines(config, engine_factory=engine_factory)
    wait_all_ready(processes, startup_timeout_s)
    return client_for(processes)


_UTILITY_ERRORS: dict[str, type[Exception]] = {
    "EngineBusyError": EngineBusyError, "ConfigError": ConfigError,
    "ValueError": InvalidRequestError,
}


def utility_error(error: str) -> Exception:
    """The exception for a failed utility call's `error` ("Type: message"): the engine's own
    refusals (`EngineBusyError`, `ConfigError`, a bad argument as `InvalidRequestError`) with
    their message, anything else a `RuntimeError`."""
    name, _, message = error.partition(": ")
    cls = _UTILITY_ERRORS.get(name)
    if cls is not None:
        return cls(message)
    return RuntimeError(f"engine utility call failed: {error}")


def _resolve(future: Any, result: UtilityResult) -> None:
    """Complete a sync or asyncio future with a utility result (on the future's thread)."""
    if future is None or future.done():
        return
    if result.error:
        future.set_exception(utility_error(result.error))
    else:
        future.set_result(result.value)


def _hung_message(pid: int, timeout_s: float) -> str:
    return (f"The engine core process (pid {pid}) did not answer a health ping within "
            f"{timeout_s:g}s; it is hung or stuck in a very long step.")
