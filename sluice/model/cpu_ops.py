"""sluice's C++/OpenMP CPU operators (`sluice/model/csrc/`), built into one extension module.

    paged_decode_attention(out, q, kv_cache, block_ids, nb, seq_lens, scale)  (cpu_paged backend)
    paged_prefill_attention(out, q, kv_cache, block_table, query_start_loc, seq_lens, scale,
                            bf16_products=False)   (bf16 products over a bf16 cache: AVX512-BF16)
    tiled_linear(out, x, w, bias=None)                                        (linear layers)
    onednn_linear(x, packed, bias=None), onednn_rows(m)   (oneDNN GEMM, rows padded to a set)
    rms_norm, add_rms_norm, silu_and_mul, rotary          (fused elementwise ops of the layers)
    DecodeStack(...).forward(...)          (a decode step through all decoder layers in one call)
    greedy_screen(out, scores, x, w, w_norms, c, a)   (exact greedy tokens from a bf16 LM head)

`pip install` compiles the module (setup.py), once per CPU variant (x86-64-v3 for AVX2,
x86-64-v4 for AVX-512: `sluice.platform.cpu_kernels`); `load_cpu_ops` imports the variant this
CPU runs. Where none is usable (a CPU without AVX2, a non-x86 CPU, a torch other than the one
the build used, edited sources, no prebuilt module) it says why in one warning and compiles the
module for this machine with torch's extension tooling (-march=native, about a minute on 2
cores, cached under TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions). When that fails
too (no C++ compiler) it logs one more warning and returns None, and every caller falls back
to its pure-torch path. `kernels_info()` says which build was loaded.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from sluice.platform import cpu_kernels

logger = logging.getLogger(__name__)

CSRC = cpu_kernels.CSRC
BUILD_NOTICE_S = 5.0  # a load slower than this was a compile: say so
JIT_NAME = "sluice_cpu_ops"
JIT_SOURCES = ("bindings.cpp", "kernels.cpp")  # kernels.cpp #includes the other .cpp files

_info: dict[str, Any] = {"source": None, "variant": None, "path": None, "reason": "not loaded"}


@functools.cache
def load_cpu_ops() -> ModuleType | None:
    """The operators (prebuilt, else built for this machine); None when they cannot be had."""
    module, info = _load()
    _info.clear()
    _info.update(info)
    return module


def kernels_info() -> dict[str, Any]:
    """How load_cpu_ops got its module: source ('prebuilt', 'jit', 'none'), variant (e.g.
    'x86_64_v3', or 'native' for the per-machine build), path of the module, reason."""
    return dict(_info)


def _load(directory: Path = cpu_kernels.MODULE_DIR,
          jit: Callable[[], ModuleType] | None = None) -> tuple[ModuleType | None, dict[str, Any]]:
    try:
        import torch
        variant, why = cpu_kernels.selected_variant()
        problem = None
        if variant is not None:
            path, problem = cpu_kernels.prebuilt_problem(variant, torch.__version__, directory)
            if problem is None:
                try:
                    module = _import_prebuilt(path)
                except Exception as e:  # an ABI or loader problem: build for this machine
                    problem = f"{path.name} does not import ({_first_line(e)})"
                else:
                    logger.debug("sluice CPU kernels: prebuilt %s (%s), %s", variant, why, path)
                    return module, {"source": "prebuilt", "variant": variant,
                                    "path": str(path), "reason": why}
    except Exception as e:  # reading the CPU or the build record failed: build here
        variant, problem = None, _first_line(e)
    if problem is not None:
        logger.warning("sluice's prebuilt CPU kernels (%s) are not usable: %s. Compiling them for "
                       "this machine instead (once; cached under TORCH_EXTENSIONS_DIR or "
                       "~/.cache/torch_extensions).", variant, problem)
        why = problem
    else:
        logger.info("sluice CPU kernels: %s; compiling them for this machine (once; cached "
                    "under TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions).", why)
    start = time.perf_counter()
    try:
        module = (jit or _jit_build)()
    except Exception as e:  # compiler missing or failing: keep serving with the torch paths
        logger.warning("sluice CPU kernels unavailable (%s); using the pure-torch paths.",
                       _first_line(e))
        return None, {"source": "none", "variant": None, "path": None, "reason": _first_line(e)}
    elapsed = time.perf_counter() - start
    if elapsed > BUILD_NOTICE_S:
        logger.info("Compiled sluice's CPU kernels in %.0f s (once per machine; cached under "
                    "TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions).", elapsed)
    return module, {"source": "jit", "variant": "native",
                    "path": getattr(module, "__file__", None), "reason": why}


def _import_prebuilt(path: Path) -> ModuleType:
    """Import a variant's module file. Every variant's init function is PyInit__cpu_ops."""
    import importlib.util
    from importlib.machinery import ExtensionFileLoader

    import torch  # noqa: F401  (the module links libtorch, which `import torch` loads)
    name = f"sluice.model.{cpu_kernels.INIT_NAME}"
    loader = ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[name] = module
    return module


def _jit_build() -> ModuleType:
    from torch.utils.cpp_extension import load
    return load(name=JIT_NAME, sources=[str(CSRC / s) for s in JIT_SOURCES],
                extra_cflags=[*cpu_kernels.COMMON_CFLAGS, "-march=native"],
                extra_ldflags=["-fopenmp"], verbose=False)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
