"""The engine-core process: an `EngineCore` driven by a busy loop fed from ZeroMQ sockets.

    input thread:  PULL socket → decode (msgspec) → input_queue ─┐
    busy loop:     drain input_queue (add / abort / utility / shutdown) → step() → output_queue
    output thread: output_queue → encode (msgspec) → PUSH socket ─┘

The busy loop only sees Python objects. With no unfinished requests it blocks on the input queue
(a blocking `get` with a timeout, never a spin), so an idle engine costs no CPU; each time it
wakes idle it calls `engine.check_health()`, so a worker process that dies while no request
runs still ends the engine within about a second.

`run_engine_core` is the child's entry point (started by `sluice.engine.launch` in a *spawned*
process): it builds the `EngineCore` (loads the model …), answers the startup handshake with
`EngineReady` or the exception as text, then runs the loop until SHUTDOWN, SIGTERM or the parent's
death. An exception in the loop is logged, sent to the frontend as ENGINE_DEAD, and the process
exits 1. This module imports no torch at module scope (the frontend imports it to spawn).
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import shutil
import signal
import sys
import threading
from typing import Any, Callable, Protocol

import zmq

from sluice.config import EngineConfig
from sluice.engine.serial import (EngineFailure, HandshakeFailed, HandshakeReady, OutputType,
                                  RequestType, UtilityMethod, UtilityRequest, UtilityResult,
                                  encode_handshake, output_codec, request_codec)
from sluice.errors import SluiceError
from sluice.messages import EngineCoreOutputs, EngineCoreRequest, EngineReady
from sluice.platform.host import wait_for_parent_exit

logger = logging.getLogger(__name__)

IDLE_POLL_S = 1.0
"""How long the idle loop blocks on the input queue before looking around again."""
_PARENT_GONE_GRACE_S = 3.0
_STOP = object()


class Engine(Protocol):
    """What the loop needs of an engine core (`sluice.engine.core.EngineCore`)."""
    ready: EngineReady
    sleep_level: int

    def add_request(self, request: EngineCoreRequest) -> None: ...
    def abort_requests(self, request_ids: list[str]) -> None: ...
    def has_unfinished_requests(self) -> bool: ...
    def step(self) -> EngineCoreOutputs: ...
    def reset_prefix_cache(self) -> bool: ...
    def sleep(self, level: int) -> None: ...
    def wake_up(self) -> None: ...
    def check_health(self) -> None: ...
    def shutdown(self) -> None: ...


class EngineCoreProc:
    """Runs `engine` behind two sockets: PULL bound at `input_address`, PUSH connected to
    `output_address`. Sockets are created (and bound) in the constructor so address errors
    surface during startup; afterwards each socket is used only by its own I/O thread.
    Every `EngineCoreOutputs` (and its scheduler stats) leaves stamped with `engine_index`,
    this engine's data-parallel rank. Call `run_busy_loop()` on the main thread, then
    `close()`."""

    def __init__(self, engine: Engine, input_address: str, output_address: str,
                 engine_index: int = 0):
        self.engine = engine
        self.engine_index = engine_index
        self.input_queue: queue.Queue[tuple[RequestType, Any]] = queue.Queue()
        self.output_queue: queue.Queue[Any] = queue.Queue()
        self._shutdown_requested = False
        self._aborted = False
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._input = self._ctx.socket(zmq.PULL)
        self._input.setsockopt(zmq.LINGER, 0)
        self._input.setsockopt(zmq.RCVHWM, 0)
        self._input.bind(input_address)
        self._output = self._ctx.socket(zmq.PUSH)
        self._output.setsockopt(zmq.SNDHWM, 0)
        self._output.setsockopt(zmq.LINGER, 2000)  # flush the last outputs / ENGINE_DEAD
        self._output.setsockopt(zmq.RECONNECT_IVL, 10)  # the client binds after the handshake
        self._output.connect(output_address)
        self._threads = [
            threading.Thread(target=self._input_loop, name="sluice-core-input", daemon=True),
            threading.Thread(target=self._output_loop, name="sluice-core-output", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # ---- the busy loop (main thread) ----------------------------------------------------

    def run_busy_loop(self) -> None:
        """Drain inputs → step → push outputs, until a SHUTDOWN request. Exceptions from the
        engine propagate (the caller reports them with `send_failure`)."""
        while not self._shutdown_requested:
            self._aborted = False
            self._process_inputs(block=not self.engine.has_unfinished_requests())
            if self._shutdown_requested:
                break
            if self.engine.has_unfinished_requests():
                self._put_outputs(self.engine.step())
                continue
            self.engine.check_health()   # idle: a dead worker still ends the engine (<= 1 s)
            if self._aborted:
                # The last requests were aborted: publish the idle snapshot (if the engine
                # gives one) so that running/waiting gauges do not stay stale.
                outputs = self.engine.step()
                if outputs.scheduler_stats is not None:
                    self._put_outputs(outputs)

    def _put_outputs(self, outputs: EngineCoreOutputs) -> None:
        outputs.engine_index = self.engine_index
        if outputs.scheduler_stats is not None:
            outputs.scheduler_stats.engine_index = self.engine_index
        self.output_queue.put((OutputType.OUTPUTS, outputs))

    def request_shutdown(self) -> None:
        """Ask the loop to finish after its current step (thread-safe)."""
        self.input_queue.put((RequestType.SHUTDOWN, None))

    def _process_inputs(self, block: bool) -> None:
        try:
            item = self.input_queue.get(timeout=IDLE_POLL_S) if block else \
                self.input_queue.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self.input_queue.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: RequestType, payload: Any) -> None:
        if kind == RequestType.ADD:
            self.engine.add_request(payload)
        elif kind == RequestType.ABORT:
            self.engine.abort_requests(payload)
            self._aborted = True
        elif kind == RequestType.UTILITY:
            self.output_queue.put((OutputType.UTILITY_RESULT, self._call_utility(payload)))
        elif kind == RequestType.SHUTDOWN:
            self._shutdown_requested = True

    def _call_utility(self, call: UtilityRequest) -> UtilityResult:
        """Run one utility call between steps; see `UtilityMethod` for each one's value."""
        engine = self.engine
        try:
            value = 0
            if call.method == UtilityMethod.RESET_PREFIX_CACHE:
                value = int(engine.reset_prefix_cache())
            elif call.method == UtilityMethod.SLEEP:
                engine.sleep(call.arg)
            elif call.method == UtilityMethod.WAKE_UP:
                engine.wake_up()
            elif call.method == UtilityMethod.IS_SLEEPING:
                value = engine.sleep_level
            # PING: answering at all proves the loop is alive.
            return UtilityResult(call.call_id, value=value)
        except Exception as e:  # a failed utility call is reported to its caller only
            if isinstance(e, SluiceError):  # a refusal (busy, sleep mode off): no traceback
                logger.warning("utility call %s refused: %s", call.method.name, e)
            else:
                logger.exception("utility call %s failed", call.method.name)
            return UtilityResult(call.call_id, error=f"{type(e).__name__}: {e}")

    def send_failure(self, exc: BaseException) -> None:
        """Tell the frontend the loop died of `exc` (it will raise EngineDeadError)."""
        self.output_queue.put((OutputType.ENGINE_DEAD, EngineFailure.from_exception(exc)))

    # ---- I/O threads ----------------------------------------------------------------------

    def _input_loop(self) -> None:
        codec = request_codec()
        try:
            while not self._stop.is_set():
                if not self._input.poll(200, zmq.POLLIN):
                    continue
                frames = self._input.recv_multipart(copy=False)
                try:
                    self.input_queue.put(codec.decode([f.buffer for f in frames]))
                except Exception:
                    logger.exception("dropping a malformed request message")
        except zmq.ZMQError as e:
            if not self._stop.is_set():
                logger.error("engine input socket failed: %s", e)
        finally:
            self._input.close(linger=0)

    def _output_loop(self) -> None:
        codec = output_codec()
        try:
            while True:
                item = self.output_queue.get()
                if item is _STOP:
                    return
                self._output.send_multipart(codec.encode(*item), copy=False)
        except zmq.ZMQError as e:
            logger.error("engine output socket failed: %s", e)
        finally:
            self._output.close()

    def close(self, timeout_s: float = 3.0) -> None:
        """Flush queued outputs, stop both threads and close the sockets."""
        self._stop.set()
        self.output_queue.put(_STOP)
        for thread in self._threads:
            thread.join(timeout_s)
        if not any(t.is_alive() for t in self._threads):
            self._ctx.term()


# ---- the child process's entry point ----------------------------------------------------

def run_engine_core(config: EngineConfig, input_address: str, output_address: str,
                    handshake: multiprocessing.connection.Connection, ipc_dir: str,
                    engine_factory: str | None = None) -> None:
    """Entry point of the spawned engine-core process (see the module docstring).

    `handshake` is the write end of a pipe; exactly one `HandshakeReady`/`HandshakeFailed` is
    sent on it. `engine_factory` ("module:callable", called with the config) replaces
    `sluice.engine.core:EngineCore`. Exits 0 after SHUTDOWN/SIGTERM, 1 after a failure.
    """
    _setup_child_process(config)
    proc: EngineCoreProc | None = None
    _watch_parent(ipc_dir, lambda: proc)
    engine = None
    try:
        engine = _load_factory(engine_factory)(config)
        proc = EngineCoreProc(engine, input_address, output_address,
                              config.parallel.data_parallel_rank or 0)
    except BaseException as e:  # incl. SystemExit from SIGTERM during startup
        logger.debug("engine core startup failed", exc_info=True)
        _send_handshake(handshake, HandshakeFailed(EngineFailure.from_exception(e)))
        if engine is not None:
            _quietly(engine.shutdown)
        sys.exit(1)
    _send_handshake(handshake, HandshakeReady(engine.ready))
    exit_code = 0
    try:
        proc.run_busy_loop()
    except SystemExit:
        logger.info("engine core: terminated by signal, shutting down")
    except BaseException as e:
        if isinstance(e, SluiceError):   # a deliberate error (a worker died …): its message
            logger.error("engine core failed; in-flight requests are lost: %s", e)
        else:
            logger.exception("engine core failed; in-flight requests are lost")
        proc.send_failure(e)
        exit_code = 1
    finally:
        proc.close()
        _quietly(engine.shutdown)
    sys.exit(exit_code)


def _load_factory(spec: str | None) -> Callable[[EngineConfig], Engine]:
    if spec is None:
        from sluice.engine.core import EngineCore  # imports torch: only in the child
        return EngineCore
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _send_handshake(conn: multiprocessing.connection.Connection,
                    message: HandshakeReady | HandshakeFailed) -> None:
    try:
        conn.send_bytes(encode_handshake(message))
        conn.close()
    except OSError:  # the parent is gone or gave up waiting; nothing to tell
        pass


def _setup_child_process(config: EngineConfig) -> None:
    """Logging like the parent's; Ctrl-C belongs to the parent (which shuts us down);
    SIGTERM ends the loop cleanly via SystemExit."""
    if not logging.getLogger().handlers:
        rank = config.parallel.data_parallel_rank
        name = "engine" if config.parallel.data_parallel_size == 1 else f"engine {rank or 0}"
        logging.basicConfig(level=config.observability.log_level.upper(),
                            format=f"%(levelname)s %(asctime)s [{name}] %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, on_sigterm)


def _watch_parent(ipc_dir: str, get_proc: Callable[[], EngineCoreProc | None]) -> None:
    """Start a thread that ends this process when the parent dies (even by SIGKILL): the
    parent's sentinel pipe closes, or we get re-parented. A running loop gets a short grace
    period to shut down cleanly, then the process exits hard."""
    ppid = os.getppid()

    def watch() -> None:
        wait_for_parent_exit(ppid)
        logger.warning("engine core: the parent process is gone; exiting")
        shutil.rmtree(ipc_dir, ignore_errors=True)
        proc = get_proc()
        if proc is not None:
            proc.request_shutdown()
            threading.Event().wait(_PARENT_GONE_GRACE_S)
        os._exit(1)

    threading.Thread(target=watch, name="sluice-parent-watch", daemon=True).start()


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:
        logger.warning("engine core: error during shutdown", exc_info=True)
