"""The `Attention` layer: paged attention over the KV cache found in the forward context."""

from __future__ import annotations

import torch
from torch import nn

from sluice.model.attention.backends import AttentionBackend, get_attn_backend
from sluice.model.attention.forward_context import get_forward_context
from sluice.model.attention.kv_cache import FP8_KV_DTYPES
from sluice.model.attention.kv_scales import inverse


class Attention(nn.Module):
    """forward(q [T, H*D], k [T, Hkv*D], v [T, Hkv*D]) -> [T, H*D] (also accepts [T, heads, D]).

    `num_heads` / `num_kv_heads` are this tensor-parallel rank's (local) heads, as
    `QKVLinear` holds them; the KV cache is allocated with the same local count.
    Reads `kv_caches[layer_idx]` and the step's metadata from the active forward context and
    delegates to an attention backend (`backend` instance, shared across layers by the model;
    default: a new `torch_paged` instance). With metadata None (dummy/profiling run) it skips
    the cache and returns zeros. Raises RuntimeError when no forward context is set.

    `k_scale` / `v_scale`: the checkpoint's KV-cache scales (`set_kv_scale`; default 1), used
    only over an fp8 cache: the backend then gets k / k_scale, v / v_scale and the softmax
    scale `scale * k_scale`, and the output is multiplied by v_scale (`sluice.model.attention.
    kv_scales` derives why that equals attention over the dequantized cache).
    """

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 layer_idx: int, backend: AttentionBackend | None = None) -> None:
        super().__init__()
        assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.layer_idx = layer_idx
        self.backend = backend if backend is not None else get_attn_backend()
        self.k_scale = self.v_scale = 1.0
        self._k_inverse = self._v_inverse = 1.0   # `inverse` of each, computed once

    def set_kv_scale(self, which: str, value: float) -> None:
        """Set the KV-cache scale 'k', 'v' or 'kv' (both) to `value` (> 0)."""
        assert which in ("k", "v", "kv") and value > 0, (which, value)
        if which in ("k", "kv"):
            self.k_scale, self._k_inverse = value, inverse(value)
        if which in ("v", "kv"):
            self.v_scale, self._v_inverse = value, inverse(value)

    @property
    def has_kv_scales(self) -> bool:
        return (self.k_scale, self.v_scale) != (1.0, 1.0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        num_tokens = q.shape[0]
        if ctx.attn_metadata is None:
            return q.new_zeros(num_tokens, self.num_heads * self.head_dim)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        cache = ctx.kv_caches[self.layer_idx]
        if not (self.has_kv_scales and cache.dtype in FP8_KV_DTYPES):
            out = self.backend.forward(q, k, v, cache, ctx.attn_metadata, self.scale)
            return out.reshape(num_tokens, self.num_heads * self.head_dim)
        out = self.backend.forward(q, k * self._k_inverse, v * self._v_inverse,
                                   cache, ctx.attn_metadata, self.scale * self.k_scale)
        return (out * self.v_scale).reshape(num_tokens, self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"layer={self.layer_idx}, backend={self.backend.name}"
                + (f", k_scale={self.k_scale:g}, v_scale={self.v_scale:g}"
                   if self.has_kv_scales else ""))
