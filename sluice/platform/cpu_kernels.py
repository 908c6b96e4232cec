"""Which build of sluice's C++ CPU kernels (`sluice/model/csrc/`) this machine runs.

`pip install` compiles the kernels once per *variant* (setup.py), each a separate extension
module next to `sluice/model/cpu_ops.py`:

    x86_64_v4   -march=x86-64-v4   AVX-512 (F/BW/CD/DQ/VL), AVX-512-BF16 and AMX CPUs included
    x86_64_v3   -march=x86-64-v3   AVX2 + FMA (+ BMI1/2, F16C, LZCNT, MOVBE)

`choose_variant(flags)` picks the best one that the CPU's /proc/cpuinfo flags allow. The kernels
are portable GCC vector-extension C++ (no intrinsics, no `#ifdef __AVX512...`), so a variant is
the same sources under another -march; the bf16 code of greedy_screen.cpp widens bf16 with
integer shifts and needs no AVX-512-BF16 instructions (x86-64-v4 with -mavx512bf16 compiles to
the same machine code), hence no third variant. A CPU below x86-64-v3, or any non-x86 CPU,
gets no prebuilt variant: `load_cpu_ops` then compiles for it on first use, as before.

`_cpu_ops_build.json` beside the modules records what they were built from (torch version,
digest of the sources): a module built against another torch, or from other sources (an
edited checkout), is not loaded.

Standard library only: setup.py loads this file by path, before sluice is importable.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform as _pyplatform
from collections.abc import Iterable
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any

MODULE_DIR = Path(__file__).resolve().parent.parent / "model"
"""Where the prebuilt modules and their build record live (beside cpu_ops.py)."""
CSRC = MODULE_DIR / "csrc"
MODULE_PREFIX = "_cpu_ops_"
"""A variant's module is sluice.model._cpu_ops_<variant>."""
INIT_NAME = "_cpu_ops"
"""Every variant's PyInit function is PyInit__cpu_ops (bindings.cpp is compiled once)."""
BUILD_INFO = "_cpu_ops_build.json"

KERNEL_SOURCES = ("kernels.cpp",)
"""The kernels in one translation unit (it #includes the other .cpp files): compiled per variant."""
BINDINGS_SOURCES = ("bindings.cpp",)
"""The Python bindings, no hot code: compiled once and linked into every variant."""
ALL_SOURCES = ("bindings.cpp", "kernels.cpp", "amx_gemm.cpp", "decode_stack.cpp",
               "elementwise.cpp", "greedy_screen.cpp", "paged_decode.cpp", "paged_prefill.cpp",
               "quant_linear.cpp", "tiled_linear.cpp", "vnni_linear.cpp", "ops.h", "blas.h",
               "vec_math.h", "kv_rows.h", "bf16_rows.h", "fp16_rows.h", "fp8_rows.h", "act_quant.h",
               "gguf_codebook.h", "bf16_gemv.cpp", "prefill_tiles.h", "prefill_bf16dot.cpp")
"""Every file the build reads: their digest tells a stale prebuilt module."""

COMMON_CFLAGS = ("-O3", "-fopenmp", "-fvisibility=hidden")
BINDINGS_CFLAGS = ("-march=x86-64-v3",)
"""bindings.cpp is compiled once, for the lowest variant (every variant runs its code)."""

_X86_64_V2 = frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})
_X86_64_V3 = _X86_64_V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_X86_64_V4 = _X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}

VARIANTS: dict[str, dict[str, Any]] = {
    # best first: choose_variant takes the first whose required flags the CPU has
    "x86_64_v4": {"cflags": ("-march=x86-64-v4",), "requires": _X86_64_V4},
    "x86_64_v3": {"cflags": ("-march=x86-64-v3",), "requires": _X86_64_V3},
}
"""name -> cflags (besides COMMON_CFLAGS) and the /proc/cpuinfo flags its code may use."""

FORCE_ENV = "SLUICE_CPU_KERNELS"
"""Overrides the choice: a variant name (used only where the CPU has its flags), or 'jit' for
the per-machine build with -march=native (what a CPU without a prebuilt variant gets)."""


def is_x86_64(machine: str | None = None) -> bool:
    return (machine or _pyplatform.machine()).lower() in ("x86_64", "amd64")


def build_variants(machine: str | None = None) -> list[str]:
    """The variants that setup.py builds on this machine (none on non-x86 CPUs)."""
    return list(VARIANTS) if is_x86_64(machine) else []


def choose_variant(flags: Iterable[str], machine: str = "x86_64") -> str | None:
    """The best prebuilt variant for a CPU with these /proc/cpuinfo flags, None when none runs."""
    if not is_x86_64(machine):
        return None
    present = set(flags)
    for name, spec in VARIANTS.items():
        if spec["requires"] <= present:
            return name
    return None


def cpu_flags() -> set[str]:
    """This CPU's /proc/cpuinfo flags (empty where unavailable)."""
    from sluice.platform import host
    return set((host.cpuinfo().get("flags") or "").split())


def selected_variant(flags: Iterable[str] | None = None,
                     env: dict[str, str] | None = None) -> tuple[str | None, str]:
    """(variant to load, why): FORCE_ENV when set and runnable here, else choose_variant.
    None means: build for this machine on first use."""
    flags = cpu_flags() if flags is None else set(flags)
    forced = (os.environ if env is None else env).get(FORCE_ENV, "").strip()
    if forced == "jit":
        return None, f"{FORCE_ENV}=jit"
    chosen = choose_variant(flags, _pyplatform.machine())
    if forced:
        if forced not in VARIANTS:
            return chosen, f"{FORCE_ENV}={forced} is not a variant ({', '.join(VARIANTS)}, jit)"
        missing = VARIANTS[forced]["requires"] - flags
        if missing:
            lacks = " ".join(sorted(missing))
            return chosen, f"{FORCE_ENV}={forced} ignored: the CPU lacks {lacks}"
        return forced, f"{FORCE_ENV}={forced}"
    if chosen is None:
        why = ("no prebuilt kernels for this architecture" if not is_x86_64()
               else "the CPU lacks AVX2/FMA (x86-64-v3)")
        return None, why
    return chosen, "CPU flags"


def sources_digest(csrc: Path = CSRC) -> str:
    """sha256 over the kernel sources (names and contents)."""
    h = hashlib.sha256()
    for name in ALL_SOURCES:
        h.update(name.encode() + b"\0")
        h.update((csrc / name).read_bytes())
    return h.hexdigest()


def module_path(variant: str, directory: Path = MODULE_DIR) -> Path | None:
    """The variant's prebuilt extension module, if it is there."""
    for suffix in EXTENSION_SUFFIXES:
        path = directory / f"{MODULE_PREFIX}{variant}{suffix}"
        if path.is_file():
            return path
    return None


def read_build_info(directory: Path = MODULE_DIR) -> dict[str, Any] | None:
    try:
        return json.loads((directory / BUILD_INFO).read_text())
    except (OSError, ValueError):
        return None


def prebuilt_problem(variant: str, torch_version: str, directory: Path = MODULE_DIR,
                     csrc: Path = CSRC) -> tuple[Path | None, str | None]:
    """(module path, None) when the variant's prebuilt module may be loaded into this torch,
    else (path or None, why not). Reads files only; imports nothing."""
    info = read_build_info(directory)
    path = module_path(variant, directory)
    if path is None or info is None or variant not in info.get("variants", {}):
        return None, f"no prebuilt {variant} module in {directory} (built at install time)"
    built = info.get("torch")
    if built != torch_version:
        return path, f"built against torch {built}, running torch {torch_version}"
    try:
        if info.get("sources_sha256") != sources_digest(csrc):
            return path, (f"the sources in {csrc} changed since the build "
                          "(`pip install -e .` builds them again)")
    except OSError as e:
        return path, f"cannot read the sources ({e})"
    return path, None


def describe(torch_version: str | None) -> dict[str, Any]:
    """For `sluice env`: which variant this CPU takes and whether its prebuilt module is usable
    (without loading it)."""
    variant, why = selected_variant()
    out: dict[str, Any] = {"variant": variant, "reason": why, "prebuilt": None,
                           "built_with_torch": (read_build_info() or {}).get("torch"),
                           "usable": False, "problem": None}
    if variant is None:
        out["problem"] = why
    elif torch_version is None:
        out["problem"] = "torch does not import"
    else:
        path, problem = prebuilt_problem(variant, torch_version)
        out.update(prebuilt=str(path) if path else None, usable=problem is None, problem=problem)
    return out
