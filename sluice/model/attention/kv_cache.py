"""KV cache tensors: one per layer, shape [2, num_blocks, block_size, num_kv_heads, head_dim].

`num_kv_heads` is this rank's: num_key_value_heads / tp, or 1 when tp > num_key_value_heads
(the KV heads are replicated; `sluice.model_spec.parallel_check.local_kv_heads`, the rule
`QKVLinear` follows too). Callers pass tp_size from `get_tp_group().size`. Under pipeline
parallelism a rank caches only its stage's layers: callers pass `num_layers` (the length of its
layer range), and cache i belongs to the stage's i-th layer (`Attention.layer_idx`).

Index arithmetic: token slot s = block_id * block_size + offset lives at
cache[:, s // block_size, s % block_size] (K at [0], V at [1]). Block 0 is the null block:
zero-filled, never handed to a request, used to pad block tables.

Every slot must hold a finite value even before it is written: attention reads whole blocks
and masks slots past seq_len (the tail of a request's last block, padding blocks), and a masked
slot gets softmax weight exactly 0 — but 0 * NaN = NaN, so uninitialised memory holding a NaN
bit pattern would poison the output. Hence the whole cache is zeroed at allocation (one memset
at startup; it also commits the memory up front). Stale data left by freed blocks is finite,
since only computed K/V is ever written.

fp8 caches (`--kv-cache-dtype fp8_e4m3 | fp8_e5m2`, `FP8_KV_DTYPES`) store k/v with a scale of
1 (vLLM's default k_scale = v_scale = 1.0), saturated to the format's largest finite value
(`to_cache_dtype`): torch's cast already saturates e4m3fn, but rounds an overflowing e5m2 value
to inf, which attention would turn into NaN. A float16 cache (a GGUF file's default, as
llama.cpp's) saturates at 65504 likewise (`SATURATED_KV_DTYPES`). torch implements no
index_copy_ for fp8, so writes and gathers go through the cache's bytes (`cache_bytes`).
"""

from __future__ import annotations

import math

import torch

from sluice.hf_config import ModelSpec
from sluice.model.host_memory import huge_page_buffer
from sluice.model_spec.parallel_check import local_kv_heads


FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
"""The 8-bit float cache dtypes (`--kv-cache-dtype fp8` / `fp8_e4m3` is e4m3fn, `fp8_e5m2`)."""


SATURATED_KV_DTYPES = (torch.float16, *FP8_KV_DTYPES)
"""Cache dtypes narrower in range than float32: a value past their largest finite one is stored
as that value (saturated), not as inf, which attention would turn into NaN."""


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` as the cache stores it in `dtype`: a cast (round to nearest even), a float16 or fp8
    value first clamped to +-the format's largest finite value (65504, 448 for e4m3fn, 57344
    for e5m2: `SATURATED_KV_DTYPES`), as the C++ cache writes do (`kv_rows.h`)."""
    if x.dtype == dtype:
        return x
    if dtype in SATURATED_KV_DTYPES:
        limit = torch.finfo(dtype).max
        return x.clamp(-limit, limit).to(dtype)
    return x.to(dtype)


def cache_bytes(x: torch.Tensor) -> torch.Tensor:
    """`x`'s storage as uint8 (an fp8 tensor; torch's index ops skip fp8), else `x` itself."""
    return x.view(torch.uint8) if x.dtype in FP8_KV_DTYPES else x


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int,
                   head_dim: int) -> tuple[int, int, int, int, int]:
    return (2, num_blocks, block_size, num_kv_heads, head_dim)


def kv_cache_bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype,
                             tp_size: int = 1, num_layers: int | None = None) -> int:
    """Bytes one block takes across this rank's layers (K and V): `num_layers` (default: all
    of the model's) of its local KV heads."""
    elem = torch.empty((), dtype=dtype).element_size()
    kv_heads = local_kv_heads(spec.num_key_value_heads, tp_size)
    layers = spec.num_hidden_layers if num_layers is None else num_layers
    return 2 * layers * block_size * kv_heads * spec.head_dim * elem


def allocate_kv_caches(spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device | str, tp_size: int = 1,
                       num_layers: int | None = None) -> list[torch.Tensor]:
    """One zero-filled cache for each of this rank's `num_layers` layers (default: all of the
    model's); block 0 is the null block (see the module docstring for why the rest is zeroed
    too)."""
    assert num_blocks >= 2, "need the null block plus at least one usable block"
    kv_heads = local_kv_heads(spec.num_key_value_heads, tp_size)
    shape = kv_cache_shape(num_blocks, block_size, kv_heads, spec.head_dim)
    device = torch.device(device)
    layers = spec.num_hidden_layers if num_layers is None else num_layers
    caches = [_zeroed(shape, dtype, device) for _ in range(layers)]
    if device.type == "cpu":
        for cache in caches:
            cache.zero_()   # commit every page now (see `_zeroed`)
    return caches


def _zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor. On CPU it lives in an anonymous private mapping advised for transparent
    huge pages (`sluice.model.host_memory`): the attention kernels sweep scattered blocks ~1.5x
    faster in 2 MiB pages. `allocate_kv_caches` touches every page at startup (~0.3 s per GiB
    here), as vLLM's CPU backend does: the memory an operator configures is resident from the
    first request on, so the server's RSS does not creep up under load as blocks are first
    used (issue 12: +0.5 GiB over a soak with a 1.5 GiB cache touched lazily), and no decode
    step pays page faults (~15 ms/step on W1 when nothing was pre-touched)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    buffer = huge_page_buffer(nbytes)
    return buffer.view(dtype).view(shape)
