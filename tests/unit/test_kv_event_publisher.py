"""KV events: what the block pool records, the config parser, the ZeroMQ publisher's wire
format and replay, and the router's subscriber catching up through replay (in-process, ipc://
sockets, no model)."""

from __future__ import annotations

import time

import msgspec
import pytest
import zmq

from sluice.core.kv_cache.events import (AllBlocksCleared, BlockRemoved, BlockStored,
                                         KVEventBatch, batch_decoder)
from sluice.core.kv_cache.hashing import hash_token_blocks, make_block_hasher
from sluice.core.kv_cache.manager import KVCacheManager
from sluice.core.request import Request
from sluice.entrypoints.router.kv_index import KVEventSubscriber, KVIndex
from sluice.errors import ConfigError
from sluice.kv_events.config import parse_kv_events_config
from sluice.kv_events.publisher import END_SEQ, ZmqEventPublisher
from sluice.sampling_params import SamplingParams

BS = 4


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(), None, 0.0, block_hasher=make_block_hasher(BS))


def admit(m: KVCacheManager, r: Request) -> None:
    blocks, hit = m.get_computed_blocks(r)
    assert m.allocate_slots(r, r.num_tokens - hit, hit, blocks) is not None
    r.num_computed_tokens = r.num_tokens


def test_pool_records_stored_removed_and_cleared():
    m = KVCacheManager(num_blocks=6, block_size=BS, enable_caching=True, max_model_len=64)
    off = req("off", list(range(8)))
    admit(m, off)
    assert m.take_events() == []                      # off until enabled
    m.free(off)
    assert m.reset_prefix_cache()
    m.enable_kv_cache_events()

    tokens = list(range(100, 110))                    # 2 full blocks + 2 tokens
    a = req("a", tokens)
    admit(m, a)
    hashes = hash_token_blocks(tokens, BS)
    [stored] = m.take_events()
    assert stored == BlockStored(block_hashes=hashes, parent_block_hash=None,
                                 token_ids=tokens[:8], block_size=BS, lora_id=None,
                                 medium="GPU")
    # A request sharing block 0 stores only its own block 1, chained to block 0's hash.
    b_tokens = tokens[:4] + [7, 7, 7, 7, 7]
    b = req("b", b_tokens)
    admit(m, b)
    [stored_b] = m.take_events()
    assert stored_b.block_hashes == hash_token_blocks(b_tokens, BS)[1:]
    assert stored_b.parent_block_hash == hashes[0] and stored_b.token_ids == [7, 7, 7, 7]
    m.free(a)
    m.free(b)
    assert m.take_events() == []                      # freeing keeps the hashes cached
    # 5 usable blocks, 3 of them hashed: a 20-token request takes all, evicting every hash.
    c = req("c", list(range(200, 220)))
    admit(m, c)
    events = m.take_events()
    removed = [e for e in events if isinstance(e, BlockRemoved)]
    assert sorted(h for e in removed for h in e.block_hashes) == sorted(hashes + stored_b.block_hashes)
    assert isinstance(events[-1], BlockStored)        # evictions precede the new blocks' store
    m.free(c)
    assert m.reset_prefix_cache()
    assert m.take_events() == [AllBlocksCleared()]


def test_store_runs_split_around_blocks_already_cached_elsewhere():
    m = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True, max_model_len=64)
    m.enable_kv_cache_events()
    pool = m.block_pool
    hashes = hash_token_blocks(list(range(16)), BS)
    blocks = pool.get_new_blocks(4)
    pool.cached_blocks[hashes[1]] = pool.get_new_blocks(1)[0]   # block 1's content lives elsewhere
    pool.cache_full_blocks(hashes, blocks, 0, 4, token_ids=list(range(16)), block_size=BS)
    runs = [(e.block_hashes, e.parent_block_hash) for e in pool.take_events()]
    assert runs == [([hashes[0]], None), (hashes[2:4], hashes[1])]


def test_event_wire_format_is_vllms():
    batch = KVEventBatch(ts=1.5, events=[BlockStored([b"h" * 32], None, [1, 2], 2, None, "GPU"),
                                         BlockRemoved([b"h" * 32], "GPU"), AllBlocksCleared()])
    raw = msgspec.msgpack.decode(msgspec.msgpack.encode(batch))
    assert raw == [1.5, [["BlockStored", [b"h" * 32], None, [1, 2], 2, None, "GPU"],
                         ["BlockRemoved", [b"h" * 32], "GPU"], ["AllBlocksCleared"]],
                   None]                            # data_parallel_rank, as vLLM's batches
    assert batch_decoder().decode(msgspec.msgpack.encode(batch)) == batch

    class OldBatch(msgspec.Struct, array_like=True):   # a decoder without data_parallel_rank
        ts: float
        events: list
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(batch), type=OldBatch).ts == 1.5


def test_config_parsing():
    cfg = parse_kv_events_config('{"enable_kv_cache_events": true, "replay_endpoint": '
                                 '"tcp://*:5558", "buffer_steps": 5}')
    assert cfg.enabled and cfg.publisher_kind == "zmq" and cfg.endpoint == "tcp://*:5557"
    assert not parse_kv_events_config('{"enable_kv_cache_events": false}').enabled
    assert not parse_kv_events_config('{"enable_kv_cache_events": true, '
                                      '"publisher": "null"}').enabled
    for bad, word in (("{", "JSON"), ("[1]", "object"), ('{"endpont": "x"}', "endpont"),
                      ('{"hwm": "1"}', "hwm"), ('{"publisher": "kafka"}', "kafka"),
                      ('{"buffer_steps": 0}', "buffer_steps")):
        with pytest.raises(ConfigError, match=word):
            parse_kv_events_config(bad)


@pytest.fixture
def publisher(tmp_path):
    from sluice.kv_events.config import KVEventsConfig
    cfg = KVEventsConfig(enable_kv_cache_events=True, endpoint=f"ipc://{tmp_path}/pub",
                         replay_endpoint=f"ipc://{tmp_path}/replay", buffer_steps=4,
                         topic="kv")
    pub = ZmqEventPublisher(cfg)
    yield pub
    pub.shutdown()


def _batch(i: int) -> KVEventBatch:
    return KVEventBatch(ts=float(i), events=[BlockStored([bytes([i]) * 32], None, [i], 1,
                                                         None, "GPU")])


def test_publisher_frames_and_bounded_replay(publisher):
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    sub.connect(publisher.endpoint)
    replay = ctx.socket(zmq.DEALER)   # one request, many replies: not REQ
    replay.connect(publisher.replay_endpoint)
    try:
        time.sleep(0.3)   # PUB drops what it sends before the SUB has joined
        for i in range(6):
            publisher.publish(_batch(i))
        seen = []
        for _ in range(6):
            assert sub.poll(5000)
            topic, seq, payload = sub.recv_multipart()
            assert topic == b"kv"
            seen.append((int.from_bytes(seq, "big"), batch_decoder().decode(payload).ts))
        assert seen == [(i, float(i)) for i in range(6)]
        # Only the last buffer_steps=4 batches are kept: asking from 1 gets 2..5, then END.
        replay.send_multipart((b"", (1).to_bytes(8, "big")))
        got = []
        while True:
            assert replay.poll(5000)
            empty, seq, payload = replay.recv_multipart()
            assert empty == b""
            if seq == END_SEQ:
                assert payload == b""
                break
            got.append(int.from_bytes(seq, "big"))
        assert got == [2, 3, 4, 5]
    finally:
        ctx.destroy(linger=0)


def test_subscriber_catches_up_through_replay(publisher):
    for i in range(3):          # published before anyone listens: only replay can supply them
        publisher.publish(_batch(i))
    time.sleep(0.2)
    index = KVIndex()
    sub = KVEventSubscriber(index, publisher.endpoint, publisher.replay_endpoint).start()
    try:
        time.sleep(0.3)
        publisher.publish(_batch(3))
        deadline = time.monotonic() + 10
        while sub.last_seq < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sub.last_seq == 3 and sub.num_lost == 0 and sub.num_replayed == 3
        assert len(index) == 4 and index.block_size == 1
        assert index.overlap([bytes([0]) * 32, bytes([1]) * 32, b"x" * 32]) == 2
        publisher.publish(KVEventBatch(ts=9.0, events=[AllBlocksCleared()]))
        deadline = time.monotonic() + 10
        while len(index) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(index) == 0
    finally:
        sub.stop()
