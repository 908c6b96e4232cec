"""Paged attention: forward context, per-step metadata, KV cache allocation, layer, backends."""

from sluice.model.attention.backends import (AttentionBackend, available_attn_backends,
                                             get_attn_backend, register_attn_backend)
from sluice.model.attention.forward_context import (ForwardContext, get_forward_context,
                                                    set_forward_context)
from sluice.model.attention.kv_cache import (allocate_kv_caches, kv_cache_bytes_per_block,
                                             kv_cache_shape)
from sluice.model.attention.layer import Attention
from sluice.model.attention.metadata import AttentionMetadata, build_attention_metadata

__all__ = ["Attention", "AttentionBackend", "AttentionMetadata", "ForwardContext",
           "allocate_kv_caches", "available_attn_backends", "build_attention_metadata",
           "get_attn_backend", "get_forward_context", "kv_cache_bytes_per_block",
           "kv_cache_shape", "register_attn_backend", "set_forward_context"]
