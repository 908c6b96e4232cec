"""The `Platform` contract: every device fact the engine needs, in one object.

Workers, the model runner and the memory profiler ask the platform (never `torch.cuda` directly)
for the device, the distributed backend, memory figures, dtype defaults, threads and the
attention backend. Implementations import torch inside methods so that importing this package
stays cheap and torch-free.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from sluice.errors import ConfigError

if TYPE_CHECKING:
    import torch

_DTYPE_NAMES = {"float32": "float32", "float": "float32", "fp32": "float32",
                "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "half": "float16", "fp16": "float16"}


def dtype_name(dtype: Any) -> str | None:
    """Normalize a dtype given as a string ('bfloat16', 'torch.float16', 'half') or a
    torch.dtype to one of 'float32', 'bfloat16', 'float16'; None for None/unknown."""
    if dtype is None:
        return None
    text = str(dtype).removeprefix("torch.").lower()
    return _DTYPE_NAMES.get(text)


def to_torch_dtype(name: str) -> "torch.dtype":
    """'float32' / 'bfloat16' / 'float16' (`dtype_name`'s) or a KV cache's 'fp8_e4m3' /
    'fp8_e5m2' → the torch dtype."""
    import torch
    return {"float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16, "fp8_e4m3": torch.float8_e4m3fn,
            "fp8_e5m2": torch.float8_e5m2}[name]


FP8_KV_CACHE_DTYPES = ("fp8_e4m3", "fp8_e5m2")
"""The fp8 `--kv-cache-dtype` values the config stores (vLLM's 'fp8' is stored as fp8_e4m3:
`config_sources.CHOICE_ALIASES`)."""


class Platform(ABC):
    """One device kind. `device_type` is the torch device type; `dist_backend` the
    process-group backend (gloo, nccl) for its ranks."""

    device_type: str = ""
    dist_backend: str = ""
    default_block_size: int = 16  # KV-cache tokens per block when --block-size is not given

    @abstractmethod
    def torch_device(self, index: int | None = None) -> "torch.device":
        """The torch device to place tensors on (`index` selects a GPU)."""

    @abstractmethod
    def device_name(self) -> str:
        """A human-readable name of the device, for logs."""

    @abstractmethod
    def total_memory_bytes(self) -> int:
        """Memory of the device this process may use, in bytes."""

    @abstractmethod
    def free_memory_bytes(self) -> int:
        """Memory of the device free right now, in bytes."""

    @abstractmethod
    def default_dtype(self, checkpoint_dtype: "str | torch.dtype | None") -> "torch.dtype":
        """The dtype `--dtype auto` means for a checkpoint stored in `checkpoint_dtype`."""

    def set_device(self, local_rank: int) -> None:
        """Make device `local_rank` (this rank's index on its machine) the process's current
        device, before the process group and the model are created (default: nothing to
        choose, e.g. the CPU)."""

    def prepare_worker_process(self) -> None:
        """Process-wide settings of a worker process, made once before its model loads
        (default: none)."""

    @abstractmethod
    def set_num_threads(self, num_threads: int | None) -> int:
        """Set torch's intra-op threads (None: the platform default); return the count used."""

    @abstractmethod
    def synchronize(self) -> None:
        """Wait for queued device work (for timing and memory profiling)."""

    def attention_backend_name(self, kernels: str = "auto") -> str:
        """The attention backend the model runner should build (`kernels`: DeviceConfig's
        'auto' or 'torch'; 'torch' always means the pure-torch reference backend)."""
        return "torch_paged"

    def layer_ops_name(self, kernels: str = "auto") -> str:
        """What computes the layers' GEMMs and elementwise ops ('torch' or 'cpu', see
        `sluice.model.layers.layer_ops`); same `kernels` rule."""
        return "torch"

    def resolve_dtype(self, config_dtype: str,
                      checkpoint_dtype: "str | torch.dtype | None") -> "torch.dtype":
        """`--dtype` (ModelConfig.dtype) → torch.dtype: 'auto' uses `default_dtype`."""
        if config_dtype == "auto":
            return self.default_dtype(checkpoint_dtype)
        name = dtype_name(config_dtype)
        if name is None:
            raise ConfigError(f"--dtype: {config_dtype!r} is not supported; allowed: auto, "
                              "float32, bfloat16, float16. Fix: pass one of them.")
        return to_torch_dtype(name)

    def resolve_kv_cache_dtype(self, kv_cache_dtype: str,
                               model_dtype: "torch.dtype") -> "torch.dtype":
        """`--kv-cache-dtype` (CacheConfig.kv_cache_dtype) → torch.dtype: 'auto' is the model's
        dtype. Any of float32/bfloat16/float16/fp8_e4m3/fp8_e5m2 works with any model dtype:
        the attention backends convert k/v into the cache's dtype when writing (fp8: scale 1,
        saturated) and back to the query's when reading, and their fast paths step aside for
        combinations they do not implement."""
        if kv_cache_dtype == "auto":
            return model_dtype
        name = kv_cache_dtype if kv_cache_dtype in FP8_KV_CACHE_DTYPES \
            else dtype_name(kv_cache_dtype)
        if name is None:
            raise ConfigError(f"--kv-cache-dtype: {kv_cache_dtype!r} is not supported; allowed: "
                              "auto, float32, bfloat16, float16, fp8, fp8_e4m3, fp8_e5m2. "
                              "Fix: pass one of them.")
        return to_torch_dtype(name)

    def memory_for_utilization(self) -> int:
        """The bytes `--gpu-memory-utilization` is a fraction of, read when the worker starts
        (before its weights load): the device's total memory, as vLLM means it."""
        return self.total_memory_bytes()

    def ineffective_options(self, config: Any) -> list[str]:
        """One log line per option set in `config` (an EngineConfig) that is accepted for
        vLLM compatibility but changes nothing on this device, saying why."""
        notes = []
        if config.device.enforce_eager:
            notes.append(f"--enforce-eager has no effect on {self.device_type}: sluice always "
                         "runs the model eagerly (it captures no CUDA graphs and does not "
                         "torch.compile), so there is nothing to turn off.")
        if config.cache.swap_space is not None:
            notes.append(f"--swap-space {config.cache.swap_space:g} has no effect on "
                         f"{self.device_type}: sluice preempts a request by freeing its KV "
                         "blocks and recomputing them when it resumes, never by swapping them "
                         "to CPU memory.")
        if config.model.trust_remote_code:
            notes.append("--trust-remote-code has no effect: sluice runs only its native "
                         "model architectures and never runs code from a model repository "
                         "(a model that needs remote code is refused).")
        return notes

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device_type={self.device_type!r})"
