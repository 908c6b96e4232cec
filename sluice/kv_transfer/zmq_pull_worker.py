"""ZmqPullConnector, worker half: a block server on the producer, block pulls on the consumer.

Producer: a thread with a ZeroMQ ROUTER socket bound at tcp://kv_ip:port (`port_for` this
rank) answers pulls of the requests the scheduler told it to serve (`metadata.sends`). One pull::

    consumer DEALER → [msgpack {"request_id": remote_request_id, "block_ids": [...]}]
    producer        → [msgpack {"request_id", "shape": [L, 2, n, bs, heads, head_dim],
                                "dtype": "torch.float32"}, raw bytes of that tensor]
                      or [msgpack {"request_id", "error": "..."}]

The reply holds the blocks of every layer (a gather of each layer's cache at `block_ids`,
copied under the lock, so blocks are never read while the step's forward could be reusing them:
`metadata.expired` is applied under the same lock before the forward). A served request counts
as sent (`finished_sending`) once its reply is queued, so the scheduler frees its blocks.

Tensor parallelism (the same tp size on both sides, checked through the layout record): rank r
pulls from the producer's rank r (port + r), so every rank moves its own KV heads. The ranks
agree before reporting (`_agree_*`, collectives on the TP group, only while transfers are
pending): a load counts as done only if it succeeded on every rank (else every rank reports it
failed and the prompt is recomputed everywhere), and a request counts as sent only once every
producer rank has served it (the driver proposes its sent ids, every rank confirms).

Consumer: `start_load_kv` pulls each `LoadSpec` before the step's forward (synchronously, with
`transfer_timeout_seconds`), checks the reply's shape and dtype against its own cache, and
scatters the blocks into `local_block_ids`. A pull that fails (refused, timed out, wrong
layout, unknown request) is reported in `failed_recving` with a warning, and the scheduler
recomputes the prompt. No request's KV is ever half-written into a block the forward reads:
the target blocks belong to a request in WAITING_FOR_REMOTE_KV.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings

import msgspec
import torch
import zmq

from sluice.distributed.parallel_state import get_tp_group
from sluice.kv_transfer.config import KVTransferConfig
from sluice.kv_transfer.connector import KVConnectorWorker
from sluice.kv_transfer.metadata import KVConnectorMetadata, KVConnectorOutput, LoadSpec

logger = logging.getLogger(__name__)

_POLL_MS = 100
_IDLE_WAIT_S = 0.005   # an idle producer step waits this long for a pull to finish


class TransferError(Exception):
    pass


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy())


class ZmqPullWorker(KVConnectorWorker):
    def __init__(self, config: KVTransferConfig, tp_rank: int, tp_size: int, dp_rank: int = 0):
        self.config = config
        self.tp_rank = tp_rank
        self.tp = get_tp_group() if tp_size > 1 else None
        self.port = config.port_for(tp_rank, tp_size, dp_rank)
        self._registered: set[str] = set()   # told to serve, not yet sent by all ranks
        self.ctx = zmq.Context()
        self.kv_caches: list[torch.Tensor] = []
        self._cond = threading.Condition()
        self._serving: dict[str, set[int]] = {}   # guarded by _cond
        self._sent: set[str] = set()               # guarded by _cond
        self._recv_done: list[str] = []
        self._recv_failed: list[str] = []
        self._bytes = 0
        self._seconds: list[float] = []
        self._stop = threading.Event()
        self._server: threading.Thread | None = None
        self._server_socket: zmq.Socket | None = None
        self._sockets: dict[str, zmq.Socket] = {}   # consumer: one DEALER per producer rank

    # ---- setup ----------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        with self._cond:
            self.kv_caches = kv_caches
        if self.config.is_producer and self._server is None:
            sock = self.ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            address = f"tcp://{self.config.kv_ip}:{self.port}"
            try:
                sock.bind(address)
            except zmq.ZMQError as e:
                sock.close()
                raise RuntimeError(f"KV connector: cannot bind the block server at {address} "
                                   f"({e}); pick another kv_port in --kv-transfer-config") from e
            self._server_socket = sock
            self._server = threading.Thread(target=self._serve, name="sluice-kv-server",
                                            daemon=True)
            self._server.start()
            logger.info("KV block server on %s", address)

    def shutdown(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.join(timeout=2)
            self._server = None
        self.ctx.destroy(linger=0)

    # ---- producer: the block server --------------------------------------------------------
    def _serve(self) -> None:
        sock, decoder = self._server_socket, msgspec.msgpack.Decoder(dict)
        encoder = msgspec.msgpack.Encoder()
        try:
            while not self._stop.is_set():
                if not sock.poll(_POLL_MS, zmq.POLLIN):
                    continue
                identity, body = sock.recv_multipart()
                try:
                    pull = decoder.decode(body)
                    header, data = self._read(str(pull["request_id"]),
                                              [int(i) for i in pull["block_ids"]])
                except (KeyError, TypeError, ValueError, msgspec.DecodeError) as e:
                    header, data = {"request_id": "", "error": f"malformed pull: {e}"}, None
                frames = [identity, encoder.encode(header)]
                if data is not None:
                    frames.append(_as_bytes(data))
                sock.send_multipart(frames, copy=False)
                if data is not None:
                    with self._cond:
                        self._sent.add(header["request_id"])
                        self._cond.notify_all()
        finally:
            sock.close(linger=0)

    def _read(self, request_id: str, block_ids: list[int]) -> tuple[dict, torch.Tensor | None]:
        with self._cond:
            allowed = self._serving.get(request_id)
            if allowed is None:
                return {"request_id": request_id, "error": "no such request held here (its "
                        "lease may have expired)"}, None
            if not set(block_ids) <= allowed:
                return {"request_id": request_id, "error": "block ids not held for this "
                        "request"}, None
            index = torch.tensor(block_ids, dtype=torch.long)
            data = torch.stack([cache[:, index] for cache in self.kv_caches])
            del self._serving[request_id]
        return {"request_id": request_id, "shape": list(data.shape),
                "dtype": str(data.dtype)}, data

    # ---- the step hooks ------------------------------------------------------------------
    def start_load_kv(self, metadata: KVConnectorMetadata | None) -> None:
        if metadata is None:
            return
        if metadata.sends or metadata.expired:
            with self._cond:
                for rid, block_ids in metadata.sends.items():
                    self._serving[rid] = set(block_ids)
                    self._registered.add(rid)
                for rid in metadata.expired:
                    self._serving.pop(rid, None)
                    self._sent.discard(rid)
                    self._registered.discard(rid)
        failed = []
        for load in metadata.loads:
            start = time.perf_counter()
            try:
                self._bytes += self._pull(load)
            except TransferError as e:
                logger.warning("KV transfer for request %s from %s:%d failed (%s); "
                               "recomputing its prompt", load.request_id, load.remote_host,
                               load.remote_port + self.tp_rank, e)
                failed.append(True)
                continue
            failed.append(False)
            self._seconds.append(time.perf_counter() - start)
        failed = self._agree_failed(failed)
        for load, bad in zip(metadata.loads, failed):
            (self._recv_failed if bad else self._recv_done).append(load.request_id)

    def _agree_failed(self, failed: list[bool]) -> list[bool]:
        """Under TP: a load failed if it failed on any rank (every rank has the same loads)."""
        if self.tp is None or not failed:
            return failed
        flags = self.tp.all_reduce(torch.tensor(failed, dtype=torch.long))
        return [bool(f) for f in flags.tolist()]

    def _agree_sent(self, sent: set[str]) -> set[str]:
        """Under TP: the requests every rank has served (the rest stay pending). Runs on every
        rank in the same steps: those where the (identical) registered set is non-empty."""
        if self.tp is None or not self._registered:
            return sent
        proposed = self.tp.broadcast_object(sorted(sent) if self.tp.rank == 0 else None, src=0)
        flags = self.tp.all_reduce(torch.tensor([rid in sent for rid in proposed] or [0],
                                                dtype=torch.long))
        return {rid for rid, n in zip(proposed, flags.tolist()) if n == self.tp.size}

    def _request(self, load: LoadSpec) -> list[zmq.Frame]:
        """Send one pull and wait for its reply, on a DEALER socket kept per producer (a
        socket that timed out is closed, so a late reply never meets a later pull)."""
        endpoint = f"tcp://{load.remote_host}:{load.remote_port + self.tp_rank}"
        sock = self._sockets.get(endpoint)
        if sock is None:
            sock = self._sockets[endpoint] = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
        sock.send(msgspec.msgpack.encode({"request_id": load.remote_request_id,
                                          "block_ids": load.remote_block_ids}))
        deadline = time.monotonic() + self.config.transfer_timeout_seconds
        while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0 \
                and sock.poll(left_ms, zmq.POLLIN):
            frames = sock.recv_multipart(copy=False)
            header = msgspec.msgpack.decode(frames[0].bytes)
            if header.get("request_id") in (load.remote_request_id, ""):
                return frames
        del self._sockets[endpoint]
        sock.close(linger=0)
        raise TransferError(f"no reply within {self.config.transfer_timeout_seconds}s")

    def _pull(self, load: LoadSpec) -> int:
        """Pull `load`'s blocks into the local cache; returns the bytes received."""
        frames = self._request(load)
        header = msgspec.msgpack.decode(frames[0].bytes)
        if "error" in header:
            raise TransferError(f"the producer refused: {header['error']}")
        cache = self.kv_caches[0]
        n = len(load.local_block_ids)
        expected = [len(self.kv_caches), 2, n, *cache.shape[2:]]
        if header.get("shape") != expected or header.get("dtype") != str(cache.dtype) \
                or len(frames) != 2:
            raise TransferError(f"layout mismatch: got {header.get('shape')} "
                                f"{header.get('dtype')}, expected {expected} {cache.dtype}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # a read-only buffer: we only read it
            data = torch.frombuffer(frames[1].buffer, dtype=torch.uint8)
        data = data.view(cache.dtype).view(expected)
        index = torch.tensor(load.local_block_ids, dtype=torch.long)
        for layer, layer_cache in enumerate(self.kv_caches):
            layer_cache[:, index] = data[layer]
        return data.numel() * data.element_size()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        with self._cond:
            sent = set(self._sent)
        sending = self._agree_sent(sent)
        with self._cond:
            self._sent -= sending
        self._registered -= sending
        recving, self._recv_done = set(self._recv_done), []
        return sending, recving

    def build_output(self, finished_req_ids: set[str],
                     idle: bool = False) -> KVConnectorOutput | None:
        """This step's report. `idle` (nothing was scheduled): while blocks are held for a
        consumer, wait up to a few ms for a pull to finish, so an idle producer's engine
        loop does not spin."""
        if idle:
            with self._cond:
                if self._serving and not self._sent:
                    self._cond.wait(_IDLE_WAIT_S)
        sending, recving = self.get_finished(finished_req_ids)
        output = KVConnectorOutput(
            finished_sending=sorted(sending), finished_recving=sorted(recving),
            failed_recving=self._recv_failed,
            # every rank moved an equal shard (same layout); only the driver reports
            bytes_received=self._bytes * (self.tp.size if self.tp is not None else 1),
            transfer_seconds=self._seconds)
        self._recv_failed, self._bytes, self._seconds = [], 0, []
        return None if output.is_empty else output
