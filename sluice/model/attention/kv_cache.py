"""KV cache tensors: one per layer, shape [2, num_blocks, block_size, num_kv_heads, head_dim].

Index arithmetic: token slot s = block_id * block_size + offset lives at
cache[:, s // block_size, s % block_size] (K at [0], V at [1]). Block 0 is the null block:
zero-filled, never handed to a request, used to pad block tables.

Every slot must hold a finite value even before it is written: attention reads whole blocks
and masks slots past seq_len (the tail of a request's last block, padding blocks), and a masked
slot gets softmax weight exactly 0 — but 0 * NaN = NaN, so uninitialised memory holding a NaN
bit pattern would poison the output. Hence the whole cache is zeroed at allocation (one memset
at startup; it also commits the memory up front). Stale data left by freed blocks is finite,
since only computed K/V is ever written.
"""

from __future__ import annotations

import math

import torch

from sluice.hf_config import ModelSpec
from sluice.model.host_memory import anonymous_buffer


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                   head_dim: int) -> tuple[int, int, int, int, int]:
    return (2, num_blocks, block_size, num_kv_heads, head_dim)


def kv_cache_bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype,
                             tp_size: int = 1) -> int:
    """Bytes one block takes across all layers (K and V) on one rank."""
    elem = torch.empty((), dtype=dtype).element_size()
    kv_heads = max(1, spec.num_key_value_heads // tp_size)
    return 2 * spec.num_hidden_layers * block_size * kv_heads * spec.head_dim * elem


def allocate_kv_caches(spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device | str, tp_size: int = 1) -> list[torch.Tensor]:
    """One zero-filled cache per layer (block 0 is the null block; see the module docstring
    for why the rest is zeroed too)."""
    assert num_blocks >= 2, "need the null block plus at least one usable block"
    kv_heads = max(1, spec.num_key_value_heads // tp_size)
    shape = kv_cache_shape(num_blocks, block_size, kv_heads, spec.head_dim)
    device = torch.device(device)
    # Pre-touch the blocks handed out first (the pool allocates low ids first), in huge pages,
    # so early requests take no page faults inside decode steps; the rest fault in lazily.
    elem = torch.empty((), dtype=dtype).element_size()
    block_bytes = math.prod(shape[2:]) * elem           # one block of K (or V), one layer
    prefault = min(num_blocks, max(1, PREFAULT_BYTES // (2 * block_bytes
                                                          * spec.num_hidden_layers)))
    caches = [_zeroed(shape, dtype, device, prefault) for _ in range(spec.num_hidden_layers)]
    if device.type == "cpu":
        for cache in caches:
            cache[:, :prefault].zero_()
    return caches


PREFAULT_BYTES = 1 << 30
"""KV-cache bytes (all layers) touched at startup on CPU: ~0.3-0.9 s here; covers 65K tokens
of the reference model (8 layers x 4 KV heads x 64 dims)."""


def _zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
            huge_blocks: int = 0) -> torch.Tensor:
    """A zero tensor. On CPU it lives in an anonymous private mapping, whose pages the kernel
    zero-fills on first touch: no memset at startup (a multi-GiB cache is ready at once) and
    no resident memory for blocks never used. Blocks [0, huge_blocks) of K and of V are
    advised for transparent huge pages (`sluice.model.host_memory`): the caller touches them at
    startup, and the attention kernels sweep scattered blocks ~1.5x faster in 2 MiB pages.
    The rest stays in 4 KiB pages: ~1 us per page on first touch, the same as a memset,
    where a 2 MiB fault inside a decode step costs ~5x more per byte. Faults inside a running
    decode step still cost more than a startup memset (~15 ms/step on W1 when nothing was
    pre-touched), hence the pre-touched prefix in `allocate_kv_caches`."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    prefix = nbytes // shape[0] // shape[1] * huge_blocks   # bytes of blocks [0, huge_blocks)
    half = nbytes // 2                                      # V starts here
    buffer = anonymous_buffer(nbytes, [(0, prefix), (half, prefix)])
    return buffer.view(dtype).view(shape)
