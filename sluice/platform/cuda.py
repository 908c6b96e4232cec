"""The CUDA platform: nccl, the checkpoint's half-precision dtype by default, memory from
`torch.cuda.mem_get_info`. Imported only when CUDA is selected."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sluice.platform.interface import Platform, dtype_name

if TYPE_CHECKING:
    import torch


class CudaPlatform(Platform):
    """The current CUDA device (`torch.cuda.current_device()`, set per rank by the worker)."""

    device_type = "cuda"
    dist_backend = "nccl"

    def torch_device(self, index: int | None = None) -> "torch.device":
        import torch
        return torch.device("cuda", torch.cuda.current_device() if index is None else index)

    def set_device(self, local_rank: int) -> None:
        import torch
        torch.cuda.set_device(local_rank)

    def device_name(self) -> str:
        import torch
        return torch.cuda.get_device_name(torch.cuda.current_device())

    def total_memory_bytes(self) -> int:
        import torch
        return torch.cuda.mem_get_info()[1]

    def free_memory_bytes(self) -> int:
        import torch
        return torch.cuda.mem_get_info()[0]

    def default_dtype(self, checkpoint_dtype: "str | torch.dtype | None") -> "torch.dtype":
        """The checkpoint's bf16/fp16; float32 (or unknown) checkpoints run in bf16. bf16
        falls back to fp16 on GPUs without bf16 support (pre-Ampere)."""
        import torch
        bf16_ok = torch.cuda.is_bf16_supported()
        if dtype_name(checkpoint_dtype) == "float16" or not bf16_ok:
            return torch.float16
        return torch.bfloat16

    def set_num_threads(self, num_threads: int | None) -> int:
        """CPU threads for host-side ops; None leaves torch's default."""
        import torch
        if num_threads:
            torch.set_num_threads(num_threads)
        return torch.get_num_threads()

    def synchronize(self) -> None:
        import torch
        torch.cuda.synchronize()
