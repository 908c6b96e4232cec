"""The CPU paged backend: decode groups run a C++/OpenMP kernel that reads keys and values in
place from the block-structured cache; everything else (cache writes, prefill chunks) is the
pure-torch backend, which stays the test oracle.

The kernel (`csrc/paged_decode.cpp`) is compiled once per machine with torch's extension
tooling and cached (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions). If it cannot be
built (no C++ compiler), `load_kernel` returns None and the backend factory falls back to the
torch backend with one warning.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

import torch

from sluice.model.attention.backends.torch_paged import TorchPagedBackend, take_tokens
from sluice.model.attention.metadata import DecodeGroup

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"


@functools.cache
def load_kernel() -> ModuleType | None:
    """Build (first time) and import the decode kernel; None when it cannot be built."""
    try:
        from torch.utils.cpp_extension import load
        return load(name="sluice_paged_decode", sources=[str(_SOURCE)],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # compiler missing or failing: keep serving with the torch backend
        logger.warning("CPU paged-attention kernel unavailable (%s: %s); using the torch "
                       "backend.", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None


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
    kernel = load_kernel()
    return CpuPagedBackend(kernel) if kernel is not None else TorchPagedBackend()
