"""Exact conversions of GGUF blocks whose type has no kernels into one that has.

IQ4_NL (llama.cpp's non-linear 4-bit type, also the fallback of IQ4_XS files for rows that are
not whole 256-value blocks): a block of 32 values is an fp16 scale d and 16 bytes of nibbles,
value i = d * KVALUES_IQ4NL[nibble i] (value i < 16 in the low nibble of byte i, value i + 16 in
the high one). Every codebook entry is an integer in [-127, 113], so the Q8_0 block of d and the
32 int8 entries decodes to the same 32 floats, bit for bit: `gguf_quant.keep_gguf_blocks` loads
IQ4_NL linear weights (and embedding / LM head) as Q8_0 blocks (8.5 bits per weight instead of
4.5, and every Q8_0 kernel, int8 activations included), where the alternative is dequantizing
them to float at load.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

IQ4_NL_BYTES, Q8_0_BYTES = 18, 34   # per 32-value block
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89,
                          113], dtype=np.int8)
"""ggml-common.h `kvalues_iq4nl`."""

def iq4_nl_as_q8_0(blocks: np.ndarray) -> np.ndarray:
    """uint8 IQ4_NL rows [n, nb * 18] -> uint8 Q8_0 rows [n, nb * 34] of the same values
    (module doc)."""
    n = blocks.shape[0]
    b = blocks.reshape(n, -1, IQ4_NL_BYTES)
    qs = b[..., 2:]
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1)              # [n, nb, 32]
    out = np.empty((n, b.shape[1], Q8_0_BYTES), dtype=np.uint8)
    out[..., :2] = b[..., :2]
    out[..., 2:] = KVALUES_IQ4NL[codes].view(np.uint8)
    return out.reshape(n, -1)


CONVERTERS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "IQ4_NL": ("Q8_0", iq4_nl_as_q8_0)}
"""GGUF file type -> (the block type its blocks load as, the exact conversion)."""
LOAD_AS = {src: dst for src, (dst, _) in CONVERTERS.items()}


def convert_blocks(blocks: np.ndarray, src: str) -> np.ndarray:
    """`blocks` of GGUF type `src` (a key of CONVERTERS) as blocks of LOAD_AS[src]."""
    return CONVERTERS[src][1](blocks)
