"""The CPU paged backend: decode groups run a C++/OpenMP kernel that reads keys and values in
place from the block-structured cache; everything else (cache writes, prefill chunks) is the
pure-torch backend, which stays the test oracle.

The kernel (`sluice/model/csrc/paged_decode.cpp`) is part of the CPU operator module that
`sluice.model.cpu_ops.load_cpu_ops` builds once per machine. If it cannot be built (no C++
compiler), the backend factory falls back to the torch backend.
"""

from __future__ import annotations

from types import ModuleType

import torch

from sluice.model import cpu_ops
from sluice.model.attention.backends.torch_paged import TorchPagedBackend, take_tokens
from sluice.model.attention.metadata import DecodeGroup


class CpuPagedBackend(TorchPagedBackend):
    name = "cpu_paged"

    def __init__(self, kernel: ModuleType) -> None:
        super().__init__()
        self.kernel = kernel

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
        return q.dtype == torch.float32 and kv_cache.dtype == torch.float32 and \
            kv_cache.device.type == "cpu" and kv_cache.is_contiguous()


def make_cpu_paged_backend() -> TorchPagedBackend:
    """The kernel-backed backend, or the torch backend when the kernel cannot be built."""
    kernel = cpu_ops.load_cpu_ops()
    return CpuPagedBackend(kernel) if kernel is not None else TorchPagedBackend()
