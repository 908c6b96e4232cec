"""KV events from a live `sluice serve --kv-events-config` (item 2 of issue 16).

One server (tiny llama, 16-token blocks, one running request, so its 16 usable blocks fill up
fast) publishing on ipc:// sockets; a ZeroMQ SUB records every batch. Checked: BlockStored for
a prompt's full blocks with the engine's hashes, parent chain and token ids; a second prompt
sharing a prefix stores only its new blocks, chained to the shared one; eviction publishes
BlockRemoved for hashes stored before; /reset_prefix_cache publishes AllBlocksCleared; a
subscriber that dropped messages gets them back, contiguous and byte-identical, through the
replay socket; the router's subscriber, started late, rebuilds the index through replay.
"""

from __future__ import annotations

import json
import random
import time

import httpx
import pytest
import zmq

from sluice.core.kv_cache.events import (AllBlocksCleared, BlockRemoved, BlockStored,
                                         batch_decoder)
from sluice.core.kv_cache.hashing import hash_token_blocks
from sluice.entrypoints.router.kv_index import KVEventSubscriber, KVIndex
from sluice.kv_events.publisher import END_SEQ

BS = 16
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("kv-events")
    return f"ipc://{d}/pub", f"ipc://{d}/replay"


@pytest.fixture(scope="module")
def events_server(start_server, llama_dir, endpoints):
    pub, replay = endpoints
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": pub,
              "replay_endpoint": replay, "buffer_steps": 1000, "topic": "kv"}
    return start_server(llama_dir, "--block-size", str(BS), "--max-num-seqs", "1",
                        "--kv-events-config", json.dumps(config))


class Recorder:
    """A SUB socket that records (seq, payload) of every batch it receives."""

    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"kv")
        self.sub.connect(endpoint)
        self.batches: list[tuple[int, bytes]] = []
        self.decoder = batch_decoder()

    def drain(self, settle_s: float = 0.5) -> None:
        """Receive until nothing arrives for `settle_s`."""
        while self.sub.poll(int(settle_s * 1000)):
            topic, seq, payload = self.sub.recv_multipart()
            assert topic == b"kv"
            self.batches.append((int.from_bytes(seq, "big"), payload))

    def events(self, start: int = 0) -> list:
        return [e for seq, p in self.batches[start:] for e in self.decoder.decode(p).events]

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def replay_from(endpoint: str, start: int) -> list[tuple[int, bytes]]:
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    try:
        dealer.send_multipart((b"", start.to_bytes(8, "big")))
        got = []
        while True:
            assert dealer.poll(10_000), "no reply from the replay socket"
            _, seq, payload = dealer.recv_multipart()
            if seq == END_SEQ:
                return got
            got.append((int.from_bytes(seq, "big"), payload))
    finally:
        ctx.destroy(linger=0)


def complete(server, tokens: list[int]) -> None:
    r = httpx.post(server.url + "/v1/completions", timeout=60,
                   json={"prompt": tokens, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text


def prompt(seed: int, n: int = 96) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 2000) for _ in range(n)]


def stored_hashes(events) -> list[bytes]:
    return [h for e in events if isinstance(e, BlockStored) for h in e.block_hashes]


def test_stored_removed_cleared_and_replay(events_server, endpoints):
    pub, replay = endpoints
    rec = Recorder(pub)
    try:
        time.sleep(0.5)   # let the SUB join before anything is published
        p1 = prompt(1)
        complete(events_server, p1)
        rec.drain()
        h1 = hash_token_blocks(p1, BS)
        [s1] = [e for e in rec.events() if isinstance(e, BlockStored)]
        assert s1.block_hashes == h1 and len(h1) == 6
        assert s1.parent_block_hash is None and s1.token_ids == p1
        assert s1.block_size == BS and s1.lora_id is None and s1.medium == "GPU"

        # Shares 4 blocks: only blocks 4..5 are new, chained to block 3.
        mark = len(rec.batches)
        p2 = p1[:64] + prompt(2, 32)
        complete(events_server, p2)
        rec.drain()
        [s2] = [e for e in rec.events(mark) if isinstance(e, BlockStored)]
        assert s2.block_hashes == hash_token_blocks(p2, BS)[4:]
        assert s2.parent_block_hash == h1[3] and s2.token_ids == p2[64:]

        # 16 usable blocks: three more distinct prompts must evict earlier blocks.
        for seed in (3, 4, 5):
            complete(events_server, prompt(seed))
        rec.drain()
        removed = [h for e in rec.events() if isinstance(e, BlockRemoved)
                   for h in e.block_hashes]
        assert removed and set(removed) <= set(stored_hashes(rec.events()))

        r = httpx.post(events_server.url + "/reset_prefix_cache", timeout=30)
        assert r.status_code == 200, r.text
        rec.drain()
        assert isinstance(rec.events()[-1], AllBlocksCleared)

        seqs = [seq for seq, _ in rec.batches]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))   # nothing lost on ipc

        # A subscriber that dropped batches 1..3 asks for them again: contiguous and identical.
        kept = rec.batches[:1]
        recovered = replay_from(replay, kept[-1][0] + 1)
        assert [s for s, _ in recovered] == seqs[1:]
        assert recovered == rec.batches[1:]
    finally:
        rec.close()


def test_router_subscriber_rebuilds_through_replay(events_server, endpoints):
    """Started after the events were published, the router's subscriber still learns what
    the engine caches now, from the replay buffer alone."""
    pub, replay = endpoints
    p = prompt(7)
    complete(events_server, p)
    time.sleep(0.5)
    index = KVIndex()
    sub = KVEventSubscriber(index, pub, replay).start()
    try:
        sub.resync()
        deadline = time.monotonic() + 30
        while sub.num_replayed == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sub.num_replayed > 0 and sub.num_lost == 0
        assert index.block_size == BS
        assert index.overlap(hash_token_blocks(p, BS)) == 6
    finally:
        sub.stop()
