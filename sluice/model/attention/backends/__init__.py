"""Attention backend registry: a name -> factory map so faster kernels (C++/OpenMP, CUDA) can
slot in behind the same `Attention` layer.

A backend implements the `AttentionBackend` protocol: `forward(q, k, v, kv_cache, metadata,
scale) -> out`, with q [T, H, D], k/v [T, Hkv, D] (any strides), `kv_cache` one layer's
[2, num_blocks, block_size, Hkv, D] tensor, and out [T, H, D]. It must first write k/v at
`metadata.slot_mapping`, then attend causally over each request's cached keys.
One backend instance may be shared by all layers of a model (it may keep a scratch workspace).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from sluice.model.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata,
                scale: float) -> torch.Tensor: ...


_FACTORIES: dict[str, Callable[[], AttentionBackend]] = {}
DEFAULT_BACKEND = "torch_paged"


def register_attn_backend(name: str, factory: Callable[[], AttentionBackend]) -> None:
    """Make `factory` available as backend `name` (e.g. from a platform module)."""
    _FACTORIES[name] = factory


def available_attn_backends() -> list[str]:
    _ensure_builtin()
    return sorted(_FACTORIES)


def get_attn_backend(name: str | None = None) -> AttentionBackend:
    """A new instance of backend `name` (default: the pure-torch paged backend)."""
    _ensure_builtin()
    name = name or DEFAULT_BACKEND
    if name not in _FACTORIES:
        raise ValueError(f"unknown attention backend '{name}'; available: "
                         f"{', '.join(sorted(_FACTORIES))}")
    return _FACTORIES[name]()


def _ensure_builtin() -> None:
    if "torch_paged" not in _FACTORIES:
        from sluice.model.attention.backends.cpu_paged import make_cpu_paged_backend
        from sluice.model.attention.backends.torch_paged import TorchPagedBackend
        _FACTORIES["torch_paged"] = TorchPagedBackend
        _FACTORIES["cpu_paged"] = make_cpu_paged_backend
