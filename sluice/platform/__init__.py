"""Device facts behind one seam: `current_platform(device_config)` returns the `Platform` for
`--device` ('auto' → CUDA when `torch.cuda.is_available()`, else CPU).

    from sluice.platform import current_platform
    plat = current_platform(config.device)
    plat.set_num_threads(config.device.num_threads)
    device, dtype = plat.torch_device(), plat.resolve_dtype(config.model.dtype, spec.torch_dtype)

Importing this package does not import torch; CUDA code is imported only when CUDA is chosen.
"""

from __future__ import annotations

import functools

from sluice.config import DeviceConfig
from sluice.errors import ConfigError
from sluice.platform.interface import Platform, dtype_name

__all__ = ["Platform", "current_platform", "dtype_name"]


def current_platform(device: DeviceConfig | str | None = None) -> Platform:
    """The platform for a DeviceConfig or device name ('auto', 'cpu', 'cuda'); cached."""
    name = device.device if isinstance(device, DeviceConfig) else (device or "auto")
    return _platform_for(name)


@functools.cache
def _platform_for(name: str) -> Platform:
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device: {name!r} is not a known device; allowed: auto, cpu, "
                          "cuda. Fix: pass one of them.")
    if name == "cpu":
        from sluice.platform.cpu import CpuPlatform
        return CpuPlatform()
    import torch
    if torch.cuda.is_available():
        from sluice.platform.cuda import CudaPlatform
        return CudaPlatform()
    if name == "cuda":
        raise ConfigError(
            f"--device: 'cuda' was requested but no CUDA device is available (torch "
            f"{torch.__version__}, built with CUDA {torch.version.cuda}). Fix: pass --device cpu "
            "or --device auto, or install a CUDA build of torch on a machine with a GPU.")
    from sluice.platform.cpu import CpuPlatform
    return CpuPlatform()
