"""KV-cache events: what the prefix cache gained and lost, in vLLM's wire shapes.

The block pool records an event whenever the set of *reusable* blocks changes:

    BlockStored       full blocks registered under their hashes (a run of consecutive blocks of
                      one request: `parent_block_hash` is the hash of the block before the run,
                      None for a request's first block; `token_ids` are the run's tokens)
    BlockRemoved      hashes that stopped naming a block (the block was evicted for new content)
    AllBlocksCleared  every hash forgotten (`reset_prefix_cache`)

The engine core takes the events after each step (`KVCacheManager.take_events`) and hands them,
as one `KVEventBatch`, to a publisher (`sluice.kv_events`), which sends them off the step's
critical path. A subscriber that applies them in order knows which block hashes the engine can
reuse, so a router can estimate a prompt's cache hit without asking the engine.

The structs are msgpack `array_like` and tagged exactly as vLLM's `vllm.distributed.kv_events`,
so subscribers written for vLLM (Dynamo's KV router, `kv_events_subscriber.py`) decode them.
Block hashes are sluice's 32-byte sha256 digests (`hashing.py`), stable across processes.
No torch, no zmq.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

MEDIUM_DEVICE = "GPU"
"""`medium` of blocks in the engine's own KV cache. vLLM names that tier "GPU"; sluice uses the
same name for the device-memory tier on every platform (CPU included) so that consumers that
filter on it (Dynamo) treat sluice's blocks as the primary tier."""


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base class of the KV-cache events (the tag is the class name)."""


class BlockStored(KVCacheEvent):
    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[bytes]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


KVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]


class KVEventBatch(EventBatch):
    events: list[KVEvent]


def batch_decoder() -> msgspec.msgpack.Decoder:
    """A decoder of published payloads into `KVEventBatch`."""
    return msgspec.msgpack.Decoder(KVEventBatch)
