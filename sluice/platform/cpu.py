"""The CPU platform: gloo, float32 by default, memory from psutil bounded by the cgroup limit,
threads from the process's affinity mask, and glibc's malloc told to keep freed memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import TYPE_CHECKING, Any, Callable

from sluice.platform import host
from sluice.platform.interface import Platform, dtype_name

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MMAP_THRESHOLD = 1 << 30  # glibc allocations below this come from the heap (reused when freed)
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top kept before returning it
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's mallopt, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    except OSError:
        return None


def retain_freed_memory() -> bool:
    """Make glibc's malloc reuse freed activation buffers instead of handing them back to the
    kernel, which zero-fills them again on the next touch.

    By default glibc serves large allocations (above a dynamic threshold of at most 32 MiB)
    with fresh mappings and returns freed memory at the heap's top, so every step's
    activations are page-faulted anew: ~1 GB of faults in the first W1 run of the reference
    model, and prefill GEMMs ~10% slower than on reused buffers. With this, allocations up to
    MMAP_THRESHOLD come from the heap and up to TRIM_THRESHOLD of it stays, as with a caching
    allocator: the process keeps its peak activation memory. False (nothing changed) where
    the C library has no mallopt."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                                        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


class CpuPlatform(Platform):
    """Tensors live in host RAM; `free_memory_bytes` is what this process can still allocate."""

    device_type = "cpu"
    dist_backend = "gloo"
    # The decode kernel reads a request's keys block by block; blocks handed out during decode
    # are scattered, and 64-token blocks gave W1 ~3% more throughput than 16 (the hardware
    # prefetcher follows a 64 KiB block). vLLM's CPU backend defaults to 128.
    default_block_size = 64

    def torch_device(self, index: int | None = None) -> "torch.device":
        import torch
        return torch.device("cpu")

    def device_name(self) -> str:
        return host.cpu_model()

    def total_memory_bytes(self) -> int:
        return host.memory_bytes()[0]

    def free_memory_bytes(self) -> int:
        return host.memory_bytes()[1]

    def memory_for_utilization(self) -> int:
        """The RAM this process can still allocate when the worker starts (the machine's
        available memory, bounded by the cgroup limit): host RAM is shared with the rest of the
        system, so a fraction of its total could take memory other processes hold."""
        return self.free_memory_bytes()

    def ineffective_options(self, config: Any) -> list[str]:
        notes = super().ineffective_options(config)
        if config.cache.swap_space is not None:  # say why in CPU terms
            notes = [n for n in notes if not n.startswith("--swap-space")]
            notes.append(f"--swap-space {config.cache.swap_space:g} has no effect on cpu: the KV "
                         "cache already lives in host RAM, and sluice preempts a request by "
                         "freeing its blocks and recomputing them when it resumes.")
        return notes

    def default_dtype(self, checkpoint_dtype: "str | torch.dtype | None") -> "torch.dtype":
        """A bfloat16 checkpoint stays bfloat16 where the CPU multiplies bf16 natively (it
        reports AMX-BF16 or AVX-512-BF16 and torch's oneDNN takes bf16:
        `layer_ops.native_bf16_products`); everything else runs in float32 — float16 and float32
        checkpoints, and bf16 ones on CPUs without bf16 products, where the GEMMs would widen
        the weights to float32 anyway (`--dtype bfloat16` still halves their bytes there)."""
        import torch
        from sluice.model.layers.layer_ops import native_bf16_products
        if dtype_name(checkpoint_dtype) == "bfloat16" and native_bf16_products():
            return torch.bfloat16
        return torch.float32

    def default_num_threads(self) -> int:
        """The CPUs in this process's affinity mask (what taskset/cpuset allow)."""
        return host.affinity_cpus()

    def prepare_worker_process(self) -> None:
        if not retain_freed_memory():
            logger.debug("mallopt unavailable: freed activations go back to the kernel")

    def set_num_threads(self, num_threads: int | None) -> int:
        import torch
        torch.set_num_threads(num_threads or self.default_num_threads())
        return torch.get_num_threads()

    def synchronize(self) -> None:
        return None

    def attention_backend_name(self, kernels: str = "auto") -> str:
        """The C++ paged decode kernel (falls back to torch_paged if it cannot be built)."""
        return "cpu_paged" if kernels == "auto" else "torch_paged"

    def layer_ops_name(self, kernels: str = "auto") -> str:
        """sluice's C++ GEMM and fused elementwise ops (pure torch if they cannot be built)."""
        return "cpu" if kernels == "auto" else "torch"
