"""The per-step forward context: the one guarded slot through which attention layers find
their KV cache and the step's metadata.

    with set_forward_context(attn_metadata, kv_caches):
        hidden = model(input_ids, positions)

Only one context can be active at a time (nesting raises); outside a context,
`get_forward_context()` raises. The model runner is the only caller of `set_forward_context`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sluice.model.attention.metadata import AttentionMetadata


@dataclass(frozen=True)
class ForwardContext:
    """`attn_metadata` None means a dummy/profiling forward: attention layers skip the cache
    and return zeros. `kv_caches[i]` is layer i's cache (see `kv_cache_shape`)."""
    attn_metadata: "AttentionMetadata | None"
    kv_caches: Sequence[torch.Tensor]


_current: ForwardContext | None = None


@contextmanager
def set_forward_context(attn_metadata: "AttentionMetadata | None",
                        kv_caches: Sequence[torch.Tensor]) -> Iterator[ForwardContext]:
    """Make (metadata, caches) visible to attention layers for the duration of one forward."""
    global _current
    if _current is not None:
        raise RuntimeError("set_forward_context: a forward context is already active; "
                           "forward contexts cannot be nested.")
    _current = ForwardContext(attn_metadata, kv_caches)
    try:
        yield _current
    finally:
        _current = None


def get_forward_context() -> ForwardContext:
    """The active context; raises RuntimeError when called outside `set_forward_context`."""
    if _current is None:
        raise RuntimeError("No forward context is set: attention layers read their KV cache and "
                           "metadata from it, so run the model inside "
                           "`with set_forward_context(attn_metadata, kv_caches): ...`.")
    return _current


def has_forward_context() -> bool:
    return _current is not None
