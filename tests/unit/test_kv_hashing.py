"""Chained block hashes: prefix sharing, chaining, salt, incremental hashing, stability."""

from __future__ import annotations

import os
import subprocess
import sys

from sluice.core.kv_cache.hashing import (NONE_HASH, hash_block_tokens, hash_token_blocks,
                                          make_block_hasher)
from sluice.core.request import Request
from sluice.sampling_params import SamplingParams

BS = 4


def test_only_full_blocks_are_hashed():
    assert len(hash_token_blocks(list(range(11)), BS)) == 2
    assert hash_token_blocks([1, 2, 3], BS) == []
    assert all(len(h) == 32 for h in hash_token_blocks(list(range(8)), BS))


def test_same_prefix_gives_same_hashes():
    a = hash_token_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], BS)
    b = hash_token_blocks([1, 2, 3, 4, 5, 6, 7, 8, 99, 98, 97, 96], BS)
    assert a[:2] == b[:2]
    assert a[2] != b[2]


def test_changing_an_earlier_block_changes_every_later_hash():
    a = hash_token_blocks(list(range(12)), BS)
    b = hash_token_blocks([0, 1, 2, 42] + list(range(4, 12)), BS)
    assert all(x != y for x, y in zip(a, b))


def test_identical_block_content_at_different_positions_differs():
    hashes = hash_token_blocks([7, 7, 7, 7] * 3, BS)
    assert len(set(hashes)) == 3


def test_salt_changes_first_hash_and_the_chain():
    plain = hash_token_blocks(list(range(8)), BS)
    salted = hash_token_blocks(list(range(8)), BS, cache_salt="tenant-a")
    other = hash_token_blocks(list(range(8)), BS, cache_salt="tenant-b")
    assert plain[0] != salted[0] != other[0]
    assert plain[1] != salted[1] != other[1]
    assert salted == hash_token_blocks(list(range(8)), BS, cache_salt="tenant-a")


def test_root_parent_is_none_hash():
    assert hash_block_tokens(None, [1, 2]) == hash_block_tokens(NONE_HASH, [1, 2])
    assert hash_block_tokens(None, [1, 2], ("x",)) != hash_block_tokens(None, [1, 2])


def test_incremental_hashing_matches_batch_hashing():
    prompt = list(range(6))
    req = Request("r", prompt, SamplingParams(), None, 0.0, cache_salt="s",
                  block_hasher=make_block_hasher(BS))
    assert len(req.block_hashes) == 1
    for tok in range(100, 111):
        req.append_output_token_ids(tok)
    req.append_output_token_ids([200, 201, 202])
    expected = hash_token_blocks(req.all_token_ids, BS, cache_salt="s")
    assert req.block_hashes == expected
    assert len(expected) == (6 + 14) // BS


def test_hash_is_stable_across_processes_and_hash_seeds():
    code = ("from sluice.core.kv_cache.hashing import hash_token_blocks;"
            "print(','.join(h.hex() for h in hash_token_blocks(list(range(32)), 16, 'salt')))")
    here = ",".join(h.hex() for h in hash_token_blocks(list(range(32)), 16, "salt"))
    for seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert out == here


def test_hash_format_is_frozen():
    # Golden values: a change here breaks cross-instance routing; bump the root seed version.
    hashes = hash_token_blocks(list(range(32)), 16)
    assert hashes[0].hex() == "01364d91f0518494a1e3b1617b9f9d681291f321c1b7e5c03105cef84262a50c"
    assert hashes[1].hex() == "4a85943b0612148edcc01a5e098b7f50f6f7e1b02b7aa89944a495d73359028a"
