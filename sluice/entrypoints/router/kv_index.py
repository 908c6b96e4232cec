"""What each worker's prefix cache holds, kept from its KV events.

    worker engine ──PUB [topic, seq, KVEventBatch]──► KVEventSubscriber (a thread) ──► KVIndex
                  ◄─ROUTER replay [start seq]─────── (on a gap in seq, or after a resync)

`KVIndex` is a set of the 32-byte block hashes the worker can reuse (BlockStored adds,
BlockRemoved removes, AllBlocksCleared empties) plus the worker's block size (from BlockStored).
`overlap(prompt_hashes)` counts the leading hashes of a prompt present in the set: the blocks
the worker would not recompute. The hashes are sluice's own (`core.kv_cache.hashing`), so the
router computes a prompt's hashes exactly as the engine does.

`KVEventSubscriber` applies batches in sequence order. A gap (a late join, a dropped message)
triggers a replay request for the missing sequence numbers; batches the publisher no longer
buffers are counted as lost (the index may then miss some blocks until they are stored again,
which only makes routing estimates pessimistic). A sequence number going backwards means the
worker restarted: the index is cleared. `resync()` (after a worker was declared dead) clears
the index and replays the publisher's whole buffer. Torch-free.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Sequence

import msgspec
import zmq

from sluice.core.kv_cache.events import (AllBlocksCleared, BlockRemoved, BlockStored,
                                         KVEventBatch, batch_decoder)
from sluice.kv_events.publisher import END_SEQ

logger = logging.getLogger(__name__)

REPLAY_TIMEOUT_S = 1.0
_POLL_MS = 100


class KVIndex:
    """One worker's reusable block hashes (thread-safe: the subscriber writes, routing reads)."""

    def __init__(self) -> None:
        self._hashes: set[bytes] = set()
        self._lock = threading.Lock()
        self.block_size: int | None = None
        self.num_events = 0

    def apply(self, batch: KVEventBatch) -> None:
        with self._lock:
            for event in batch.events:
                self.num_events += 1
                if isinstance(event, BlockStored):
                    self._hashes.update(event.block_hashes)
                    self.block_size = event.block_size
                elif isinstance(event, BlockRemoved):
                    self._hashes.difference_update(event.block_hashes)
                elif isinstance(event, AllBlocksCleared):
                    self._hashes.clear()

    def clear(self) -> None:
        with self._lock:
            self._hashes.clear()

    def __len__(self) -> int:
        return len(self._hashes)

    def __contains__(self, block_hash: bytes) -> bool:
        return block_hash in self._hashes

    def overlap(self, prompt_hashes: Sequence[bytes]) -> int:
        """How many leading `prompt_hashes` this worker holds (a prefix hit stops at the first
        miss, as the engine's lookup does)."""
        with self._lock:
            for n, block_hash in enumerate(prompt_hashes):
                if block_hash not in self._hashes:
                    return n
            return len(prompt_hashes)


class KVEventSubscriber:
    """A daemon thread that keeps `index` up to date from one worker's event sockets."""

    def __init__(self, index: KVIndex, endpoint: str, replay_endpoint: str | None = None,
                 name: str = "worker"):
        self.index = index
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.last_seq = -1
        self.num_batches = 0
        self.num_replayed = 0
        self.num_lost = 0
        self._replayed_ahead = False   # a full replay ran past live messages still queued
        self._decoder = batch_decoder()
        self._stop = threading.Event()
        self._resync = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sluice-kv-sub-{name}",
                                        daemon=True)

    def start(self) -> "KVEventSubscriber":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def resync(self) -> None:
        """Forget the index and rebuild it from the publisher's replay buffer (thread-safe)."""
        self._resync.set()

    # ---- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.endpoint)
        replay = None
        if self.replay_endpoint is not None:
            replay = ctx.socket(zmq.DEALER)
            replay.setsockopt(zmq.LINGER, 0)
            replay.connect(self.replay_endpoint)
        try:
            while not self._stop.is_set():
                if self._resync.is_set():
                    self._resync.clear()
                    self.index.clear()
                    self.last_seq = -1
                    self._replay(replay, 0, None)
                    self._replayed_ahead = self.last_seq >= 0
                if not sub.poll(_POLL_MS):
                    continue
                frames = sub.recv_multipart()
                if len(frames) != 3 or len(frames[1]) != 8:
                    logger.warning("%s: ignoring a malformed KV event message", self.endpoint)
                    continue
                self._on_live(replay, int.from_bytes(frames[1], "big"), frames[2])
        except zmq.ZMQError as e:
            if not self._stop.is_set():
                logger.error("KV event subscriber for %s stopped: %s", self.endpoint, e)
        finally:
            sub.close()
            if replay is not None:
                replay.close()
            ctx.term()

    def _on_live(self, replay: zmq.Socket | None, seq: int, payload: bytes) -> None:
        if seq <= self.last_seq and self._replayed_ahead:
            return   # already applied by the resync's replay
        self._replayed_ahead = False
        if seq <= self.last_seq:   # the publisher restarted: its cache is new and empty
            logger.info("%s: KV event sequence restarted (%d after %d); clearing the index",
                        self.endpoint, seq, self.last_seq)
            self.index.clear()
            self.last_seq = -1
        if seq > self.last_seq + 1:
            self._replay(replay, self.last_seq + 1, seq)
        if seq > self.last_seq + 1:
            self.num_lost += seq - self.last_seq - 1
        self._apply(seq, payload)

    def _apply(self, seq: int, payload: bytes) -> None:
        try:
            batch = self._decoder.decode(payload)
        except msgspec.DecodeError as e:
            logger.warning("%s: undecodable KV event batch %d: %s", self.endpoint, seq, e)
        else:
            self.index.apply(batch)
        self.last_seq = seq
        self.num_batches += 1

    def _replay(self, replay: zmq.Socket | None, start: int, until: int | None) -> None:
        """Ask for batches `start ..` and apply those in order below `until` (None: all)."""
        if replay is None:
            return
        while replay.poll(0):   # leftovers of an earlier replay that timed out
            replay.recv_multipart()
        replay.send_multipart((b"", start.to_bytes(8, "big")))
        deadline = time.monotonic() + REPLAY_TIMEOUT_S
        while (remaining := deadline - time.monotonic()) > 0:
            if not replay.poll(int(remaining * 1000) + 1):
                break
            frames = replay.recv_multipart()
            if len(frames) != 3:
                continue
            _, seq_bytes, payload = frames
            if seq_bytes == END_SEQ:
                return
            seq = int.from_bytes(seq_bytes, "big")
            if seq <= self.last_seq or (until is not None and seq >= until):
                continue
            if seq > self.last_seq + 1:
                self.num_lost += seq - self.last_seq - 1
            self._apply(seq, payload)
            self.num_replayed += 1
        logger.warning("%s: KV event replay from %d got no end marker within %.1f s",
                       self.replay_endpoint, start, REPLAY_TIMEOUT_S)
