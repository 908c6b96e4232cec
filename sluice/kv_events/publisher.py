"""KV-event publishers: `NullEventPublisher` (events off) and `ZmqEventPublisher`.

Wire protocol (vLLM's, so vLLM/Dynamo subscribers work unchanged):

    PUB     multipart [topic, seq, payload]        seq: 8 bytes big endian, 0, 1, 2, ... per
                                                   publisher; payload: msgpack `KVEventBatch`
    ROUTER  request   [identity, b"", start_seq]   (from a DEALER sending [b"", start_seq]; a
                                                    REQ socket would keep only the first reply)
            replies   [identity, b"", seq, payload] for every buffered batch with seq >= start,
                      then [identity, b"", END_SEQ, b""]

The last `buffer_steps` batches are kept for replay, so a subscriber that sees a gap in the
sequence numbers (a slow joiner, a high-water-mark drop, a reconnect) asks for the missing ones.

`publish` only puts the batch on a queue; a daemon thread encodes, sends, buffers and answers
replay requests, so the engine step never waits on a socket (it waits only if `max_queue_size`
batches are already queued, rather than dropping events). Sockets are bound in the constructor
(a taken port fails at startup) and used only by that thread afterwards.
"""

from __future__ import annotations

import itertools
import logging
import queue
import re
import threading
from collections import deque
from typing import Protocol

import msgspec
import zmq

from sluice.core.kv_cache.events import KVEventBatch
from sluice.errors import ConfigError
from sluice.kv_events.config import FLAG, KVEventsConfig

logger = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""The sequence-number frame that ends a replay (with an empty payload)."""
_POLL_S = 0.05
_STOP = object()


class EventPublisher(Protocol):
    def publish(self, batch: KVEventBatch) -> None: ...
    def shutdown(self) -> None: ...


class NullEventPublisher:
    """Publishes nothing (`--kv-events-config` absent or its publisher "null")."""

    def publish(self, batch: KVEventBatch) -> None:
        pass

    def shutdown(self) -> None:
        pass


def offset_endpoint_port(endpoint: str | None, offset: int) -> str | None:
    """`endpoint` with its TCP port raised by `offset` (one port per data-parallel engine, as
    vLLM): tcp://*:5557 with offset 1 -> tcp://*:5558. Other transports get a suffix."""
    if endpoint is None or offset == 0:
        return endpoint
    match = re.fullmatch(r"(tcp://.*:)(\d+)", endpoint)
    if match:
        return f"{match.group(1)}{int(match.group(2)) + offset}"
    return f"{endpoint}_dp{offset}"


def _binds(endpoint: str) -> bool:
    """vLLM's rule: wildcard addresses and local transports are bound, others connected to."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class ZmqEventPublisher:
    """PUB + optional ROUTER replay socket served by one thread (see the module docstring)."""

    def __init__(self, config: KVEventsConfig, data_parallel_rank: int | None = None):
        self._dp_rank = data_parallel_rank
        offset = data_parallel_rank or 0
        self.endpoint = offset_endpoint_port(config.endpoint, offset)
        self.replay_endpoint = offset_endpoint_port(config.replay_endpoint, offset)
        self._topic = config.topic.encode("utf-8")
        self._queue: queue.Queue = queue.Queue(maxsize=config.max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._seq = itertools.count()
        self._encoder = msgspec.msgpack.Encoder()
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, config.hwm)
        self._pub.setsockopt(zmq.LINGER, 500)
        self._replay: zmq.Socket | None = None
        try:
            self._attach(self._pub, self.endpoint)
            if self.replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._attach(self._replay, self.replay_endpoint)
        except ConfigError:
            self._close_sockets()
            raise
        self._thread = threading.Thread(target=self._run, name="sluice-kv-events", daemon=True)
        self._thread.start()
        logger.info("publishing KV events on %s (replay: %s)", self.endpoint,
                    self.replay_endpoint or "off")

    @staticmethod
    def _attach(socket: zmq.Socket, endpoint: str) -> None:
        try:
            if _binds(endpoint):
                socket.bind(endpoint)
            else:
                socket.connect(endpoint)
        except zmq.ZMQError as e:
            raise ConfigError(f"{FLAG}: cannot use endpoint {endpoint} ({e}). Fix: pick a "
                              "free port, or an address of this host.") from None

    def publish(self, batch: KVEventBatch) -> None:
        """Queue `batch` for sending (thread-safe; blocks only when the queue is full)."""
        if not self._thread.is_alive():
            return  # the socket failed (logged once); never block the engine on a dead thread
        if self._dp_rank is not None:
            batch.data_parallel_rank = self._dp_rank
        self._queue.put(batch)

    # ---- the publisher thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                self._serve_replays()
                try:
                    item = self._queue.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if item is _STOP:
                    return
                seq = next(self._seq)
                payload = self._encoder.encode(item)
                self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
                self._buffer.append((seq, payload))
        except zmq.ZMQError as e:
            logger.error("KV event publisher stopped: %s", e)
        finally:
            self._close_sockets()

    def _serve_replays(self) -> None:
        """Answer every pending replay request (non-blocking)."""
        if self._replay is None:
            return
        while self._replay.poll(0):
            frames = self._replay.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                logger.warning("ignoring a malformed KV-event replay request (%d frames)",
                               len(frames))
                continue
            identity, _, start_bytes = frames
            start = int.from_bytes(start_bytes, "big")
            for seq, payload in self._buffer:
                if seq >= start:
                    self._replay.send_multipart((identity, b"", seq.to_bytes(8, "big"),
                                                 payload))
            self._replay.send_multipart((identity, b"", END_SEQ, b""))

    def _close_sockets(self) -> None:
        self._pub.close()
        if self._replay is not None:
            self._replay.close()
        self._ctx.term()

    def shutdown(self, timeout_s: float = 2.0) -> None:
        """Send what is queued, then stop the thread and close the sockets."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout_s)


def make_event_publisher(config: KVEventsConfig | None,
                         data_parallel_rank: int | None = None) -> EventPublisher | None:
    """The publisher `config` asks for, or None when KV events are off (so the engine does not
    even record them). `data_parallel_rank` offsets the ports (one set per DP engine)."""
    if config is None or not config.enabled:
        return None
    return ZmqEventPublisher(config, data_parallel_rank)
