"""Exact conversions of GGUF blocks whose type has no kernels into one that has.

Q3_K (llama.cpp's 3-bit k-quant, most of a Q3_K_S / Q3_K_M file) loads as the Q6_K blocks of
the same values. A Q3_K block of 256 values (110 bytes: hmask[32] | qs[64] | scales[12] | d)
has 16 sub-blocks of 16 values, each with a 6-bit scale sc_s, and value e = d * (sc_s - 32) *
(q_e - 4), q_e in 0..7 (two bits of qs, one of hmask). Q6_K (210 bytes: ql[128] | qh[64] |
scales[16] int8 | d) has the same 256 values in the same 16 sub-blocks, value e = d * sc6_s *
(q6_e - 32), q6_e in 0..63. With sc6_s = sc_s - 32 (in [-32, 31]: an int8) and q6_e = q_e + 28
both decoders compute (d * scale) * (q - offset) of the same numbers, bit for bit, so
`gguf_quant.keep_gguf_blocks` keeps Q3_K layers as Q6_K blocks (6.56 bits per weight where the
file has 3.44, and every Q6_K kernel, the packed int8 one included) where the alternative is
dequantizing them to float at load (32 bits).

Element e of a block (both types): half h = e // 128, j = (e % 128) // 32, l = e % 32, in
sub-block s = 8 h + 2 j + l // 16 (ggml-quants.c dequantize_row_q3_K / _q6_K):
    Q3_K: q_e = (qs[32 h + l] >> 2 j) & 3 | 4 * ((hmask[l] >> (4 h + j)) & 1),
          sc_s = (scales[s % 8] >> 4 (s // 8)) & 15 | ((scales[8 + s % 4] >> 2 (s // 4)) & 3) << 4
    Q6_K: ql[64 h + l + 32 (j % 2)] holds q6_e & 15 at bit 4 (j // 2), qh[32 h + l] holds
          q6_e >> 4 at bit 2 j, scales[s] = sc6_s.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Q3_K_BYTES, Q6_K_BYTES = 110, 210   # per 256-value block

_E = np.arange(256)
_H, _J, _L = _E // 128, (_E % 128) // 32, _E % 32
_S = np.arange(16)


def q3_k_as_q6_k(blocks: np.ndarray) -> np.ndarray:
    """uint8 Q3_K rows [n, nb * 110] -> uint8 Q6_K rows [n, nb * 210] of the same values
    (module doc)."""
    n = blocks.shape[0]
    b = blocks.reshape(-1, Q3_K_BYTES)
    hmask, qs, scales, d = b[:, :32], b[:, 32:96], b[:, 96:108], b[:, 108:110]
    q3 = (((qs[:, 32 * _H + _L] >> (2 * _J)) & 3)
          | (((hmask[:, _L] >> (4 * _H + _J)) & 1) << 2)).astype(np.uint8)
    sc = (((scales[:, _S % 8] >> (4 * (_S // 8))) & 15)
          | (((scales[:, 8 + _S % 4] >> (2 * (_S // 4))) & 3) << 4)).astype(np.int16)
    q6 = q3 + 28
    out = np.zeros((b.shape[0], Q6_K_BYTES), dtype=np.uint8)
    ql_at, qh_at = 64 * _H + _L + 32 * (_J % 2), 128 + 32 * _H + _L
    for e_set in (_J // 2 == 0, _J // 2 == 1):       # each ql byte takes two nibbles
        out[:, ql_at[e_set]] |= (q6[:, e_set] & 15) << (4 * (_J[e_set] // 2)).astype(np.uint8)
    for j in range(4):                                 # each qh byte takes four bit pairs
        at = _J == j
        out[:, qh_at[at]] |= ((q6[:, at] >> 4) << (2 * j)).astype(np.uint8)
    out[:, 192:208] = (sc - 32).astype(np.int8).view(np.uint8)
    out[:, 208:210] = d
    return out.reshape(n, -1)


CONVERTERS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "Q3_K": ("Q6_K", q3_k_as_q6_k)}
"""GGUF file type -> (the block type its blocks load as, the exact conversion)."""
LOAD_AS = {src: dst for src, (dst, _) in CONVERTERS.items()}


def convert_blocks(blocks: np.ndarray, src: str) -> np.ndarray:
    """`blocks` of GGUF type `src` (a key of CONVERTERS) as blocks of LOAD_AS[src]."""
    return CONVERTERS[src][1](blocks)
