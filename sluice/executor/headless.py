"""A headless node (`sluice serve --headless --nnodes N --node-rank k`): this machine's share of
the ranks, driven by the head's engine over TCP; no API server, no engine core, no scheduler.

    join the head (NodeHello → NodeAssignment, see `nodes.py`)
      → spawn ranks [first, first + n) as `worker_proc.run_worker` processes, connected to the
        head's tcp endpoints (they join the rendezvous when the head sends INIT)
      → every second: a Heartbeat to the head (answered by Pong); watch the ranks' sentinels
      → leave when: the head says Bye (exit 0) · the head is silent for $SLUICE_NODE_TIMEOUT s
        (exit 1) · a rank dies (RankDied is sent first; exit 1) · SIGTERM/SIGINT (NodeLeaving
        is sent first; exit 0)
      → stop the ranks (they got SHUTDOWN from the head; else SIGTERM, then SIGKILL)

The ranks die with this process (their parent watch and PR_SET_PDEATHSIG), so no rank
outlives its node. No torch in this process.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import time

import msgspec
import zmq

import sluice
from sluice.config import EngineConfig
from sluice.errors import SluiceError
from sluice.executor.nodes import (HEARTBEAT_INTERVAL_S, Bye, Heartbeat, NodeAssignment,
                                   NodeHello, NodeLeaving, NodeRefused, Pong, RankDied, ToNode,
                                   join_address, node_timeout_s)
from sluice.executor.worker_proc import WorkerArgs, process_name, run_worker
from sluice.platform.host import describe_exit

logger = logging.getLogger("sluice.headless")

_RANK_EXIT_GRACE_S = 5.0


def run_headless(config: EngineConfig, local_model: str | None = None) -> int:
    """Run this node until the head lets it go; the process exit code. `local_model` (the
    model as resolved on this machine) replaces the head's model path when given."""
    return HeadlessNode(config, local_model).run()


class HeadlessNode:
    def __init__(self, config: EngineConfig, local_model: str | None = None):
        par = config.parallel
        self.config = config
        self.node_rank = par.node_rank
        self.local_model = local_model
        self.head = join_address(par)
        self.timeout_s = node_timeout_s()
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self.first_rank = 0
        self._signal: int | None = None
        self._grace_s = _RANK_EXIT_GRACE_S   # for the ranks to leave by themselves
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(ToNode)

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        ctx = zmq.Context()
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 1000)   # a last RankDied / NodeLeaving must get out
        self._sock.connect(self.head)
        try:
            assignment = self._join()
            if assignment is None:
                return 0
            self._spawn(assignment)
            return self._serve()
        finally:
            self._stop_ranks()
            self._sock.close()
            ctx.term()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signal = signum

    def _send(self, message: msgspec.Struct) -> None:
        self._sock.send(self._encoder.encode(message))

    def _receive(self, timeout_s: float) -> ToNode | None:
        if not self._sock.poll(max(0.0, timeout_s) * 1000):
            return None
        return self._decoder.decode(self._sock.recv())

    # ---- join ----------------------------------------------------------------------------------

    def _join(self) -> NodeAssignment | None:
        """Say hello and wait for the head's answer (None: a signal came first)."""
        from sluice.config_sources import ENGINE_STARTUP_TIMEOUT_ENV
        from sluice.executor.multiproc import DEFAULT_SETUP_TIMEOUT_S, env_seconds
        par = self.config.parallel
        self._send(NodeHello(self.node_rank, par.nnodes, par.world_size, socket.gethostname(),
                             os.getpid(), sluice.__version__))
        logger.info("Node %d of %d: waiting for the head at %s", self.node_rank, par.nnodes,
                    self.head)
        timeout_s = env_seconds(ENGINE_STARTUP_TIMEOUT_ENV, DEFAULT_SETUP_TIMEOUT_S)
        deadline = time.monotonic() + timeout_s
        while self._signal is None:
            message = self._receive(min(0.5, deadline - time.monotonic()))
            if isinstance(message, NodeAssignment):
                return message
            if isinstance(message, NodeRefused):
                raise SluiceError(f"the head at {self.head} refused node {self.node_rank}: "
                                  f"{message.reason}")
            if isinstance(message, Bye):
                raise SluiceError(f"the head at {self.head} sent node {self.node_rank} away: "
                                  f"{message.reason}")
            if time.monotonic() > deadline:
                raise SluiceError(
                    f"no head answered at {self.head} within {timeout_s:g}s. Fix: start node 0 "
                    f"(sluice serve ... --nnodes {par.nnodes} --node-rank 0) with the same "
                    f"--master-addr and --master-port, or raise {ENGINE_STARTUP_TIMEOUT_ENV}.")
        return None

    def _spawn(self, a: NodeAssignment) -> None:
        config, spec = a.config, a.spec
        if self.local_model is not None:   # this machine's copy of the model
            config = dataclasses.replace(
                config, model=dataclasses.replace(config.model, model=self.local_model))
            spec = dataclasses.replace(spec, path=self.local_model)
        par = config.parallel
        context = multiprocessing.get_context("spawn")
        from sluice.platform.host import affinity_cpus
        threads = max(1, (self.config.device.num_threads or affinity_cpus())
                      // len(a.call_addresses))
        self.first_rank = a.first_rank
        for local_rank, call_address in enumerate(a.call_addresses):
            rank = a.first_rank + local_rank
            args = WorkerArgs(
                config=config, spec=spec, max_model_len=a.max_model_len,
                tp_size=par.tensor_parallel_size, pp_size=par.pipeline_parallel_size,
                rank=rank, local_rank=local_rank, num_threads=threads,
                call_address=call_address, reply_address=a.reply_address,
                init_method=a.init_method, ipc_dir="", parent_pid=os.getpid(), pdeathsig=True)
            process = context.Process(target=run_worker, args=(args,),
                                      name=process_name(rank), daemon=True)
            process.start()
            self.processes.append(process)
        logger.info("Node %d joined the head at %s: ranks %d-%d (pids %s), rendezvous %s",
                    self.node_rank, self.head, a.first_rank,
                    a.first_rank + len(self.processes) - 1,
                    ", ".join(str(p.pid) for p in self.processes), a.init_method)

    # ---- serve ---------------------------------------------------------------------------------

    def _serve(self) -> int:
        """Heartbeats and watching, until a reason to leave; the exit code."""
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        sentinels = {p.sentinel: (self.first_rank + i, p) for i, p in enumerate(self.processes)}
        for fd in sentinels:
            poller.register(fd, zmq.POLLIN)
        last_heard = next_beat = time.monotonic()
        while True:
            if self._signal is not None:
                name = signal.Signals(self._signal).name
                logger.info("Node %d: %s received; leaving", self.node_rank, name)
                self._grace_s = 0.5
                self._send(NodeLeaving(self.node_rank, f"its process received {name}"))
                return 0
            now = time.monotonic()
            if now >= next_beat:
                self._send(Heartbeat(self.node_rank))
                next_beat = now + HEARTBEAT_INTERVAL_S
            if now - last_heard > self.timeout_s:
                logger.error("Node %d: the head at %s sent nothing for %gs; it is gone. "
                             "Stopping this node's ranks.", self.node_rank, self.head,
                             self.timeout_s)
                self._grace_s = 0.5
                return 1
            events = dict(poller.poll(max(0.0, next_beat - now) * 1000))
            for fd, (rank, process) in list(sentinels.items()):
                if fd not in events or process.exitcode is None:
                    continue
                if process.exitcode == 0:   # it obeyed the head's SHUTDOWN; Bye follows
                    poller.unregister(fd)
                    del sentinels[fd]
                else:
                    logger.error("Node %d: worker rank %d (pid %d) died with %s",
                                 self.node_rank, rank, process.pid,
                                 describe_exit(process.exitcode))
                    self._send(RankDied(self.node_rank, rank, process.pid, process.exitcode))
                    self._grace_s = 0.5
                    return 1
            if self._sock in events:
                while self._sock.poll(0):
                    message = self._decoder.decode(self._sock.recv())
                    last_heard = time.monotonic()
                    if isinstance(message, Bye):
                        logger.info("Node %d: the head said goodbye (%s)", self.node_rank,
                                    message.reason)
                        return 0
                    if not isinstance(message, Pong):
                        logger.warning("Node %d: unexpected %s from the head", self.node_rank,
                                       type(message).__name__)

    def _stop_ranks(self) -> None:
        """Wait for the ranks to leave (after the head's SHUTDOWN they do), then SIGTERM, then
        SIGKILL."""
        started = [p for p in self.processes if p.pid is not None]
        for action, wait_s in (("", self._grace_s), ("terminate", 3.0), ("kill", 5.0)):
            alive = [p for p in started if p.exitcode is None]
            if not alive:
                break
            for p in alive:
                if action:
                    getattr(p, action)()
            deadline = time.monotonic() + wait_s
            for p in alive:
                p.join(max(0.0, deadline - time.monotonic()))
        for p in started:
            p.join(0)
