"""The multi-process executor (`--distributed-executor-backend mp`): one worker process per rank
on this machine, driven over ZeroMQ with typed msgspec messages (no pickle on sockets).

    engine core ── MultiprocExecutor ── PUSH ipc://…/call-0 ──► rank 0 (driver) ─┐ gloo / NCCL
                          │          ── PUSH ipc://…/call-1 ──► rank 1 ──────────┘ collectives
                          └◄── PULL ipc://…/reply ◄── every rank's PUSH

Every call is encoded once and the same bytes are pushed to every rank (`wire`); setup calls
wait for every rank's answer (available KV memory is the minimum over ranks), a step waits for
the output rank's `ModelRunnerOutput` only (`ParallelConfig.output_rank`: the driver of the
last pipeline stage; rank 0 without pipeline parallelism). `submit_step` sends a step and
returns a future at once (the engine core's batch queue keeps one step per pipeline stage in
flight): the futures are answered in call order, the waiting done by whoever calls
`result()` (the output rank answers its steps in order on one socket, so waiting for a later
step first collects the earlier ones).

Startup: create a private IPC directory (0700) with the endpoints, spawn the ranks (spawn
context), a HELLO round trip with each (both sockets proven connected), then the directory is
removed: the connections stay, and no socket file can be left behind by any later exit. INIT
makes every rank join the process group (`tcp://--master-addr:--master-port`, a free port by
default) and build its `Worker`.

Supervision: while waiting for an answer the executor polls the reply socket *and* every
worker's process sentinel, so a worker that dies (crash, OOM kill, SIGKILL) is noticed at once
and raised as `WorkerDiedError` (an `EngineDeadError`); the engine-core loop reports it as a
fatal engine failure (the frontend raises EngineDeadError, /health answers 503, the server exits
non-zero). `check_health()` does the same between steps (the idle engine loop calls it every
second). A worker that hangs is bounded by a per-call timeout: `SLUICE_EXECUTE_MODEL_TIMEOUT`
seconds for a step (default 300, vLLM's value: generous for a slow CPU step, bounded), and
`SLUICE_ENGINE_STARTUP_TIMEOUT` (default 600) for setup calls (load, profile, warm up, wake up).
An exception in a worker is answered as FAILED and raised as `WorkerFailedError`, with the
worker's own message (if another rank died meanwhile, the death is reported as the cause).

Multi-node (`--nnodes N`, see `nodes.py`): this executor runs on node 0 and spawns only its
own ranks [0, world_size/N); the other nodes' ranks are started by `sluice serve --headless`
on their machines and reach this process over TCP: each remote rank's call socket and a second
endpoint of the reply socket are bound on tcp://--master-addr (ephemeral ports, announced to
the nodes through the `NodeMonitor` at master port + 1), and the rendezvous is
tcp://--master-addr:--master-port (29501 unless given). Startup waits for every node to join
before HELLO; a remote rank's death (reported by its node) or a silent node is raised like a
local death, and shutdown says Bye to every node after SHUTDOWN to every rank.

Shutdown (idempotent): SHUTDOWN to every rank, a short wait, then SIGTERM and SIGKILL; workers
also exit by themselves when this process dies (see `worker_proc`). No torch in this module.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import Future
from typing import Any

import zmq

from sluice.config import EngineConfig
from sluice.config_sources import ENGINE_STARTUP_TIMEOUT_ENV, EXECUTE_MODEL_TIMEOUT_ENV
from sluice.engine.serial import EngineFailure
from sluice.errors import ConfigError, EngineDeadError, SluiceError
from sluice.executor.ranked import RankedExecutor
from sluice.executor.nodes import NodeAssignment, NodeMonitor, headless_command
from sluice.executor.wire import (STEP_METHODS, CallCodec, ReplyCodec, ReplyType, SampleCall,
                                  StepCall, WorkerMethod)
from sluice.executor.worker_proc import WorkerArgs, process_name, run_worker
from sluice.hf_config import ModelSpec
from sluice.platform.host import affinity_cpus, describe_exit, free_ports
from sluice.step import ModelRunnerOutput, SchedulerOutput
from sluice.structured_output.output import GrammarOutput

logger = logging.getLogger(__name__)

_FORWARD_SENT = object()   # execute_model sent EXECUTE_MODEL; SAMPLE_TOKENS is next

DEFAULT_EXECUTE_MODEL_TIMEOUT_S = 300.0
DEFAULT_SETUP_TIMEOUT_S = 600.0
_POLL_S = 1.0              # longest single poll; sentinels wake it at once anyway
_SHUTDOWN_GRACE_S = 5.0    # for workers to leave after SHUTDOWN (after a failure: 0.5 s)


class WorkerDiedError(EngineDeadError):
    """A worker process exited unexpectedly; the engine cannot continue."""


class WorkerHungError(EngineDeadError):
    """A worker did not answer a call within its timeout."""


class WorkerFailedError(SluiceError):
    """A worker raised; the message is the worker's own (`EngineFailure.describe`)."""


def env_seconds(name: str, default: float) -> float:
    """`$name` as a positive number of seconds, else `default`."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{name}={raw!r} is not a positive number of seconds. Fix: set it to "
                          f"e.g. {default:g}, or unset it.")
    return value


def threads_per_rank(config: EngineConfig) -> int:
    """This machine's share of `--threads` for one rank: the CPUs (`--threads`, else the
    affinity mask) split evenly over the ranks on this machine, at least one each."""
    total = config.device.num_threads or affinity_cpus()
    return max(1, total // config.parallel.ranks_per_node)


class MultiprocExecutor(RankedExecutor):
    def __init__(self, config: EngineConfig, spec: ModelSpec, max_model_len: int):
        par = config.parallel
        self.world_size = par.world_size
        self.output_rank = par.output_rank
        self._steps: collections.deque[_StepFuture] = collections.deque()  # in call order
        # between execute_model and sample_tokens: the step to send, or _FORWARD_SENT
        self._deferred: SchedulerOutput | object | None = None
        self.execute_timeout_s = env_seconds(EXECUTE_MODEL_TIMEOUT_ENV,
                                             DEFAULT_EXECUTE_MODEL_TIMEOUT_S)
        self.setup_timeout_s = env_seconds(ENGINE_STARTUP_TIMEOUT_ENV, DEFAULT_SETUP_TIMEOUT_S)
        self._closed = False
        self._failed = False
        self._lock = threading.Lock()
        self._call_ids = itertools.count()
        self._call_codec, self._reply_codec = CallCodec(), ReplyCodec()
        self.ipc_dir = _make_ipc_dir()
        self._ctx = zmq.Context()
        self._calls: list[zmq.Socket] = []
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self._poll: tuple[zmq.Poller, set[int]] | None = None
        self._nodes: NodeMonitor | None = None   # the other nodes (--nnodes > 1)
        try:
            if par.node_rank != 0:
                raise ConfigError(
                    f"--node-rank {par.node_rank}: only node 0 runs the engine; the other "
                    f"nodes run their ranks with `{headless_command(par, par.node_rank)}`.")
            self._replies = self._ctx.socket(zmq.PULL)
            self._replies.setsockopt(zmq.LINGER, 0)
            self._replies.bind(f"ipc://{self.ipc_dir}/reply")
            for rank in range(self.world_size):
                sock = self._ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, 0)
                sock.bind(f"ipc://{self.ipc_dir}/call-{rank}" if rank < par.ranks_per_node
                          else _tcp_any(par.master_addr))
                self._calls.append(sock)
            if par.rendezvous_port is not None and self.world_size > 1:
                check_master_port(par.master_addr, par.rendezvous_port)
            port = par.rendezvous_port or free_ports(par.master_addr)[0]
            init_method = f"tcp://{par.master_addr}:{port}"
            if par.nnodes > 1:
                self._nodes = self._start_node_monitor(config, spec, max_model_len, init_method)
            self._spawn(config, spec, max_model_len, init_method)
            if self._nodes is not None:
                self._wait_for_nodes()
            self._call_all(WorkerMethod.HELLO, timeout_s=self.setup_timeout_s)
            shutil.rmtree(self.ipc_dir, ignore_errors=True)  # connected: no file needed now
            self._call_all(WorkerMethod.INIT, timeout_s=self.setup_timeout_s)
        except BaseException:
            self._failed = True
            self.shutdown()
            raise
        logger.info("%d worker processes ready (pids %s%s), rendezvous tcp://%s:%d",
                    self.world_size, ", ".join(str(p.pid) for p in self.processes),
                    f"; {self.world_size - len(self.processes)} on {par.nnodes - 1} other "
                    "node(s)" if par.nnodes > 1 else "", par.master_addr, port)

    def _start_node_monitor(self, config: EngineConfig, spec: ModelSpec, max_model_len: int,
                            init_method: str) -> NodeMonitor:
        """Open the reply socket to TCP and listen for the other nodes (see `nodes.py`)."""
        par = config.parallel
        self._replies.bind(_tcp_any(par.master_addr))
        reply = _endpoint(self._replies)
        n = par.ranks_per_node
        assignments = {
            node: NodeAssignment(config, spec, max_model_len, init_method, node * n,
                                 [_endpoint(s) for s in self._calls[node * n:(node + 1) * n]],
                                 reply)
            for node in range(1, par.nnodes)}
        return NodeMonitor(par, assignments)

    def _wait_for_nodes(self) -> None:
        assert self._nodes is not None
        missing = self._nodes.wait_joined(
            self.setup_timeout_s, lambda: self._raise_if_dead("waiting for the other nodes"))
        if missing:
            self._failed = True
            raise WorkerHungError(
                f"node(s) {', '.join(map(str, missing))} did not join at {self._nodes.address} "
                f"within {self.setup_timeout_s:g}s. Fix: start each one with `"
                f"{headless_command(self._nodes.par, missing[0])}` (its own --node-rank), or "
                f"raise {ENGINE_STARTUP_TIMEOUT_ENV}.")

    def _spawn(self, config: EngineConfig, spec: ModelSpec, max_model_len: int,
               init_method: str) -> None:
        par = config.parallel
        context = multiprocessing.get_context("spawn")
        threads = threads_per_rank(config)
        on_main_thread = threading.current_thread() is threading.main_thread()
        for rank in range(par.ranks_per_node):   # this node's ranks; see nodes.py for others
            args = WorkerArgs(
                config=config, spec=spec, max_model_len=max_model_len,
                tp_size=par.tensor_parallel_size, pp_size=par.pipeline_parallel_size,
                rank=rank, local_rank=rank, num_threads=threads,
                call_address=f"ipc://{self.ipc_dir}/call-{rank}",
                reply_address=f"ipc://{self.ipc_dir}/reply", init_method=init_method,
                ipc_dir=self.ipc_dir, parent_pid=os.getpid(), pdeathsig=on_main_thread)
            process = context.Process(target=run_worker, args=(args,),
                                      name=process_name(rank), daemon=True)
            process.start()
            self.processes.append(process)

    # ---- the Executor's methods --------------------------------------------------------------

    def execute_model(self, scheduler_output: SchedulerOutput, *,
                      grammar_follows: bool = True) -> None:
        """With a grammar to follow: send EXECUTE_MODEL now (the ranks start the forward while
        the engine core computes the bitmask). Without: keep the step for `sample_tokens`,
        which sends it as one STEP message (no extra message when no request has a grammar)."""
        assert self._deferred is None, "execute_model twice without sample_tokens"
        if grammar_follows:
            self._broadcast(WorkerMethod.EXECUTE_MODEL, scheduler_output)
            self._deferred = _FORWARD_SENT
        else:
            self._deferred = scheduler_output

    def sample_tokens(self, grammar_output: GrammarOutput | None) -> ModelRunnerOutput:
        deferred, self._deferred = self._deferred, None
        assert deferred is not None, "sample_tokens without execute_model"
        if deferred is _FORWARD_SENT:
            call_id = self._broadcast(WorkerMethod.SAMPLE_TOKENS, SampleCall(grammar_output))
            future = _StepFuture(self, call_id)
            self._steps.append(future)
            return future.result()
        return self.submit_step(deferred, grammar_output).result()

    def step(self, scheduler_output: SchedulerOutput,
             grammar_output: GrammarOutput | None = None) -> ModelRunnerOutput:
        return self.submit_step(scheduler_output, grammar_output).result()

    def submit_step(self, scheduler_output: SchedulerOutput,
                    grammar_output: GrammarOutput | None = None) -> Future[ModelRunnerOutput]:
        call_id = self._broadcast(WorkerMethod.STEP, StepCall(scheduler_output, grammar_output))
        future = _StepFuture(self, call_id)
        self._steps.append(future)
        return future

    def _wait_step(self, future: _StepFuture) -> None:
        """Collect the output rank's answers, oldest step first, until `future` is done. A
        failure fails every pending step (the engine cannot continue)."""
        while not future.done():
            oldest = self._steps[0]
            try:
                value = self._collect(WorkerMethod.STEP, oldest.call_id,
                                      (self.output_rank,), self.execute_timeout_s)
            except Exception as e:
                while self._steps:
                    self._steps.popleft().set_exception(e)
                return
            self._steps.popleft().set_result(value[self.output_rank])

    def check_health(self) -> None:
        """Raise `WorkerDiedError` if a worker process has exited."""
        self._raise_if_dead("between steps")

    # ---- calls ---------------------------------------------------------------------------------

    def _call_all(self, method: WorkerMethod, arg: Any = None,
                  timeout_s: float | None = None) -> list[int]:
        """Call `method` on every rank and return their answers in rank order."""
        assert not self._steps, f"{method.name} while {len(self._steps)} step(s) are in flight"
        call_id = self._broadcast(method, arg, timeout_s or self.setup_timeout_s)
        answers = self._collect(method, call_id, range(self.world_size),
                                timeout_s or self.setup_timeout_s)
        return [answers[rank] for rank in range(self.world_size)]

    def _broadcast(self, method: WorkerMethod, arg: Any = None,
                   timeout_s: float | None = None) -> int:
        """Send one call to every rank. A rank whose socket is not connected yet (only before
        HELLO has been answered) is retried until `timeout_s`, watching for deaths."""
        if self._closed:
            raise EngineDeadError("The executor was shut down.")
        call_id = next(self._call_ids)
        frames = self._call_codec.encode(method, call_id, arg)
        deadline = time.monotonic() + (timeout_s or self.setup_timeout_s)
        for rank, sock in enumerate(self._calls):
            while True:
                try:
                    sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                    break
                except zmq.Again:
                    self._raise_if_dead(f"starting ({method.name.lower()})")
                    if time.monotonic() > deadline:
                        raise self._hung(method, [rank], timeout_s or self.setup_timeout_s)
                    time.sleep(0.005)
        return call_id

    def _collect(self, method: WorkerMethod, call_id: int, ranks: Any,
                 timeout_s: float) -> dict[int, Any]:
        """Wait for the answers of `ranks` to call `call_id`, polling the reply socket and the
        workers' sentinels; raise on a death, a FAILED answer or the timeout."""
        pending = set(ranks)
        answers: dict[int, Any] = {}
        poller, sentinels = self._poller()
        deadline = time.monotonic() + timeout_s
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._hung(method, sorted(pending), timeout_s)
            events = dict(poller.poll(min(remaining, _POLL_S) * 1000))
            if self._replies in events:
                self._drain(method, call_id, pending, answers)
            if sentinels & events.keys():
                self._raise_if_dead(f"running {method.name.lower()}")
        return answers

    def _poller(self) -> tuple[zmq.Poller, set[int]]:
        """One poller over the reply socket and every worker's sentinel (built once)."""
        if self._poll is None or len(self._poll[1]) != len(self._watched_fds()):
            poller = zmq.Poller()
            poller.register(self._replies, zmq.POLLIN)
            sentinels = set(self._watched_fds())
            for fd in sentinels:
                poller.register(fd, zmq.POLLIN)
            self._poll = (poller, sentinels)
        return self._poll

    def _drain(self, method: WorkerMethod, call_id: int, pending: set[int],
               answers: dict[int, Any]) -> None:
        """Read answers until `pending` is empty or none is waiting. It stops at the last
        one it needs: with several steps in flight the answers to later steps queue behind
        it, in call order, for their own `_collect`."""
        while pending:
            try:
                frames = self._replies.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            kind, rank, cid, value = self._reply_codec.decode([f.buffer for f in frames])
            if kind == ReplyType.FAILED:
                self._raise_failure(rank, value, method)
            if cid != call_id:   # cannot happen: every rank answers in call order
                logger.warning("dropping rank %d's answer to an earlier call (%d, now %d)",
                               rank, cid, call_id)
                continue
            answers[rank] = value
            pending.discard(rank)

    def _raise_failure(self, rank: int, failure: EngineFailure, method: WorkerMethod) -> None:
        """A worker raised. If a rank died meanwhile (its peers then fail inside collectives),
        report the death as the cause; else the worker's own error."""
        self._failed = True
        self._raise_if_dead(f"running {method.name.lower()}", wait_s=1.0,
                            also=f"rank {rank} then failed: {failure.describe()}")
        logger.error("worker rank %d failed in %s:\n%s", rank, method.name.lower(),
                     failure.traceback)
        where = f" (worker rank {rank})" if self.world_size > 1 else ""
        raise _worker_error(failure, where)

    def _watched_fds(self) -> list[int]:
        """What a death makes readable: every local worker's sentinel, and the node monitor's
        wake-up pipe (a remote rank died or a node went silent)."""
        fds = [p.sentinel for p in self.processes]
        return fds + ([self._nodes.wakeup_fd] if self._nodes is not None else [])

    def _dead_ranks(self, wait_s: float) -> list[tuple[int, multiprocessing.process.BaseProcess]]:
        """The local workers that have exited, as (rank, process). With `wait_s` > 0, first
        wait up to that long for a death; a process whose sentinel is readable has closed its
        files but may not be reapable yet (the kernel notifies the parent a moment later,
        longer on a busy machine), so its exit code is awaited within the same budget."""
        deadline = time.monotonic() + wait_s
        if wait_s > 0:
            ready = set(multiprocessing.connection.wait(self._watched_fds(), wait_s))
            while time.monotonic() < deadline and any(
                    p.sentinel in ready and p.exitcode is None for p in self.processes):
                time.sleep(0.01)
        return [(rank, p) for rank, p in enumerate(self.processes) if p.exitcode is not None]

    def _raise_if_dead(self, doing: str, wait_s: float = 0.0, also: str = "") -> None:
        if self._closed:
            return
        dead = self._dead_ranks(wait_s)
        if not dead and self._nodes is not None and self._nodes.failure is not None:
            self._failed = True
            raise WorkerDiedError(
                f"{self._nodes.failure} while {doing}; the engine cannot continue and in-flight "
                f"requests are lost.{' ' + also if also else ''}")
        if not dead:
            return
        self._failed = True
        rank, process = dead[0]
        hint = ""
        if doing.startswith("starting"):
            hint = (" If it exited during startup, the main script may start an engine at "
                    "import time: worker processes are spawned and re-import the main module, "
                    "so guard that code with `if __name__ == \"__main__\":`.")
        raise WorkerDiedError(
            f"Worker process rank {rank} (pid {process.pid}) died with "
            f"{describe_exit(process.exitcode)} while {doing}; the engine cannot continue "
            f"and in-flight requests are lost.{' ' + also if also else ''}{hint}")

    def _hung(self, method: WorkerMethod, ranks: list[int], timeout_s: float) -> WorkerHungError:
        self._failed = True
        env = EXECUTE_MODEL_TIMEOUT_ENV if method in STEP_METHODS else \
            ENGINE_STARTUP_TIMEOUT_ENV
        return WorkerHungError(
            f"Worker rank(s) {', '.join(map(str, ranks))} did not answer "
            f"{method.name.lower()} within {timeout_s:g}s; the engine is considered hung and "
            f"stops. If steps are this slow legitimately, set {env} to a larger number of "
            "seconds.")

    # ---- shutdown ------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop every worker (SHUTDOWN, then SIGTERM, then SIGKILL) and release the sockets and
        the IPC directory. Idempotent and thread-safe."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            frames = self._call_codec.encode(WorkerMethod.SHUTDOWN, next(self._call_ids))
            for sock in self._calls:
                try:
                    sock.send_multipart(frames, flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            self._stop_processes(0.5 if self._failed else _SHUTDOWN_GRACE_S)
        finally:
            if self._nodes is not None:   # after SHUTDOWN went out to the remote ranks
                self._nodes.close("the engine failed" if self._failed else
                                  "the engine shut down")
            for sock in [*self._calls, getattr(self, "_replies", None)]:
                if sock is not None:
                    sock.close(linger=0)
            self._ctx.term()
            shutil.rmtree(self.ipc_dir, ignore_errors=True)

    def _stop_processes(self, grace_s: float) -> None:
        started = [p for p in self.processes if p.pid is not None]
        for signal_name, wait_s in (("", grace_s), ("terminate", 3.0), ("kill", 5.0)):
            alive = [p for p in started if p.exitcode is None]
            if not alive:
                break
            if signal_name:
                logger.log(logging.INFO if self._failed else logging.WARNING,
                           "worker process(es) %s did not exit; sending %s",
                           ", ".join(str(p.pid) for p in alive),
                           "SIGTERM" if signal_name == "terminate" else "SIGKILL")
                for p in alive:
                    getattr(p, signal_name)()
            deadline = time.monotonic() + wait_s
            for p in alive:
                p.join(max(0.0, deadline - time.monotonic()))
        for p in started:
            p.join(0)


class _StepFuture(Future):
    """A step sent to the ranks; `result()` collects the output rank's answer (and those of
    earlier steps) on the calling thread."""

    def __init__(self, executor: MultiprocExecutor, call_id: int) -> None:
        super().__init__()
        self.executor, self.call_id = executor, call_id

    def result(self, timeout: float | None = None) -> ModelRunnerOutput:
        if not self.done():
            self.executor._wait_step(self)
        return super().result(timeout)


def _worker_error(failure: EngineFailure, where: str) -> SluiceError:
    """The worker's exception, rebuilt here: the same `sluice.errors` class when it was one
    (a ModelLoadError stays a ModelLoadError for the CLI and the handshake), else a
    `WorkerFailedError` carrying "Type: message"."""
    import sluice.errors
    cls = getattr(sluice.errors, failure.error_type, None)
    if failure.is_sluice_error and isinstance(cls, type) and issubclass(cls, SluiceError):
        try:
            return cls(failure.message + where)
        except TypeError:   # a constructor with other arguments
            pass
    return WorkerFailedError(failure.describe() + where)


def check_master_port(host: str, port: int) -> None:
    """Refuse a `--master-port` something already listens on (before any rank starts)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # TIME_WAIT is fine
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(
                f"--master-port: {port} on {host} cannot be used for the ranks' rendezvous "
                f"({e.strerror or e}). Fix: pick a free port, or leave --master-port out to "
                "use a free one.") from None


def _tcp_any(host: str) -> str:
    """A TCP endpoint on `host` (an address of this machine) with a port the OS picks."""
    return f"tcp://{socket.gethostbyname(host)}:*"


def _endpoint(sock: zmq.Socket) -> str:
    """The endpoint `sock` bound last (with the port the OS picked)."""
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()


def _make_ipc_dir() -> str:
    """A fresh directory, private to this user (0700), for the executor's `ipc://` endpoints
    (short enough for unix socket paths)."""
    base = tempfile.gettempdir()
    if len(base) > 60:
        base = "/tmp"
    path = tempfile.mkdtemp(prefix="sluice-exec-", dir=base)
    os.chmod(path, 0o700)
    return path
