"""The KV block pool: ref-counted blocks, an LRU free queue, and the prefix-cache map.

Contract:
* Block 0 is the reserved *null block*: never handed out, never freed, never cached (the KV
  tensors keep it zero and attention pads block tables with it). Usable ids: 1..num_blocks-1.
* A block is in the free queue iff its `ref_cnt` is 0. A free block may still carry a
  `block_hash` and be found by `get_cached_block`; `touch` takes it back out of the queue
  (O(1)), `get_new_blocks` evicts its hash when the block is reused for new content.
* Free-queue order is eviction order, front first: blocks freed without a hash (nothing to reuse)
  go to the front; hashed blocks go to the back in the order given, so callers free a request's
  blocks tail-first and its tail blocks are evicted before its (more shareable) head blocks.

* KV events (off unless `enable_kv_cache_events()`): registering hashes records a
  `BlockStored`, evicting one a `BlockRemoved`, a reset `AllBlocksCleared`, in the order they
  happen; `take_events()` hands them over (see `events.py`).

Every operation on the hot path is O(1) per block; nothing calls `list.remove`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from sluice.core.kv_cache.events import (MEDIUM_DEVICE, AllBlocksCleared, BlockRemoved,
                                         BlockStored, KVEvent)
from sluice.core.kv_cache.hashing import BlockHash


class KVCacheBlock:
    """One block's metadata. `prev_free`/`next_free` link it into the `FreeBlockQueue`."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None

    @property
    def is_null(self) -> bool:
        return self.block_id == 0

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash is not None else None
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, hash={h})"


class FreeBlockQueue:
    """A doubly linked list of free blocks between two sentinels; O(1) everywhere.

    front (evicted first) ⇄ ... ⇄ back (most recently freed)
    """

    def __init__(self, blocks: Iterable[KVCacheBlock] = ()):
        self._head = KVCacheBlock(-1)  # sentinels: never handed out
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        self.append_n(blocks)

    def __len__(self) -> int:
        return self.num_free_blocks

    def popleft(self) -> KVCacheBlock:
        """Remove and return the front block. Raises IndexError when empty."""
        block = self._head.next_free
        if block is self._tail:
            raise IndexError("pop from an empty FreeBlockQueue")
        self.remove(block)
        return block

    def popleft_n(self, n: int) -> list[KVCacheBlock]:
        """Remove and return the `n` front blocks (caller checks `n <= len(self)`)."""
        return [self.popleft() for _ in range(n)]

    def remove(self, block: KVCacheBlock) -> None:
        """Unlink `block` from wherever it is in the queue."""
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"{block} is not in the free queue"
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        """Insert `block` at the back (evicted last)."""
        self._insert_after(self._tail.prev_free, block)

    def appendleft(self, block: KVCacheBlock) -> None:
        """Insert `block` at the front (evicted first)."""
        self._insert_after(self._head, block)

    def append_n(self, blocks: Iterable[KVCacheBlock]) -> None:
        for block in blocks:
            self.append(block)

    def _insert_after(self, anchor: KVCacheBlock, block: KVCacheBlock) -> None:
        assert block.prev_free is None and block.next_free is None, f"{block} already queued"
        nxt = anchor.next_free
        block.prev_free, block.next_free = anchor, nxt
        anchor.next_free = block
        nxt.prev_free = block
        self.num_free_blocks += 1

    def __iter__(self) -> Iterator[KVCacheBlock]:
        """Front to back (for tests and debugging)."""
        block = self._head.next_free
        while block is not self._tail:
            yield block
            block = block.next_free


@dataclass
class PrefixCacheStats:
    """Prefix-cache lookups, in tokens, since the stats were last taken."""
    queries: int = 0
    hits: int = 0

    def record(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.queries += num_query_tokens
        self.hits += num_hit_tokens


class BlockPool:
    """All `num_blocks` blocks (including the null block 0) and the hash → block map."""

    def __init__(self, num_blocks: int, enable_caching: bool):
        assert num_blocks >= 2, "need the null block and at least one usable block"
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.null_block.ref_cnt = 1  # pinned: never enters the free queue
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        self.cached_blocks: dict[BlockHash, KVCacheBlock] = {}
        self.prefix_cache_stats = PrefixCacheStats()
        self.kv_event_queue: list[KVEvent] | None = None  # None: events off (no cost)

    def enable_kv_cache_events(self) -> None:
        """Start recording KV events (see the module docstring); idempotent."""
        if self.kv_event_queue is None:
            self.kv_event_queue = []

    def take_events(self) -> list[KVEvent]:
        """The events recorded since the previous call, oldest first (empty when off)."""
        events = self.kv_event_queue
        if not events:
            return []
        self.kv_event_queue = []
        return events

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def get_num_free_blocks(self) -> int:
        """Free blocks, including evictable cached ones."""
        return len(self.free_queue)

    def get_usage(self) -> float:
        """Fraction of usable blocks held by requests, 0..1."""
        return 1.0 - len(self.free_queue) / self.num_usable_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self.cached_blocks.get(block_hash)

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """Take `n` blocks from the front of the free queue (ref_cnt 1 each), evicting their old
        hashes. The caller checks `n <= get_num_free_blocks()` first."""
        assert n <= len(self.free_queue), f"asked for {n} blocks, {len(self.free_queue)} free"
        blocks = self.free_queue.popleft_n(n)
        removed: list[BlockHash] = []
        for block in blocks:
            assert block.ref_cnt == 0
            if block.block_hash is not None:
                removed.append(block.block_hash)
                self._evict(block)
            block.ref_cnt = 1
        if removed and self.kv_event_queue is not None:
            self.kv_event_queue.append(BlockRemoved(removed, MEDIUM_DEVICE))
        return blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on each block (a prefix-cache hit), unqueueing it if it was free."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block, in eviction order (pass a request's blocks
        tail-first). Blocks reaching 0 become free: hashed ones at the back, others at the
        front."""
        for block in ordered_blocks:
            assert not block.is_null and block.ref_cnt > 0, f"double free of {block}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self.free_queue.appendleft(block)
                else:
                    self.free_queue.append(block)

    def cache_full_blocks(self, block_hashes: Sequence[BlockHash],
                          blocks: Sequence[KVCacheBlock], num_cached_blocks: int,
                          num_full_blocks: int, *, token_ids: Sequence[int] = (),
                          block_size: int = 0, lora_id: int | None = None) -> None:
        """Register blocks `num_cached_blocks .. num_full_blocks-1` of one request under
        `block_hashes[i]`. A block already hashed (a cache hit) is left as it is; a block whose
        hash already names another block (the same content computed twice) stays unhashed, so
        the map never holds two blocks for one hash.

        With events on, each run of consecutive newly registered blocks is one `BlockStored`
        (its tokens are cut from the request's `token_ids` in `block_size` pieces)."""
        if not self.enable_caching:
            return
        assert num_full_blocks <= min(len(block_hashes), len(blocks))
        stored: list[int] = []  # indices newly registered, ascending
        for i in range(num_cached_blocks, num_full_blocks):
            block = blocks[i]
            if block.block_hash is not None:
                continue
            block_hash = block_hashes[i]
            if block_hash not in self.cached_blocks:
                block.block_hash = block_hash
                self.cached_blocks[block_hash] = block
                stored.append(i)
        if stored and self.kv_event_queue is not None:
            assert block_size > 0 and len(token_ids) >= (stored[-1] + 1) * block_size
            self._record_stored(block_hashes, stored, token_ids, block_size, lora_id)

    def _record_stored(self, block_hashes: Sequence[BlockHash], stored: list[int],
                       token_ids: Sequence[int], block_size: int,
                       lora_id: int | None = None) -> None:
        """One `BlockStored` (carrying the blocks' adapter id, None: base model) per run of consecutive indices in `stored`::

            stored = [2, 3, 5]  ->  BlockStored(hashes 2..3, parent = hash 1)
                                    BlockStored(hashes 5,    parent = hash 4)
        """
        assert self.kv_event_queue is not None
        start = prev = stored[0]
        for i in [*stored[1:], None]:
            if i is not None and i == prev + 1:
                prev = i
                continue
            self.kv_event_queue.append(BlockStored(
                block_hashes=list(block_hashes[start:prev + 1]),
                parent_block_hash=block_hashes[start - 1] if start > 0 else None,
                token_ids=list(token_ids[start * block_size:(prev + 1) * block_size]),
                block_size=block_size, lora_id=lora_id, medium=MEDIUM_DEVICE))
            if i is not None:
                start = prev = i

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            if self.cached_blocks.get(block.block_hash) is block:
                del self.cached_blocks[block.block_hash]
            block.block_hash = None

    def reset_prefix_cache(self) -> bool:
        """Forget every hash, so no later request hits a block computed before (as vLLM: only
        when no block is in use). Returns False, changing nothing, while any request still
        holds blocks: their hashes would have to survive for them, and after a reset the
        cache must hold no reusable block at all (e.g. before sleep discards the contents)."""
        num_used = self.num_usable_blocks - len(self.free_queue)
        if num_used > 0:
            return False
        for block in self.cached_blocks.values():
            block.block_hash = None
        self.cached_blocks.clear()
        if self.kv_event_queue is not None:
            self.kv_event_queue.append(AllBlocksCleared())
        return True

    def take_prefix_cache_stats(self) -> PrefixCacheStats:
        """Return the stats since the previous call and start new ones."""
        stats, self.prefix_cache_stats = self.prefix_cache_stats, PrefixCacheStats()
        return stats
