"""The router's choices (round-robin, least-load, kv cost with the imbalance cap), its worker
specs, and its KV index — no processes, no sockets."""

from __future__ import annotations

import pytest

from sluice.core.kv_cache.events import (AllBlocksCleared, BlockRemoved, BlockStored,
                                         KVEventBatch)
from sluice.core.kv_cache.hashing import hash_token_blocks
from sluice.entrypoints.router.routing import PromptHashes, Router
from sluice.entrypoints.router.workers import Worker, parse_worker_spec

BS = 4


def workers(n: int = 2) -> list[Worker]:
    return [Worker(f"http://w{i}") for i in range(n)]


def store(worker: Worker, tokens: list[int]) -> None:
    worker.index.apply(KVEventBatch(0.0, [BlockStored(hash_token_blocks(tokens, BS), None,
                                                      tokens, BS, None, "GPU")]))


def test_round_robin_alternates_and_least_load_picks_the_idle():
    ws = workers(3)
    rr = Router("round-robin")
    assert [rr.choose(ws).worker.url for _ in range(4)] == [
        "http://w0", "http://w1", "http://w2", "http://w0"]
    ws[0].outstanding, ws[1].outstanding, ws[2].outstanding = 2, 0, 1
    assert Router("least-load").choose(ws).worker is ws[1]


def test_kv_prefers_the_worker_holding_the_prefix_and_counts_the_hit():
    ws = workers()
    prefix = list(range(40))                       # 10 blocks
    store(ws[1], prefix)
    prompt = PromptHashes(prefix + [99, 98, 97])   # 43 tokens: 10 full blocks
    d = Router("kv").choose(ws, prompt)
    assert d.worker is ws[1] and d.overlap_blocks == 10 and d.prompt_blocks == 10
    # The last token is never a hit: a prompt of exactly the cached tokens overlaps 9 blocks.
    assert Router("kv").choose(ws, PromptHashes(prefix)).overlap_blocks == 9
    # A salted prompt hashes differently: no overlap anywhere.
    assert Router("kv").choose(ws, PromptHashes(prefix + [1], cache_salt="s")).overlap_blocks == 0


def test_kv_load_and_imbalance_cap():
    ws = workers()
    prefix = list(range(40))
    store(ws[0], prefix)
    prompt = PromptHashes(prefix + [5])
    ws[0].outstanding = 4                          # cost 0 + 4 < 10 + 0: still the cached one
    assert Router("kv", max_imbalance=4).choose(ws, prompt).worker is ws[0]
    ws[0].outstanding = 5                          # beyond the cap: must go elsewhere
    assert Router("kv", max_imbalance=4).choose(ws, prompt).worker is ws[1]
    ws[0].outstanding = 3                          # a heavy load weight outweighs the hit
    assert Router("kv", kv_load_weight=5.0).choose(ws, prompt).worker is ws[1]


def test_kv_without_events_or_tokens_spreads_by_load():
    ws = workers()
    r = Router("kv")
    assert {r.choose(ws, PromptHashes(list(range(20)))).worker.url for _ in range(4)} == {
        "http://w0", "http://w1"}
    ws[0].outstanding = 1
    assert r.choose(ws, None).worker is ws[1]


def test_index_removed_and_cleared():
    w = Worker("http://w")
    tokens = list(range(12))
    hashes = hash_token_blocks(tokens, BS)
    store(w, tokens)
    assert w.index.overlap(hashes) == 3 and w.index.block_size == BS
    w.index.apply(KVEventBatch(0.0, [BlockRemoved([hashes[1]], "GPU")]))
    assert w.index.overlap(hashes) == 1 and len(w.index) == 2
    w.index.apply(KVEventBatch(0.0, [AllBlocksCleared()]))
    assert len(w.index) == 0


def test_worker_specs():
    assert parse_worker_spec("http://h:1/") == ("http://h:1", None, None)
    assert parse_worker_spec("http://h:1,tcp://h:5557,tcp://h:5558") == (
        "http://h:1", "tcp://h:5557", "tcp://h:5558")
    for bad in ("h:1", "http://h:1,5557", "http://h:1,,tcp://x:1", "a,b,c,d"):
        with pytest.raises(ValueError):
            parse_worker_spec(bad)
    with pytest.raises(ValueError):
        Router("random")
