"""Spawn the engine-core process, wait for its handshake, and make sure it never outlives us.

Contract:
* `EngineProcess(config)` creates a private IPC directory (`mkdtemp`, mode 0700) holding the
  two ZeroMQ `ipc://` endpoints, then starts `core_proc.run_engine_core` in a process from the
  *spawn* context (never fork: torch may already be imported here, and fork after torch is
  unsafe). It returns at once; `wait_ready()` blocks for the handshake and returns the child's
  `EngineReady`, or raises `EngineStartupError` whose message is the child's own error message
  (its traceback is logged at debug level), or a clear timeout / early-exit message after killing
  the child. Binding the sockets is the client's job (`addresses`).
* The child never outlives this process: `shutdown()` (idempotent) waits briefly, then SIGTERMs,
  then SIGKILLs it and removes the IPC directory; every live `EngineProcess` is also shut down
  atexit and on SIGTERM (a handler is installed only where SIGTERM has its default action), and
  the child watches our sentinel pipe and exits when we die, even by SIGKILL.
* Data parallelism (--data-parallel-size N): `launch_engines(config)` starts one
  `EngineProcess` per engine at once, each with its own config (`dp_engine_configs`: its rank,
  its share of the CPU threads, its own rendezvous port), and `wait_all_ready` waits for every
  handshake; the first engine that fails stops them all, its error naming the engine.
No torch here: this module runs in the API-server process.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.util  # noqa: F401  (registers its atexit hook before ours; ours runs first)
import os
import shutil
import signal
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass

from sluice.config import EngineConfig
from sluice.config_sources import ENGINE_STARTUP_TIMEOUT_ENV
from sluice.engine.core_proc import run_engine_core
from sluice.engine.serial import HandshakeFailed, decode_handshake
from sluice.errors import EngineStartupError
from sluice.messages import EngineReady
from sluice.platform.host import describe_exit, free_ports

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_ENV = ENGINE_STARTUP_TIMEOUT_ENV
DEFAULT_STARTUP_TIMEOUT_S = 600.0
"""Seconds allowed for the child to load the model, size the KV cache and warm up."""


def startup_timeout_s() -> float:
    """`$SLUICE_ENGINE_STARTUP_TIMEOUT` seconds, else `DEFAULT_STARTUP_TIMEOUT_S`."""
    raw = os.environ.get(STARTUP_TIMEOUT_ENV)
    if not raw:
        return DEFAULT_STARTUP_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise EngineStartupError(f"{STARTUP_TIMEOUT_ENV}={raw!r} is not a positive number of "
                                 "seconds.")
    return value


@dataclass(frozen=True)
class EngineAddresses:
    """The IPC directory and the two endpoints in it: the client PUSHes requests to `input`
    (bound by the child) and PULLs outputs from `output` (bound by the client)."""
    ipc_dir: str
    input: str
    output: str


def make_ipc_dir() -> EngineAddresses:
    """A fresh directory, private to this user (0700), for the engine's `ipc://` endpoints."""
    base = tempfile.gettempdir()
    if len(base) > 60:  # unix socket paths are limited to ~107 bytes
        base = "/tmp"
    path = tempfile.mkdtemp(prefix="sluice-", dir=base)
    os.chmod(path, 0o700)
    return EngineAddresses(path, f"ipc://{path}/input", f"ipc://{path}/output")


class EngineProcess:
    """One engine-core child process (see the module docstring). Not thread-safe except
    `shutdown`, `is_alive`, `exitcode`, `wait_exit`."""

    def __init__(self, config: EngineConfig, *, engine_factory: str | None = None):
        self.config = config
        self.engine_index = config.parallel.data_parallel_rank or 0
        self.started_at = time.monotonic()
        self.addresses = make_ipc_dir()
        self.ready: EngineReady | None = None
        self._closed = False
        self._lock = threading.Lock()
        context = multiprocessing.get_context("spawn")
        self._handshake, child_end = context.Pipe(duplex=False)
        self.process = context.Process(
            target=run_engine_core, daemon=False,
            name="sluice-engine-core" + (f"-{self.engine_index}"
                                         if config.parallel.data_parallel_size > 1 else ""),
            args=(config, self.addresses.input, self.addresses.output, child_end,
                  self.addresses.ipc_dir, engine_factory))
        try:
            self.process.start()
        except BaseException:
            shutil.rmtree(self.addresses.ipc_dir, ignore_errors=True)
            raise
        finally:
            child_end.close()  # only the child holds the write end: EOF if it dies silently
        _register(self)
        logger.info("started engine core %sprocess (pid %d)", self.label,
                    self.process.pid)

    @property
    def label(self) -> str:
        """"" without data parallelism, else "N " (this engine's index, for log lines)."""
        return f"{self.engine_index} " if self.config.parallel.data_parallel_size > 1 else ""

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def wait_exit(self, timeout_s: float | None = None) -> bool:
        """Block until the child exited (True) or `timeout_s` passed (False)."""
        if not multiprocessing.connection.wait([self.process.sentinel], timeout_s):
            return False
        self.process.join(1.0)
        return True

    def wait_ready(self, timeout_s: float | None = None) -> EngineReady:
        """Wait for the handshake. On failure the child is shut down and `EngineStartupError`
        raised: the child's message, an early exit, or the timeout (default
        `startup_timeout_s()`)."""
        timeout_s = startup_timeout_s() if timeout_s is None else timeout_s
        try:
            self.ready = self._wait_handshake(timeout_s)
            return self.ready
        except BaseException:
            self.shutdown()
            raise

    def _wait_handshake(self, timeout_s: float) -> EngineReady:
        if not multiprocessing.connection.wait([self._handshake], timeout_s):
            self.shutdown(grace_s=0.0)
            raise _startup_timeout_error(timeout_s)
        try:
            message = decode_handshake(self._handshake.recv_bytes())
        except EOFError:  # the child died before answering
            self.wait_exit(5.0)
            raise EngineStartupError(
                f"The engine core process exited during startup with "
                f"{describe_exit(self.exitcode)} before reporting an error; check the log "
                "above. It may have been killed (out of memory?), or the main script starts "
                "an engine at import time: the engine process is spawned and re-imports the "
                "main module, so guard that code with `if __name__ == \"__main__\":`.") from None
        finally:
            self._handshake.close()
        if isinstance(message, HandshakeFailed):
            failure = message.failure
            logger.debug("engine core startup failed:\n%s", failure.traceback)
            error = EngineStartupError(failure.describe())
            error.error_type = failure.error_type  # type: ignore[attr-defined]
            error.child_traceback = failure.traceback  # type: ignore[attr-defined]
            raise error
        logger.info("engine core %sready %.1fs after its start", self.label,
                    time.monotonic() - self.started_at)
        return message.ready

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop the child (idempotent, thread-safe): wait `grace_s` for it to exit on its own
        (after the client sent SHUTDOWN), then SIGTERM, then SIGKILL; remove the IPC dir."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self.process.pid is not None and not self.wait_exit(grace_s):
                if grace_s > 0:
                    logger.warning("engine core (pid %d) did not exit within %gs; terminating "
                                   "it", self.pid, grace_s)
                self.process.terminate()
                if not self.wait_exit(3.0):
                    self.process.kill()
                    self.wait_exit(5.0)
        finally:
            if not self._handshake.closed:
                self._handshake.close()
            shutil.rmtree(self.addresses.ipc_dir, ignore_errors=True)
            _LIVE.discard(self)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def handshake_pipe(self) -> multiprocessing.connection.Connection:
        """The read end of the handshake pipe (readable once the child answered or died)."""
        return self._handshake


def _startup_timeout_error(timeout_s: float) -> EngineStartupError:
    return EngineStartupError(
        f"The engine core process did not finish starting within {timeout_s:g}s (loading "
        "weights, sizing the KV cache or warming up) and was killed. Set "
        f"{STARTUP_TIMEOUT_ENV} to allow more time.")


# ---- data parallelism: several engines ---------------------------------------------------

def dp_engine_configs(config: EngineConfig) -> list[EngineConfig]:
    """One config per engine this process runs. `config` itself without data parallelism or
    with --data-parallel-rank (one engine of a group run by separate servers); else one per
    rank 0..N-1, each carrying its rank (its engine index and KV-event port offset), its share
    of --threads (default: the usable CPUs) and, when its ranks meet over TCP (mp executor,
    several ranks), its own rendezvous port: --master-port + rank, or a free port picked here
    for each engine (all held open together, so no two engines get the same one)."""
    par = config.parallel
    if par.data_parallel_rank is not None or par.data_parallel_size == 1:
        return [config]
    from sluice.platform.host import affinity_cpus
    n = par.data_parallel_size
    threads = max(1, (config.device.num_threads or affinity_cpus()) // n)
    ports: list[int | None] = [None] * n
    if par.world_size > 1 and par.executor_backend == "mp":
        ports = ([par.master_port + rank for rank in range(n)] if par.master_port is not None
                 else free_ports(par.master_addr, n))
    return [dataclasses.replace(
        config, device=dataclasses.replace(config.device, num_threads=threads),
        parallel=dataclasses.replace(par, data_parallel_rank=rank, master_port=ports[rank]))
        for rank in range(n)]


def launch_engines(config: EngineConfig, *,
                   engine_factory: str | None = None) -> list[EngineProcess]:
    """Start every engine of `config` (see `dp_engine_configs`) without waiting for any."""
    processes: list[EngineProcess] = []
    try:
        for engine_config in dp_engine_configs(config):
            processes.append(EngineProcess(engine_config, engine_factory=engine_factory))
    except BaseException:
        shutdown_processes(processes)
        raise
    return processes


def wait_all_ready(processes: list[EngineProcess],
                   timeout_s: float | None = None) -> list[EngineReady]:
    """Wait for every handshake (one deadline for all). The first engine to fail, or the
    timeout, shuts all of them down and raises `EngineStartupError`: with several engines, its
    message starts with the engine ("data-parallel engine 1: ...")."""
    timeout_s = startup_timeout_s() if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    pending = list(processes)
    try:
        while pending:
            ready = multiprocessing.connection.wait(
                [p.handshake_pipe for p in pending], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise _startup_timeout_error(timeout_s)
            for proc in [p for p in pending if p.handshake_pipe in ready]:
                try:
                    proc.wait_ready(0.0)
                except EngineStartupError as e:
                    if len(processes) == 1:
                        raise
                    raise _for_engine(e, proc.engine_index) from None
                pending.remove(proc)
    except BaseException:
        shutdown_processes(processes)
        raise
    return [p.ready for p in processes]  # type: ignore[misc]


def _for_engine(error: EngineStartupError, index: int) -> EngineStartupError:
    """`error` with its message prefixed by the engine that failed (attributes kept)."""
    named = EngineStartupError(f"data-parallel engine {index}: {error}")
    named.__dict__.update(error.__dict__)
    return named


def shutdown_processes(processes: list[EngineProcess], grace_s: float = 0.0) -> None:
    """Stop every process of `processes` (idempotent): each may exit on its own for
    `grace_s`, then gets SIGTERM, then SIGKILL."""
    for proc in processes:
        proc.shutdown(grace_s)


# ---- never outlive the parent -----------------------------------------------------------

_LIVE: "weakref.WeakSet[EngineProcess]" = weakref.WeakSet()
_hooks_installed = False


def _register(proc: EngineProcess) -> None:
    global _hooks_installed
    _LIVE.add(proc)
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(shutdown_all, 0.0)
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
        signal.signal(signal.SIGTERM, _on_sigterm)


def shutdown_all(grace_s: float = 0.0) -> None:
    """Shut down every live engine-core process of this process (SIGTERM after `grace_s`)."""
    for proc in list(_LIVE):
        try:
            proc.shutdown(grace_s)
        except Exception:
            logger.warning("failed to stop engine core", exc_info=True)


def _on_sigterm(signum: int, frame: object) -> None:
    shutdown_all(0.0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)
