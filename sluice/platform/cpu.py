"""The CPU platform: gloo, float32 by default, memory from psutil bounded by the cgroup limit,
threads from the process's affinity mask."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sluice.platform import host
from sluice.platform.interface import Platform

if TYPE_CHECKING:
    import torch


class CpuPlatform(Platform):
    """Tensors live in host RAM; `free_memory_bytes` is what this process can still allocate."""

    device_type = "cpu"
    dist_backend = "gloo"

    def torch_device(self, index: int | None = None) -> "torch.device":
        import torch
        return torch.device("cpu")

    def device_name(self) -> str:
        return host.cpu_model()

    def total_memory_bytes(self) -> int:
        return host.memory_bytes()[0]

    def free_memory_bytes(self) -> int:
        return host.memory_bytes()[1]

    def default_dtype(self, checkpoint_dtype: "str | torch.dtype | None") -> "torch.dtype":
        """float32 regardless of the checkpoint: bf16/fp16 matmuls are slow or inexact on
        most CPUs; pass --dtype bfloat16 explicitly on CPUs with AMX/avx512_bf16."""
        import torch
        return torch.float32

    def default_num_threads(self) -> int:
        """The CPUs in this process's affinity mask (what taskset/cpuset allow)."""
        return host.affinity_cpus()

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
