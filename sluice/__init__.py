"""sluice: an LLM inference and serving engine.

The public names are imported lazily so that `import sluice` stays fast and torch-free.
"""

from __future__ import annotations

import importlib
from typing import Any

from sluice.openmp_env import apply_openmp_defaults

__version__ = "0.1.0"

apply_openmp_defaults()   # before anything loads OpenMP (torch): see sluice.openmp_env

_LAZY = {
    "LLM": "sluice.frontend.llm",
    "AsyncLLM": "sluice.frontend.async_llm",
    "SamplingParams": "sluice.sampling_params",
    "RequestOutput": "sluice.outputs",
    "CompletionOutput": "sluice.outputs",
    "EngineConfig": "sluice.config",
}

__all__ = list(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sluice' has no attribute {name!r}")
