"""FreeBlockQueue and BlockPool: LRU order, O(1) removal, ref counts, null block, eviction."""

from __future__ import annotations

import pytest

from sluice.core.kv_cache.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock
from sluice.core.kv_cache.hashing import hash_token_blocks


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


# ---- FreeBlockQueue -------------------------------------------------------------------------
def test_free_queue_order_and_middle_removal():
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    assert len(q) == 5 and ids(q) == [0, 1, 2, 3, 4]
    q.remove(blocks[2])
    assert ids(q) == [0, 1, 3, 4] and len(q) == 4
    assert blocks[2].prev_free is None and blocks[2].next_free is None
    q.remove(blocks[0])
    q.remove(blocks[4])
    assert ids(q) == [1, 3]
    q.append(blocks[4])
    q.appendleft(blocks[0])
    q.append_n([blocks[2]])
    assert ids(q) == [0, 1, 3, 4, 2]
    assert q.popleft() is blocks[0]
    assert ids(q.popleft_n(2)) == [1, 3]
    assert ids(q) == [4, 2] and len(q) == 2


def test_free_queue_rejects_double_insert_and_empty_pop():
    b = KVCacheBlock(1)
    q = FreeBlockQueue([b])
    with pytest.raises(AssertionError):
        q.append(b)
    q.popleft()
    with pytest.raises(IndexError):
        q.popleft()
    with pytest.raises(AssertionError):
        q.remove(b)


def test_free_queue_remove_is_constant_time():
    # Removing from the middle only relinks neighbours: no scan (a list would be O(n)).
    blocks = [KVCacheBlock(i) for i in range(10_000)]
    q = FreeBlockQueue(blocks)
    mid = blocks[5000]
    q.remove(mid)
    assert blocks[4999].next_free is blocks[5001] and blocks[5001].prev_free is blocks[4999]


# ---- BlockPool ------------------------------------------------------------------------------
def test_null_block_is_never_handed_out():
    pool = BlockPool(num_blocks=5, enable_caching=True)
    assert pool.get_num_free_blocks() == 4
    got = pool.get_new_blocks(4)
    assert sorted(ids(got)) == [1, 2, 3, 4]
    assert pool.get_num_free_blocks() == 0 and pool.get_usage() == 1.0
    with pytest.raises(AssertionError):
        pool.get_new_blocks(1)
    pool.free_blocks(got)
    assert 0 not in ids(pool.free_queue)
    with pytest.raises(AssertionError):
        pool.free_blocks([pool.null_block])


def test_ref_counts_touch_and_free():
    pool = BlockPool(num_blocks=4, enable_caching=True)
    [a] = pool.get_new_blocks(1)
    assert a.ref_cnt == 1
    pool.touch([a])
    assert a.ref_cnt == 2
    pool.free_blocks([a])
    assert a.ref_cnt == 1 and pool.get_num_free_blocks() == 2
    pool.free_blocks([a])
    assert a.ref_cnt == 0 and pool.get_num_free_blocks() == 3
    with pytest.raises(AssertionError):
        pool.free_blocks([a])  # double free
    pool.touch([a])  # a free block (e.g. a cache hit) leaves the free queue
    assert a.ref_cnt == 1 and pool.get_num_free_blocks() == 2 and a not in list(pool.free_queue)


def test_usage():
    pool = BlockPool(num_blocks=5, enable_caching=False)
    assert pool.get_usage() == 0.0
    pool.get_new_blocks(1)
    assert pool.get_usage() == 0.25


def _cached_request_blocks(pool: BlockPool, tokens: list[int], block_size: int = 2):
    hashes = hash_token_blocks(tokens, block_size)
    blocks = pool.get_new_blocks(len(hashes))
    pool.cache_full_blocks(hashes, blocks, 0, len(hashes))
    return hashes, blocks


def test_freed_cached_blocks_are_evicted_tail_first_and_lose_their_hash():
    pool = BlockPool(num_blocks=7, enable_caching=True)
    hashes, blocks = _cached_request_blocks(pool, list(range(6)))  # 3 blocks
    assert [pool.get_cached_block(h) for h in hashes] == blocks
    pool.free_blocks(reversed(blocks))  # tail-first
    # Still hittable while free.
    assert [pool.get_cached_block(h) for h in hashes] == blocks
    # The 3 never-used blocks go first, then the request's tail, then its head.
    first = pool.get_new_blocks(3)
    assert all(b not in blocks for b in first)
    [tail] = pool.get_new_blocks(1)
    assert tail is blocks[2]
    assert tail.block_hash is None and pool.get_cached_block(hashes[2]) is None
    assert pool.get_cached_block(hashes[0]) is blocks[0]


def test_unhashed_freed_blocks_are_reused_before_cached_ones():
    pool = BlockPool(num_blocks=4, enable_caching=True)
    hashes, cached = _cached_request_blocks(pool, [1, 2])
    [plain] = pool.get_new_blocks(1)
    [other] = pool.get_new_blocks(1)
    assert pool.get_num_free_blocks() == 0
    pool.free_blocks(cached)
    pool.free_blocks([plain, other])  # unhashed: to the front
    assert ids(pool.free_queue) == [other.block_id, plain.block_id, cached[0].block_id]
    pool.get_new_blocks(2)
    assert pool.get_cached_block(hashes[0]) is cached[0]


def test_cache_full_blocks_keeps_one_block_per_hash():
    pool = BlockPool(num_blocks=8, enable_caching=True)
    hashes, first = _cached_request_blocks(pool, [5, 6, 7, 8])
    second = pool.get_new_blocks(2)
    pool.cache_full_blocks(hashes, second, 0, 2)
    assert [pool.get_cached_block(h) for h in hashes] == first
    assert all(b.block_hash is None for b in second)
    # Partial ranges: only the named slice is registered.
    h3 = hash_token_blocks([9, 9, 9, 9, 9, 9], 2)
    third = pool.get_new_blocks(2)
    pool.cache_full_blocks(h3, third, 0, 1)
    assert third[0].block_hash == h3[0] and third[1].block_hash is None


def test_caching_disabled_never_registers():
    pool = BlockPool(num_blocks=4, enable_caching=False)
    hashes = hash_token_blocks([1, 2, 3, 4], 2)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(hashes, blocks, 0, 2)
    assert pool.get_cached_block(hashes[0]) is None


def test_reset_prefix_cache_refuses_while_blocks_are_in_use():
    """As vLLM: a reset only happens when no block is held; then every hash is gone."""
    pool = BlockPool(num_blocks=6, enable_caching=True)
    hashes, blocks = _cached_request_blocks(pool, [1, 2, 3, 4])
    pool.free_blocks([blocks[1]])
    assert not pool.reset_prefix_cache()  # blocks[0] is still held: nothing changes
    assert pool.get_cached_block(hashes[0]) is blocks[0]
    assert pool.get_cached_block(hashes[1]) is blocks[1]
    pool.free_blocks([blocks[0]])
    assert pool.reset_prefix_cache()
    assert pool.get_cached_block(hashes[0]) is None and pool.get_cached_block(hashes[1]) is None
    assert blocks[0].block_hash is None and blocks[1].block_hash is None
    assert pool.get_num_free_blocks() == 5


def test_prefix_cache_stats_are_taken_and_reset():
    pool = BlockPool(num_blocks=3, enable_caching=True)
    pool.prefix_cache_stats.record(10, 4)
    pool.prefix_cache_stats.record(6, 0)
    stats = pool.take_prefix_cache_stats()
    assert (stats.queries, stats.hits) == (16, 4)
    assert pool.take_prefix_cache_stats().queries == 0
