"""KVCacheManager: prefix-hit arithmetic, allocation, evictable hits, tail-first freeing."""

from __future__ import annotations

import pytest

from sluice.core.kv_cache.hashing import make_block_hasher
from sluice.core.kv_cache.manager import KVCacheManager, check_kv_cache_capacity
from sluice.core.request import Request
from sluice.errors import KVCacheTooSmallError
from sluice.sampling_params import SamplingParams

BS = 4


def req(rid: str, tokens: list[int], **params) -> Request:
    return Request(rid, tokens, SamplingParams(**params), None, 0.0,
                   block_hasher=make_block_hasher(BS))


def admit(m: KVCacheManager, r: Request) -> tuple[list[int], int]:
    """Look up, allocate the whole remainder, and mark it computed (as the scheduler does)."""
    blocks, hit = m.get_computed_blocks(r)
    new = m.allocate_slots(r, r.num_tokens - hit, hit, blocks)
    assert new is not None
    r.num_computed_tokens = r.num_tokens
    return new, hit


def test_prefix_hit_never_covers_the_last_token():
    m = KVCacheManager(num_blocks=32, block_size=BS, enable_caching=True, max_model_len=64)
    base = list(range(12))
    admit(m, req("a", base))
    # Whole prompt cached (12 tokens = 3 full blocks): back off one block.
    assert m.get_computed_blocks(req("b", base))[1] == 8
    # 13 tokens: (13 - 1) // 4 = 3 blocks hit.
    assert m.get_computed_blocks(req("c", base + [99]))[1] == 12
    # 11 tokens: (11 - 1) // 4 = 2 blocks.
    assert m.get_computed_blocks(req("d", base[:11]))[1] == 8
    # Divergence in block 1: only block 0 hits.
    assert m.get_computed_blocks(req("e", base[:5] + [77] + base[6:]))[1] == 4


def test_allocation_arithmetic_and_block_ids():
    m = KVCacheManager(num_blocks=10, block_size=BS, enable_caching=False, max_model_len=64)
    r = req("a", list(range(10)))
    assert m.allocate_slots(r, 6) == [1, 2]           # tokens 0..5 → 2 blocks
    r.num_computed_tokens = 6
    assert m.allocate_slots(r, 2) == []                # tokens 6..7 fit in block 2
    r.num_computed_tokens = 8
    assert m.allocate_slots(r, 2, num_lookahead_tokens=3) == [3, 4]  # 8..12 → 4 blocks
    assert m.get_block_ids("a") == [1, 2, 3, 4]
    assert m.get_num_free_blocks() == 5


def test_allocation_failure_changes_nothing():
    m = KVCacheManager(num_blocks=4, block_size=BS, enable_caching=False, max_model_len=64)
    r = req("a", list(range(16)))
    assert m.allocate_slots(r, 16) is None             # needs 4, only 3 usable
    assert m.get_num_free_blocks() == 3 and m.get_block_ids("a") == []
    assert m.allocate_slots(r, 12) == [1, 2, 3]


def test_hits_share_blocks_and_count_refs():
    m = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True, max_model_len=64)
    a = req("a", list(range(9)))
    admit(m, a)
    b = req("b", list(range(9)))
    new, hit = admit(m, b)
    assert hit == 8
    assert m.get_block_ids("b")[:2] == m.get_block_ids("a")[:2]
    assert len(new) == 1 and new[0] not in m.get_block_ids("a")
    shared = m.req_to_blocks["a"][0]
    assert shared.ref_cnt == 2
    m.free(a)
    assert shared.ref_cnt == 1


def test_evictable_hits_count_against_free_blocks():
    # 5 usable blocks. "a" caches 2 full blocks then frees them (they stay cached, ref 0).
    m = KVCacheManager(num_blocks=6, block_size=BS, enable_caching=True, max_model_len=64)
    a = req("a", list(range(8)))
    admit(m, a)
    m.free(a)
    assert m.get_num_free_blocks() == 5
    # "b" hits both cached blocks (needs 8 + 1 tokens) and then needs 4 more blocks for 16 new
    # tokens: 2 evictable hits + 4 new = 6 > 5 free → must fail, and change nothing.
    b = req("b", list(range(8)) + [50] * 17)
    blocks, hit = m.get_computed_blocks(b)
    assert hit == 8
    assert m.allocate_slots(b, 16, hit, blocks) is None
    assert m.get_num_free_blocks() == 5 and all(x.ref_cnt == 0 for x in blocks)
    # 12 new tokens → 3 new blocks + 2 hits = 5: fits exactly, without evicting the hits.
    new = m.allocate_slots(b, 12, hit, blocks)
    assert new is not None and len(new) == 3
    assert m.get_block_ids("b")[:2] == [x.block_id for x in blocks]
    assert m.get_num_free_blocks() == 0


def test_free_is_tail_first_so_tails_are_evicted_first():
    m = KVCacheManager(num_blocks=5, block_size=BS, enable_caching=True, max_model_len=64)
    a = req("a", list(range(16)))
    admit(m, a)  # blocks 1..4, all full and cached
    m.free(a)
    # One new block must evict a's tail (block 4), keeping the first three hittable.
    other = req("x", [9] * 3)
    assert m.allocate_slots(other, 3) == [4]
    blocks, hit = m.get_computed_blocks(req("b", list(range(16)) + [1]))
    assert hit == 12 and [x.block_id for x in blocks] == [1, 2, 3]


def test_decode_blocks_are_cached_when_they_become_full():
    m = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True, max_model_len=64)
    a = req("a", [1, 2, 3])
    admit(m, a)
    for tok in (4, 5, 6):  # decode: tokens 3, 4, 5 enter the cache one by one
        a.append_output_token_ids(tok)
        assert m.allocate_slots(a, 1) is not None
        a.num_computed_tokens += 1
    # Tokens 1..4 form a full block; a new request with those 4 + 1 more hits it.
    assert m.get_computed_blocks(req("b", [1, 2, 3, 4, 5]))[1] == 4


def test_prompt_logprobs_requests_skip_the_prefix_cache():
    m = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True, max_model_len=64)
    admit(m, req("a", list(range(9))))
    assert m.get_computed_blocks(req("b", list(range(9)), prompt_logprobs=1)) == ([], 0)


def test_stats_recorded_once_per_admission():
    m = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True, max_model_len=64)
    a = req("a", list(range(9)))
    admit(m, a)
    b = req("b", list(range(9)))
    blocks, hit = m.get_computed_blocks(b)
    m.get_computed_blocks(b)  # lookups themselves do not count
    m.allocate_slots(b, 1, hit, blocks)
    b.num_computed_tokens = 9
    stats = m.take_prefix_cache_stats()
    assert (stats.queries, stats.hits) == (18, 8)


def test_reset_prefix_cache():
    m = KVCacheManager(num_blocks=16, block_size=BS, enable_caching=True, max_model_len=64)
    a = req("a", list(range(9)))
    admit(m, a)
    assert not m.reset_prefix_cache()  # "a" holds blocks: refused, as vLLM
    assert m.get_computed_blocks(req("b", list(range(9))))[1] > 0
    m.free(a)
    assert m.reset_prefix_cache()
    assert m.get_computed_blocks(req("b", list(range(9))))[1] == 0


def test_capacity_checks():
    m = KVCacheManager(num_blocks=5, block_size=BS, enable_caching=True, max_model_len=16)
    assert m.num_blocks_needed(17) == 5
    assert m.can_fit(16) and not m.can_fit(17)
    check_kv_cache_capacity(5, BS, 16)
    with pytest.raises(KVCacheTooSmallError, match="max_model_len=17"):
        check_kv_cache_capacity(5, BS, 17)
