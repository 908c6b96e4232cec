"""The worker process of the `mp` executor: one per rank, serving the `Worker`'s methods.

    executor PUSH (one per rank) ──call──► PULL  this loop  ─► Worker (model, KV cache)
    executor PULL (one for all)  ◄─reply── PUSH ◄┘

`run_worker` is the entry point of a *spawned* process (`MultiprocExecutor` starts it). It
connects both sockets and then answers calls in order (see `wire.WorkerMethod`): HELLO proves
the sockets work; INIT joins the process group (`init_parallel_state`) and builds the
`Worker`; then the Executor's methods, one at a time. Any exception is answered as FAILED
(the executor turns it into an engine failure) and the loop goes on; SHUTDOWN ends it.

It never outlives the executor: a watch thread waits on the parent's sentinel pipe and exits
the process (removing the IPC directory if it still exists) the moment the parent dies, even by
SIGKILL; and once INIT arrives (the executor has removed the IPC directory by then) the kernel
is also asked to SIGKILL this process when its parent thread dies (`PR_SET_PDEATHSIG`), which
covers a worker too stuck to run its watch thread. Ctrl-C belongs to the parent; SIGTERM keeps
its default action (immediate exit), so a worker stuck inside a collective still ends.
torch is imported only when INIT builds the worker.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

import zmq

from sluice.config import EngineConfig
from sluice.engine.serial import EngineFailure
from sluice.executor.wire import CallCodec, ReplyCodec, ReplyType, WorkerMethod
from sluice.hf_config import ModelSpec
from sluice.platform.host import wait_for_parent_exit

logger = logging.getLogger(__name__)

_POLL_MS = 1000
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


def process_name(rank: int) -> str:
    """The name `ps`/`top` show for rank `rank`'s process (Linux; at most 15 bytes)."""
    return f"sluice-rank-{rank}"


@dataclass(frozen=True)
class WorkerArgs:
    """What one rank's process needs, given at spawn time."""
    config: EngineConfig
    spec: ModelSpec
    max_model_len: int
    tp_size: int
    pp_size: int
    rank: int
    local_rank: int
    num_threads: int | None   # this rank's share of --threads (None: the platform default)
    call_address: str         # this rank's PULL endpoint (the executor binds a PUSH there)
    reply_address: str        # the executor's PULL endpoint
    init_method: str          # the process-group rendezvous, "tcp://addr:port"
    ipc_dir: str              # holds both endpoints until the executor removes it ("": none)
    parent_pid: int
    pdeathsig: bool           # the parent thread outlives the executor (its main thread)


def run_worker(args: WorkerArgs) -> None:
    """Entry point of a worker process (see the module docstring); exits 0 after SHUTDOWN."""
    _setup_process(args)
    ctx = zmq.Context()
    calls = ctx.socket(zmq.PULL)
    calls.setsockopt(zmq.LINGER, 0)
    calls.connect(args.call_address)
    replies = ctx.socket(zmq.PUSH)
    replies.setsockopt(zmq.LINGER, 2000)   # the last answer (a failure) must get out
    replies.setsockopt(zmq.SNDHWM, 0)
    replies.connect(args.reply_address)
    server = _WorkerServer(args)
    call_codec, reply_codec = CallCodec(), ReplyCodec()
    try:
        while True:
            if not calls.poll(_POLL_MS):
                continue
            method, call_id, arg = call_codec.decode(calls.recv_multipart(copy=False))
            if method == WorkerMethod.SHUTDOWN:
                break
            kind, value = server.answer(method, arg)
            if kind is not None:
                replies.send_multipart(reply_codec.encode(kind, args.rank, call_id, value),
                                       copy=False)
    finally:
        server.close()
        calls.close()
        replies.close()
        ctx.term()


class _WorkerServer:
    """Runs one call at a time against this rank's `Worker` (built by INIT)."""

    def __init__(self, args: WorkerArgs):
        self.args = args
        self.worker: Any = None

    def answer(self, method: WorkerMethod, arg: Any) -> tuple[ReplyType | None, Any]:
        """`call`, with an exception answered as FAILED (the worker's error as text)."""
        try:
            return self.call(method, arg)
        except Exception as e:
            logger.debug("rank %d: %s failed", self.args.rank, method.name, exc_info=True)
            return ReplyType.FAILED, EngineFailure.from_exception(e)

    def call(self, method: WorkerMethod, arg: Any) -> tuple[ReplyType | None, Any]:
        """`(reply kind, value)`, or `(None, None)` when this rank does not answer."""
        if method == WorkerMethod.HELLO:
            return ReplyType.VALUE, os.getpid()
        if method == WorkerMethod.INIT:
            self._init()
            return ReplyType.VALUE, 0
        assert self.worker is not None, f"{method.name} before INIT"
        w = self.worker
        if method == WorkerMethod.EXECUTE_MODEL:
            w.execute_model(arg)   # the forward; SAMPLE_TOKENS follows
            return None, None
        if method in (WorkerMethod.SAMPLE_TOKENS, WorkerMethod.STEP):
            output = (w.sample_tokens(arg.grammar_output) if method == WorkerMethod.SAMPLE_TOKENS
                      else w.step(arg.scheduler_output, arg.grammar_output))
            # the step's result comes from the driver of the last pipeline stage only
            is_output_rank = self.args.rank == self.args.config.parallel.output_rank
            return (ReplyType.OUTPUT, output) if is_output_rank else (None, None)
        value = 0
        if method == WorkerMethod.LOAD_MODEL:
            w.load_model()
        elif method == WorkerMethod.DETERMINE_KV_MEMORY:
            value = w.determine_available_kv_memory()
        elif method == WorkerMethod.KV_BYTES_PER_BLOCK:
            value = w.kv_cache_bytes_per_block()
        elif method == WorkerMethod.INITIALIZE_KV_CACHE:
            w.initialize_kv_cache(arg)
        elif method == WorkerMethod.WARM_UP:
            w.warm_up()
        elif method == WorkerMethod.SLEEP:
            w.sleep(arg)
        elif method == WorkerMethod.WAKE_UP:
            w.wake_up()
        else:
            raise AssertionError(f"unknown worker method {method!r}")
        return ReplyType.VALUE, int(value)

    def _init(self) -> None:
        a = self.args
        if a.pdeathsig:
            _die_with_parent(a.parent_pid)
        from sluice.distributed.parallel_state import ParallelLayout, init_parallel_state
        from sluice.platform import current_platform
        from sluice.worker.worker import Worker
        platform = current_platform(a.config.device)
        platform.set_device(a.local_rank)
        init_parallel_state(ParallelLayout(a.tp_size, a.pp_size, a.rank), a.init_method,
                            platform.dist_backend)
        self.worker = Worker(a.config, a.spec, a.max_model_len, rank=a.rank,
                             local_rank=a.local_rank, num_threads=a.num_threads)

    def close(self) -> None:
        if "sluice.distributed.parallel_state" in sys.modules:
            from sluice.distributed.parallel_state import destroy_parallel_state
            try:
                destroy_parallel_state()
            except Exception:
                logger.debug("rank %d: leaving the process group failed", self.args.rank,
                             exc_info=True)


# ---- process setup ---------------------------------------------------------------------------

def _setup_process(args: WorkerArgs) -> None:
    """Logging like the engine core's, tagged with the rank (ranks other than the driver log
    warnings and errors only, unless --log-level debug: their info lines repeat the driver's);
    Ctrl-C ignored; the parent watch started."""
    setup_logging(args)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _prctl(_PR_SET_NAME, ctypes.c_char_p(process_name(args.rank).encode()[:15]))
    _watch_parent(args)


def setup_logging(args: WorkerArgs) -> None:
    """A rank's log lines, tagged with the rank (shared with the Ray executor's actors)."""
    if not logging.getLogger().handlers:
        level = args.config.observability.log_level.upper()
        if args.rank != 0 and level == "INFO":
            level = "WARNING"
        logging.basicConfig(level=level, format=f"%(levelname)s %(asctime)s [rank {args.rank}] "
                                                "%(name)s: %(message)s")


def _watch_parent(args: WorkerArgs) -> None:
    """Exit this process when the parent dies: its sentinel pipe closes, or we get
    re-parented."""
    def watch() -> None:
        wait_for_parent_exit(args.parent_pid)
        if args.ipc_dir:   # "" on a headless node (tcp endpoints only)
            shutil.rmtree(args.ipc_dir, ignore_errors=True)
        os._exit(1)

    threading.Thread(target=watch, name="sluice-worker-parent-watch", daemon=True).start()


def _prctl(option: int, arg: Any) -> bool:
    """Linux's prctl(2) via ctypes; False where it is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL us when the thread that spawned us exits."""
    if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) and os.getppid() != parent_pid:
        os._exit(1)   # the parent died before the request took effect
