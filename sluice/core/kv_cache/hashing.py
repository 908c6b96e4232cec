"""Chained hashes of full KV-cache blocks, stable across processes and machines.

A block's hash identifies its KV content: the tokens in it *and* everything before it. So the
hash of block i chains the hash of block i-1::

    tokens:  [t0 ........ t15][t16 ....... t31][t32 .. t40]      (block_size 16)
    hashes:   h0 = H(NONE_HASH, t0..t15,  extra_0)
              h1 = H(h0,        t16..t31, extra_1)
              (the partial block t32..t40 has no hash until it is full)

`H` is sha256 over the msgpack encoding of `(parent_hash, token_ids, extra_keys)`; never
Python's `hash()`, which is salted per process. The digests are 32 raw bytes (`BlockHash`), so
they can later be used to route requests across engine instances.

Extra keys separate blocks whose tokens match but whose KV must not be shared: the request's
`cache_salt` (mixed into the first block only; the chain carries it into every later block) and
its LoRA adapter's `lora_int_id` (in every block's extra keys, so that a block computed under
one adapter is never found by a lookup under another adapter or the base model, whatever the
parent chain). A base-model request without a salt has no extra keys at all, so its hashes are
the same as before adapters existed (`block_extra_keys`).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Callable, Sequence

import msgspec

if TYPE_CHECKING:
    from sluice.core.request import Request

BlockHash = bytes
"""A 32-byte sha256 digest identifying one full block and its whole prefix."""

BlockHasher = Callable[["Request"], list[BlockHash]]
"""Returns the hashes of a request's blocks that became full since its last call."""

NONE_HASH: BlockHash = hashlib.sha256(b"sluice/kv-block-hash/root/v1").digest()
"""The parent hash of the first block of every request (a fixed, versioned seed)."""

_encoder = msgspec.msgpack.Encoder()


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int],
                      extra_keys: tuple | None = None) -> BlockHash:
    """Hash one full block given its parent's hash (`None` means the root, `NONE_HASH`).

    `extra_keys` must hold msgpack-encodable primitives (str, int, bytes, tuples of them).
    """
    parent = NONE_HASH if parent_hash is None else parent_hash
    payload = _encoder.encode((parent, list(token_ids), extra_keys))
    return hashlib.sha256(payload).digest()


def block_extra_keys(block_index: int, cache_salt: str | None,
                     lora_int_id: int = 0) -> tuple | None:
    """Extra keys of block `block_index`: `("salt", cache_salt)` on block 0, then
    `("lora", lora_int_id)` on every block when the request runs with an adapter (id >= 1;
    0 is the base model). None when neither applies."""
    keys: tuple = ()
    if block_index == 0 and cache_salt is not None:
        keys = ("salt", cache_salt)
    if lora_int_id:
        keys = (*keys, "lora", lora_int_id)
    return keys or None


def hash_token_blocks(token_ids: Sequence[int], block_size: int,
                      cache_salt: str | None = None,
                      parent_hashes: Sequence[BlockHash] = (),
                      lora_int_id: int = 0) -> list[BlockHash]:
    """Hashes of the full blocks of `token_ids` after the `len(parent_hashes)` already known,
    for a request with `cache_salt` running under adapter `lora_int_id` (0: base model).

    Returns only the new hashes: blocks `len(parent_hashes) .. len(token_ids) // block_size - 1`.
    """
    start = len(parent_hashes)
    parent = parent_hashes[-1] if parent_hashes else None
    new_hashes: list[BlockHash] = []
    for index in range(start, len(token_ids) // block_size):
        block = token_ids[index * block_size:(index + 1) * block_size]
        parent = hash_block_tokens(parent, block,
                                   block_extra_keys(index, cache_salt, lora_int_id))
        new_hashes.append(parent)
    return new_hashes


def make_block_hasher(block_size: int) -> BlockHasher:
    """A `BlockHasher` for `block_size`: hashes the request's blocks that became full since
    `request.block_hashes` was last extended (incremental; O(new tokens) per call)."""
    assert block_size > 0

    def hasher(request: "Request") -> list[BlockHash]:
        num_known = len(request.block_hashes)
        if (num_known + 1) * block_size > request.num_tokens:
            return []  # fast path: no new full block (every decode step but one in 16)
        return hash_token_blocks(request.all_token_ids, block_size, request.cache_salt,
                                 request.block_hashes, request.lora_int_id)

    return hasher
