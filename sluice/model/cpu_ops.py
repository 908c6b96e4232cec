"""sluice's C++/OpenMP CPU operators (`sluice/model/csrc/`), built into one extension module.

    paged_decode_attention(out, q, kv_cache, block_ids, nb, seq_lens, scale)  (cpu_paged backend)
    paged_prefill_attention(out, q, kv_cache, block_table, query_start_loc, seq_lens, scale)
    tiled_linear(out, x, w, bias=None)                                        (linear layers)
    rms_norm, add_rms_norm, silu_and_mul, rotary          (fused elementwise ops of the layers)
    DecodeStack(...).forward(...)          (a decode step through all decoder layers in one call)
    greedy_screen(out, scores, x, w, w_norms, c, a)   (exact greedy tokens from a bf16 LM head)

The module is compiled once per machine with torch's extension tooling (~40 s on 2 cores) and
cached under TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions); a source change rebuilds
it. When it cannot be built (no C++ compiler), `load_cpu_ops` logs one warning and returns None,
and every caller falls back to its pure-torch path.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
BUILD_NOTICE_S = 5.0  # a load slower than this was a compile: say so
SOURCES = ("bindings.cpp", "decode_stack.cpp", "elementwise.cpp", "greedy_screen.cpp",
           "paged_decode.cpp", "paged_prefill.cpp", "tiled_linear.cpp")


@functools.cache
def load_cpu_ops() -> ModuleType | None:
    """Build (first time) and import the operators; None when they cannot be built."""
    start = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load
        module = load(name="sluice_cpu_ops", sources=[str(CSRC / s) for s in SOURCES],
                      extra_cflags=["-O3", "-march=native", "-fopenmp"],
                      extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # compiler missing or failing: keep serving with the torch paths
        logger.warning("sluice CPU kernels unavailable (%s: %s); using the pure-torch paths.",
                       type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return None
    elapsed = time.perf_counter() - start
    if elapsed > BUILD_NOTICE_S:
        logger.info("Compiled sluice's CPU kernels in %.0f s (once per machine; cached under "
                    "TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions).", elapsed)
    return module
