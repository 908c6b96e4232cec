"""Which worker gets a request: `--router-mode round-robin | least-load | kv`.

* round-robin: the healthy workers in registration order, one after another.
* least-load: the fewest requests in flight (from this router); ties rotate.
* kv: the lowest cost, where for worker w

      cost(w) = uncached_blocks(w) + kv_load_weight * outstanding(w)
      uncached_blocks(w) = prompt_blocks - overlap(w)

  `overlap(w)` is the number of leading full blocks of the prompt whose hashes w's KV events
  say it holds (capped at (num_tokens - 1) // block_size: the engine always recomputes the last
  prompt token), so the cost is roughly the prefill work w would do plus its queue. Only
  workers within `max_imbalance` requests of the least-loaded one are candidates, so a popular
  prefix cannot pile every request onto one worker. Ties rotate. Without token ids (the prompt
  could not be tokenized) or KV events, kv routing is least-load.

The prompt's block hashes are computed with the engine's own `hash_token_blocks`, per block
size (each worker reports its own in its BlockStored events). Torch-free.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

from sluice.core.kv_cache.hashing import BlockHash, hash_token_blocks
from sluice.entrypoints.router.workers import Worker

MODES = ("round-robin", "least-load", "kv")


@dataclass
class Decision:
    worker: Worker
    overlap_blocks: int = 0     # predicted prefix-cache hit on the chosen worker, in blocks
    prompt_blocks: int = 0      # full blocks of the prompt (0: unknown or not kv mode)


class PromptHashes:
    """A prompt's block hashes, computed once per block size on demand."""

    def __init__(self, token_ids: Sequence[int], cache_salt: str | None = None):
        self.token_ids = token_ids
        self.cache_salt = cache_salt
        self._by_block_size: dict[int, list[BlockHash]] = {}

    def hashes(self, block_size: int) -> list[BlockHash]:
        """The hashes of the blocks a cache hit can cover: (num_tokens - 1) // block_size."""
        if block_size not in self._by_block_size:
            usable = self.token_ids[:max(0, len(self.token_ids) - 1)]
            self._by_block_size[block_size] = hash_token_blocks(usable, block_size,
                                                                self.cache_salt)
        return self._by_block_size[block_size]

    def num_blocks(self, block_size: int) -> int:
        return len(self.token_ids) // block_size


class Router:
    """Stateless apart from the rotation counter; `choose` never blocks."""

    def __init__(self, mode: str = "kv", kv_load_weight: float = 1.0, max_imbalance: int = 4):
        if mode not in MODES:
            raise ValueError(f"unknown router mode {mode!r}; choose one of {', '.join(MODES)}")
        self.mode = mode
        self.kv_load_weight = kv_load_weight
        self.max_imbalance = max_imbalance
        self._turn = itertools.count()

    def _rotation(self, workers: Sequence[Worker]) -> list[Worker]:
        start = next(self._turn) % len(workers)
        return [*workers[start:], *workers[:start]]

    def choose(self, workers: Sequence[Worker], prompt: PromptHashes | None = None) -> Decision:
        """Pick one of `workers` (healthy, non-empty, in registration order)."""
        assert workers, "no worker to choose from"
        ordered = self._rotation(workers)
        if self.mode == "round-robin":
            return Decision(ordered[0])
        if self.mode == "least-load" or prompt is None:
            return Decision(min(ordered, key=lambda w: w.outstanding))
        least = min(w.outstanding for w in ordered)
        best: tuple[float, Worker, int] | None = None
        for worker in ordered:
            if worker.outstanding > least + self.max_imbalance:
                continue
            block_size = worker.index.block_size
            if block_size is None:   # no events from it yet: nothing cached that we know of
                blocks, overlap = _fallback_blocks(workers, prompt), 0
            else:
                blocks = prompt.num_blocks(block_size)
                overlap = worker.index.overlap(prompt.hashes(block_size))
            cost = (blocks - overlap) + self.kv_load_weight * worker.outstanding
            if best is None or cost < best[0]:
                best = (cost, worker, overlap)
        assert best is not None
        _, chosen, overlap = best
        block_size = chosen.index.block_size
        blocks = (prompt.num_blocks(block_size) if block_size is not None
                  else _fallback_blocks(workers, prompt))
        return Decision(chosen, overlap, blocks)


def _fallback_blocks(workers: Sequence[Worker], prompt: PromptHashes) -> int:
    """The prompt's blocks at the block size some worker reported (0 if none has yet)."""
    for worker in workers:
        if worker.index.block_size is not None:
            return prompt.num_blocks(worker.index.block_size)
    return 0
