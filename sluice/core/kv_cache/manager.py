"""KVCacheManager: which blocks each request owns, prefix-cache lookup, allocation, freeing.

One request's blocks and tokens in the step that allocates them::

    tokens   |<- num_computed_tokens ->|<- num_new_computed ->|<- num_new_tokens ->|<- lookahead ->|
             |  already in its blocks  |  prefix-cache hit    |  computed this step | spec. slots   |
    blocks   [ req_blocks[rid] ........][ new_computed_blocks ][ newly allocated blocks ........ ]

    num_required_blocks = cdiv(num_computed + num_new_computed + num_new_tokens + lookahead,
                               block_size)

After allocation, every block that will be full once this step has run (covered by
`num_computed + num_new_computed + num_new_tokens` known tokens) is registered in the prefix
cache right away, so a request admitted later in the same step can already hit it. This relies on
the attention layer writing the whole batch's new K/V into the cache before any request attends.

Blocks of a request are freed tail-first, so its tail blocks are evicted before its head blocks.
"""

from __future__ import annotations

from sluice.core.kv_cache.block_pool import BlockPool, KVCacheBlock, PrefixCacheStats
from sluice.core.kv_cache.events import KVEvent
from sluice.core.request import Request
from sluice.errors import KVCacheTooSmallError


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks one request of `num_tokens` tokens occupies (excluding the null block)."""
    return cdiv(num_tokens, block_size)


def check_kv_cache_capacity(num_blocks: int, block_size: int, max_model_len: int) -> None:
    """Raise `KVCacheTooSmallError` unless one `max_model_len` request fits in `num_blocks`
    blocks (of which block 0 is the reserved null block)."""
    needed = num_blocks_needed(max_model_len, block_size)
    if needed > num_blocks - 1:
        raise KVCacheTooSmallError(
            f"KV cache too small: {num_blocks} blocks (1 reserved) of {block_size} tokens hold "
            f"{max(num_blocks - 1, 0) * block_size} tokens, but one request of "
            f"max_model_len={max_model_len} needs {needed} blocks. Raise --kv-cache-memory or "
            f"lower --max-model-len to at most {max(num_blocks - 1, 0) * block_size}.")


class KVCacheManager:
    """Owns the `BlockPool` and the block list of every request holding blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool,
                 max_model_len: int):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.max_model_len = max_model_len
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # How many leading blocks of each request were already offered to the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}

    # ---- capacity ------------------------------------------------------------------------
    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests, 0..1."""
        return self.block_pool.get_usage()

    def get_num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    def num_blocks_needed(self, num_tokens: int) -> int:
        return num_blocks_needed(num_tokens, self.block_size)

    def can_fit(self, num_tokens: int) -> bool:
        """Whether one request of `num_tokens` tokens fits in the whole (empty) cache."""
        return self.num_blocks_needed(num_tokens) <= self.block_pool.num_usable_blocks

    # ---- prefix cache --------------------------------------------------------------------
    def _uses_prefix_cache(self, request: Request) -> bool:
        # Prompt logprobs need every prompt position computed, so such requests skip lookups.
        return self.enable_caching and request.sampling_params.prompt_logprobs is None

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest run of cached full blocks from the start of the request, and the number
        of tokens they hold. Side-effect free (stats are recorded when the request allocates).

        The last known token is never a hit, so the step computes it and yields logits::

            num_tokens = 32, block_size = 16: max hit = (32 - 1) // 16 = 1 block (16 tokens)
            num_tokens = 33, block_size = 16: max hit = (33 - 1) // 16 = 2 blocks (32 tokens)
        """
        if not self._uses_prefix_cache(request):
            return [], 0
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        blocks: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    # ---- allocation ----------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       num_new_computed_tokens: int = 0,
                       new_computed_blocks: list[KVCacheBlock] | None = None,
                       num_lookahead_tokens: int = 0,
                       delay_cache_blocks: bool = False) -> list[int] | None:
        """Make room for `num_new_tokens` tokens after `request.num_computed_tokens` (plus a
        prefix hit of `num_new_computed_tokens` tokens in `new_computed_blocks`, which only a
        request holding no blocks may pass).

        `delay_cache_blocks`: do not offer the new full blocks to the prefix cache yet (their
        KV arrives later, from a KV connector's load); `cache_blocks` does it once it has.

        Returns the ids of the newly allocated blocks (not the hit blocks; possibly empty), or
        `None` when the free queue cannot supply them — then nothing changed. Hit blocks that
        are free (ref 0) count against the free blocks, since touching takes them out of the
        queue.
        """
        new_computed_blocks = new_computed_blocks or []
        rid = request.request_id
        req_blocks = self.req_to_blocks.get(rid)
        first_allocation = req_blocks is None
        assert first_allocation or not new_computed_blocks, "hit blocks only on first allocation"
        assert len(new_computed_blocks) * self.block_size == num_new_computed_tokens
        num_held = 0 if req_blocks is None else len(req_blocks)

        num_known = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        assert num_known <= request.num_tokens, (request, num_new_tokens)
        num_required = self.num_blocks_needed(num_known + num_lookahead_tokens)
        num_new_blocks = max(0, num_required - num_held - len(new_computed_blocks))
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks + num_evictable_hits > self.block_pool.get_num_free_blocks():
            return None

        if req_blocks is None:
            req_blocks = self.req_to_blocks[rid] = []
            self.num_cached_blocks[rid] = len(new_computed_blocks)
            if self._uses_prefix_cache(request):
                self.block_pool.prefix_cache_stats.record(request.num_tokens,
                                                          num_new_computed_tokens)
        self.block_pool.touch(new_computed_blocks)
        req_blocks.extend(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        req_blocks.extend(new_blocks)

        if not delay_cache_blocks:
            self.cache_blocks(request, num_known)
        return [b.block_id for b in new_blocks]

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Offer the request's blocks that `num_computed_tokens` known tokens fill to the
        prefix cache (those not offered yet). No-op without prefix caching."""
        rid = request.request_id
        if not self.enable_caching or rid not in self.req_to_blocks:
            return
        num_full = min(num_computed_tokens // self.block_size, len(request.block_hashes))
        if num_full > self.num_cached_blocks[rid]:
            self.block_pool.cache_full_blocks(request.block_hashes, self.req_to_blocks[rid],
                                              self.num_cached_blocks[rid], num_full,
                                              token_ids=request.all_token_ids,
                                              block_size=self.block_size,
                                              lora_id=request.lora_int_id or None)
            self.num_cached_blocks[rid] = num_full

    def free(self, request: Request) -> None:
        """Release all of the request's blocks, tail first. No-op if it holds none."""
        blocks = self.req_to_blocks.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        if blocks:
            self.block_pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def reset_prefix_cache(self) -> bool:
        """Forget all cached hashes. Returns False (nothing changed) while any request holds
        blocks, as vLLM's `reset_prefix_cache`; True once the cache holds no reusable block."""
        return self.block_pool.reset_prefix_cache()

    def take_prefix_cache_stats(self) -> PrefixCacheStats:
        return self.block_pool.take_prefix_cache_stats()

    # ---- KV events (`events.py`) -----------------------------------------------------------
    def enable_kv_cache_events(self) -> None:
        """Record BlockStored / BlockRemoved / AllBlocksCleared from now on."""
        self.block_pool.enable_kv_cache_events()

    def take_events(self) -> list[KVEvent]:
        """The KV events since the previous call, oldest first (empty when off)."""
        return self.block_pool.take_events()
