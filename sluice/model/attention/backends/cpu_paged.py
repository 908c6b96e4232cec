"""The CPU paged backend: C++/OpenMP kernels that read keys and values in place from the
block-structured cache (float32, bfloat16, float16 or fp8, `KERNEL_CACHE_DTYPES`; float32
queries). Decode groups run `paged_decode_attention`; all multi-token requests of a step
(whole prompts and chunks after earlier context) run one `paged_prefill_attention` call,
without the padding and gather of the torch path (over a bf16 cache with bf16 products where
the CPU has AVX512-BF16: `BF16_PRODUCT_CACHE_DTYPES`). Cache writes are the torch backend's, which
stays the test oracle.

The kernels (`sluice/model/csrc/paged_*.cpp`) are part of the CPU operator module that `pip
install` builds and `sluice.model.cpu_ops.load_cpu_ops` loads (or builds for this machine where
the prebuilt one cannot run). If there is none (no C++ compiler), the backend factory falls
back to the torch backend.
"""

from __future__ import annotations

from types import ModuleType

import torch

from sluice.model import cpu_ops
from sluice.model.attention.backends.torch_paged import (TorchPagedBackend, place_rows,
                                                        take_tokens, write_kv)
from sluice.model.attention.kv_cache import FP8_KV_DTYPES
from sluice.model.attention.metadata import AttentionMetadata, DecodeGroup


#: the cache dtypes the kernels read (a bf16, fp16 or fp8 row is widened to float32 as it is
#: read, exactly; the arithmetic is float32 with float32 queries, except below); others take
#: the torch backend
KERNEL_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, *FP8_KV_DTYPES)
#: the cache dtypes whose prefill attention multiplies in bf16 (q and the softmax weights
#: rounded to bf16, float32 sums: `prefill_bf16dot.cpp`) where the CPU has AVX512-BF16 and the
#: head dim is a multiple of 32: the bf16 cache (a bf16 model's, or --kv-cache-dtype bfloat16),
#: whose keys and values already hold bf16's precision. Decode attention stays float32 (it
#: waits on memory, not on its products).
BF16_PRODUCT_CACHE_DTYPES = (torch.bfloat16,)


class CpuPagedBackend(TorchPagedBackend):
    name = "cpu_paged"

    def __init__(self, kernel: ModuleType) -> None:
        super().__init__()
        self.kernel = kernel

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """A step with multi-token requests: one prefill kernel call for all of them (no
        padding, no gather), then the decode groups. Decode-only steps: as the torch
        backend, whose `_decode` is the decode kernel here."""
        if metadata.max_query_len <= 1 or not self.supports(q, kv_cache) \
                or q.stride(1) != q.shape[2] or q.stride(2) != 1:
            return super().forward(q, k, v, kv_cache, metadata, scale)
        write_kv(kv_cache, metadata.slot_mapping, k, v)
        out = torch.empty(q.shape, dtype=q.dtype)
        self.kernel.paged_prefill_attention(out, q, kv_cache, metadata.block_table,
                                            metadata.query_start_loc, metadata.seq_lens, scale,
                                            kv_cache.dtype in BF16_PRODUCT_CACHE_DTYPES)
        for dec in metadata.decode:
            place_rows(out, dec.token_sel, self._decode(q, kv_cache, dec, scale))
        return out

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, dec: DecodeGroup,
                scale: float) -> torch.Tensor:
        """[Nd, H, D] attention output of one decode group, straight from the paged cache."""
        if not self.supports(q, kv_cache):
            return super()._decode(q, kv_cache, dec, scale)
        qd = take_tokens(q, dec.token_sel).contiguous()
        out = torch.empty_like(qd)
        self.kernel.paged_decode_attention(out, qd, kv_cache, dec.block_ids, dec.num_blocks,
                                           dec.seq_lens, scale)
        return out

    def supports(self, q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        return q.dtype == torch.float32 and kv_cache.dtype in KERNEL_CACHE_DTYPES and \
            kv_cache.device.type == "cpu" and kv_cache.is_contiguous()


def make_cpu_paged_backend() -> TorchPagedBackend:
    """The kernel-backed backend, or the torch backend when the kernel cannot be built."""
    kernel = cpu_ops.load_cpu_ops()
    return CpuPagedBackend(kernel) if kernel is not None else TorchPagedBackend()
