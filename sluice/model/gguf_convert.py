"""Exact conversions of GGUF blocks into a type with faster kernels on this CPU.

A Q5_0 value is d * (q - 16) with q - 16 in [-16, 15] and d the block's fp16 scale: the same
block as Q8_0 (d and 32 int8 values q - 16) decodes to the same 32 floats, bit for bit. On a CPU
with AVX512-VNNI, Q8_0 layers with int8 activations run csrc/vnni_linear.cpp's vpdpbusd kernel
at every row count (prefill and batched decode too), where Q5_0 layers dequantize panels into
an fp32 tile for sgemm beyond 8 rows: `gguf_quant.keep_gguf_blocks` loads Q5_0 linear layers as
Q8_0 there (8.5 bits per weight instead of 5.5), and nowhere else (`--quantization gguf` keeps
the file's types).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Q5_0_BYTES, Q8_0_BYTES = 22, 34   # per 32-value block


def q5_0_as_q8_0(blocks: np.ndarray) -> np.ndarray:
    """uint8 Q5_0 rows [n, nb * 22] -> uint8 Q8_0 rows [n, nb * 34] of the same values:
    block = d (fp16) | qh (uint32, little-endian: bit i is value i's fifth bit) | qs[16] (value
    i < 16 in the low nibble of byte i, value i + 16 in the high one); q_i - 16 as int8."""
    n = blocks.shape[0]
    b = blocks.reshape(n, -1, Q5_0_BYTES)
    qh = b[..., 2:6].astype(np.uint32)
    bits = qh[..., 0] | qh[..., 1] << 8 | qh[..., 2] << 16 | qh[..., 3] << 24
    fifth = (bits[..., None] >> np.arange(32, dtype=np.uint32)) & 1          # [n, nb, 32]
    qs = b[..., 6:22]
    nibbles = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.int16)  # values 0..31
    values = (nibbles | (fifth.astype(np.int16) << 4)) - 16
    out = np.empty((n, b.shape[1], Q8_0_BYTES), dtype=np.uint8)
    out[..., :2] = b[..., :2]
    out[..., 2:] = values.astype(np.int8).view(np.uint8)
    return out.reshape(n, -1)


#: (file type, the type its blocks become where the VNNI int8 kernel runs) -> the conversion
CONVERTERS: dict[tuple[str, str], Callable[[np.ndarray], np.ndarray]] = {
    ("Q5_0", "Q8_0"): q5_0_as_q8_0}
EXACT_VNNI_CONVERSIONS = {src: dst for src, dst in CONVERTERS}   # file type -> loaded as


def convert_blocks(blocks: np.ndarray, src: str, dst: str) -> np.ndarray:
    """`blocks` of GGML type `src` as type `dst` (a pair of CONVERTERS)."""
    return CONVERTERS[src, dst](blocks)
