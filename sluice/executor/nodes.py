"""Multi-node execution for the `mp` executor (`--nnodes N`): how headless nodes join the head,
and how each side notices that the other is gone. No torch.

    node 0 (head): engine core ─ MultiprocExecutor ─ PUSH ipc ───────────────► ranks [0, n)
                                       │ PUSH tcp://MASTER_ADDR:* (one per remote rank) ──► node k's ranks
                                       │ PULL tcp://MASTER_ADDR:* (the one reply socket) ◄─ node k's ranks
                                       └ NodeMonitor: ROUTER tcp://MASTER_ADDR:MASTER_PORT+1
                                                            ▲ DEALER: join, heartbeats, deaths
    node k: sluice serve --headless ─ HeadlessNode ─────────┘  spawns ranks [k*n, (k+1)*n)

    every rank: the process-group rendezvous tcp://MASTER_ADDR:MASTER_PORT (rank 0 hosts it)

Join: a headless node sends `NodeHello` (it may start before the head: ZeroMQ connects once
the head binds); the head answers `NodeAssignment` (its config, model spec and max_model_len,
so every node runs exactly the head's engine; the rendezvous; the tcp endpoints of the node's
ranks) or `NodeRefused` (another --nnodes, a node rank taken twice, another sluice version).
The node spawns its ranks with those endpoints (`worker_proc.run_worker`, as the head does)
and from then on the executor drives them exactly like its local ranks.

Watch: the node sends a `Heartbeat` every second and the head answers `Pong`. The head marks
the engine dead (`NodeMonitor.failure`; a pipe wakes the executor's poll, which raises
`WorkerDiedError` at once) when a node reports a rank's death (`RankDied`, sent the moment the
node sees the process exit), leaves (`NodeLeaving`: SIGTERM or Ctrl-C), or is silent for
$SLUICE_NODE_TIMEOUT seconds (default 10: the machine, its network or its process is gone).
The node stops its ranks and exits when the head says `Bye` (the engine shut down: exit 0) or
is silent that long (exit 1); see `headless.py`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Union

import msgspec
import zmq

import sluice
from sluice.config import EngineConfig, ParallelConfig
from sluice.errors import ConfigError
from sluice.hf_config import ModelSpec
from sluice.platform.host import describe_exit

logger = logging.getLogger(__name__)

DEFAULT_NODE_TIMEOUT_S = 10.0
HEARTBEAT_INTERVAL_S = 1.0
_POLL_MS = 200


# ---- messages (msgspec, no pickle) -----------------------------------------------------------

class NodeHello(msgspec.Struct, tag=True):
    node_rank: int
    nnodes: int
    world_size: int       # this node's --tensor-parallel-size x --pipeline-parallel-size
    hostname: str
    pid: int
    version: str


class NodeAssignment(msgspec.Struct, tag=True):
    config: EngineConfig
    spec: ModelSpec
    max_model_len: int
    init_method: str            # the ranks' rendezvous, tcp://MASTER_ADDR:MASTER_PORT
    first_rank: int             # the node's ranks are first_rank + i, i < len(call_addresses)
    call_addresses: list[str]   # each rank's PULL endpoint (the head binds a PUSH there)
    reply_address: str          # the head's PULL endpoint


class NodeRefused(msgspec.Struct, tag=True):
    reason: str


class Heartbeat(msgspec.Struct, tag=True):
    node_rank: int


class RankDied(msgspec.Struct, tag=True):
    node_rank: int
    rank: int
    pid: int
    exitcode: int | None


class NodeLeaving(msgspec.Struct, tag=True):
    node_rank: int
    reason: str


class Pong(msgspec.Struct, tag=True):
    pass


class Bye(msgspec.Struct, tag=True):
    reason: str


ToHead = Union[NodeHello, Heartbeat, RankDied, NodeLeaving]
ToNode = Union[NodeAssignment, NodeRefused, Pong, Bye]


def join_address(par: ParallelConfig) -> str:
    """Where the head listens for its nodes: master port + 1."""
    return f"tcp://{par.master_addr}:{par.rendezvous_port + 1}"


def headless_command(par: ParallelConfig, node_rank: int) -> str:
    """The command line that starts node `node_rank` (for log lines and error messages)."""
    return (f"sluice serve MODEL --headless --nnodes {par.nnodes} --node-rank {node_rank} "
            f"--master-addr {par.master_addr} --master-port {par.rendezvous_port} "
            f"-tp {par.tensor_parallel_size}"
            + (f" -pp {par.pipeline_parallel_size}" if par.pipeline_parallel_size > 1 else ""))


def node_timeout_s() -> float:
    from sluice.config_sources import NODE_TIMEOUT_ENV
    from sluice.executor.multiproc import env_seconds
    return env_seconds(NODE_TIMEOUT_ENV, DEFAULT_NODE_TIMEOUT_S)


# ---- the head's side -------------------------------------------------------------------------

@dataclass
class _Node:
    identity: bytes
    hostname: str
    pid: int
    last_seen: float


class NodeMonitor:
    """The head's end of every node: a ROUTER at `join_address`, served by one thread that
    answers joins and heartbeats and sets `failure` (and makes `wakeup_fd` readable) when a
    node reports a dead rank, leaves, or falls silent. `close()` says `Bye` to every node."""

    def __init__(self, par: ParallelConfig, assignments: dict[int, NodeAssignment]):
        self.par = par
        self.timeout_s = node_timeout_s()
        self.address = join_address(par)
        self.failure: str | None = None
        self._assignments = assignments          # node rank (1 ..) -> what it runs
        self._nodes: dict[int, _Node] = {}       # joined nodes; owned by the thread
        self._joined = threading.Event()
        self._stop = threading.Event()
        self._bye = "the engine shut down"
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(ToHead)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 1000)   # the last Bye must get out
        try:
            self._sock.bind(self.address)
        except zmq.ZMQError as e:
            self._sock.close(linger=0)
            self._ctx.term()
            raise ConfigError(
                f"--master-port: the head cannot listen for its nodes on {self.address} "
                f"({e.strerror}); with --nnodes > 1 it needs master port + 1 as well. Fix: "
                "pick a --master-port whose next port is free too (the same on every node).")
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="sluice-node-monitor",
                                        daemon=True)
        self._thread.start()

    @property
    def wakeup_fd(self) -> int:
        """Readable once `failure` is set (the executor polls it with its sentinels)."""
        return self._wake_r

    def wait_joined(self, timeout_s: float, check: Callable[[], None]) -> list[int]:
        """Wait until every node has joined, calling `check` (raises on a local death)
        twice a second; the node ranks still missing after `timeout_s` ([] when all joined)."""
        deadline = time.monotonic() + timeout_s
        logger.info("Waiting for %d node(s) to join at %s; start node k with: %s",
                    len(self._assignments), self.address, headless_command(self.par, 1)
                    .replace("--node-rank 1", "--node-rank k"))
        while not self._joined.wait(0.5):
            check()
            if time.monotonic() > deadline:
                return sorted(set(self._assignments) - set(self._nodes))
        return []

    def close(self, reason: str = "the engine shut down") -> None:
        """Say `Bye` to every joined node and stop the thread (idempotent)."""
        if self._stop.is_set():
            return
        self._bye = reason
        self._stop.set()
        self._thread.join(5.0)
        self._ctx.term()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    # ---- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if poller.poll(_POLL_MS):
                    self._drain()
                self._check_silence()
            for node in self._nodes.values():
                self._send(node.identity, Bye(self._bye))
        except Exception as e:  # noqa: BLE001 - reported as the engine's failure
            logger.exception("the node monitor failed")
            self._fail(f"The head's node monitor failed ({type(e).__name__}: {e})")
        finally:
            self._sock.close()

    def _send(self, identity: bytes, message: msgspec.Struct) -> None:
        self._sock.send_multipart([identity, self._encoder.encode(message)])

    def _drain(self) -> None:
        while True:
            try:
                identity, body = self._sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:   # not two frames: not one of our nodes
                continue
            try:
                message = self._decoder.decode(body)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                logger.warning("ignoring a malformed message on %s: %s", self.address, e)
                continue
            self._handle(identity, message)

    def _handle(self, identity: bytes, message: ToHead) -> None:
        if isinstance(message, NodeHello):
            self._hello(identity, message)
            return
        node = self._nodes.get(message.node_rank)
        if node is None or node.identity != identity:
            # A node this head never assigned (e.g. left over from an earlier head): let it go.
            self._send(identity, Bye(f"this head (pid {os.getpid()}) has not assigned node "
                                     f"rank {message.node_rank} to you"))
            return
        node.last_seen = time.monotonic()
        first = self._assignments[message.node_rank].first_rank
        where = f"node {message.node_rank} ({node.hostname})"
        if isinstance(message, Heartbeat):
            self._send(identity, Pong())
        elif isinstance(message, RankDied):
            self._fail(f"Worker process rank {message.rank} (pid {message.pid} on {where}) "
                       f"died with {describe_exit(message.exitcode)}")
        elif isinstance(message, NodeLeaving):
            last = first + self.par.ranks_per_node - 1
            self._fail(f"{where.capitalize()} running ranks {first}-{last} left "
                       f"({message.reason})")

    def _hello(self, identity: bytes, hello: NodeHello) -> None:
        reason = self._refusal(identity, hello)
        if reason:
            logger.warning("refused node %d (%s, pid %d): %s", hello.node_rank, hello.hostname,
                           hello.pid, reason)
            self._send(identity, NodeRefused(reason))
            return
        self._nodes[hello.node_rank] = _Node(identity, hello.hostname, hello.pid,
                                             time.monotonic())
        assignment = self._assignments[hello.node_rank]
        self._send(identity, assignment)
        logger.info("Node %d joined from %s (pid %d): ranks %d-%d", hello.node_rank,
                    hello.hostname, hello.pid, assignment.first_rank,
                    assignment.first_rank + len(assignment.call_addresses) - 1)
        if len(self._nodes) == len(self._assignments):
            self._joined.set()

    def _refusal(self, identity: bytes, hello: NodeHello) -> str:
        par = self.par
        if hello.version != sluice.__version__:
            return (f"the head runs sluice {sluice.__version__}, this node {hello.version}. "
                    "Fix: install the same version on every node.")
        if hello.nnodes != par.nnodes:
            return (f"the head runs --nnodes {par.nnodes}, this node was started with "
                    f"--nnodes {hello.nnodes}. Fix: pass --nnodes {par.nnodes}.")
        if hello.node_rank not in self._assignments:
            return (f"--node-rank {hello.node_rank} is not a headless node of --nnodes "
                    f"{par.nnodes} (1 to {par.nnodes - 1}).")
        if hello.world_size not in (1, par.world_size):
            return (f"the head runs {par.world_size} ranks (-tp {par.tensor_parallel_size} "
                    f"-pp {par.pipeline_parallel_size}), this node was started for "
                    f"{hello.world_size}. Fix: pass the head's -tp and -pp (or leave them out).")
        taken = self._nodes.get(hello.node_rank)
        if taken is not None and taken.identity != identity:
            return (f"node rank {hello.node_rank} has already joined from {taken.hostname} "
                    f"(pid {taken.pid}). Fix: give each node its own --node-rank.")
        return ""

    def _check_silence(self) -> None:
        now = time.monotonic()
        for rank, node in self._nodes.items():
            if now - node.last_seen > self.timeout_s:
                node.last_seen = float("inf")   # report once
                self._fail(f"Node {rank} ({node.hostname}, pid {node.pid}) sent no heartbeat "
                           f"for {self.timeout_s:g}s (the machine, its network or its `sluice "
                           "serve --headless` process is gone)")

    def _fail(self, message: str) -> None:
        if self.failure is None:
            self.failure = message
            logger.error("%s", message)
            os.write(self._wake_w, b"!")
