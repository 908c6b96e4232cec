"""Exact re-encodings of GGUF block types sluice has no kernels for into types it has.

Several of llama.cpp's low-bit types (`DEQUANTIZED_TYPES`) store each weight as a small integer
times a per-(sub-)block scale, which a block type with sluice kernels can hold exactly, at more
bits per weight but far fewer than the Q8_0 requantization (8.5, and rounded) or float32. With
gguf-py's decodings (`gguf.quants`, the reference) and D the sub-block's scale:

| source (bits/w) | value                                   | target (bits/w) | target fields          |
|-----------------|-----------------------------------------|-----------------|------------------------|
| TQ1_0 (1.69), TQ2_0 (2.06) | d t, t in {-1, 0, 1}, per 256 | Q2_K (2.63)     | d, dmin = d, sc = m = 1, q = t + 1 |
| IQ3_S (3.44)    | d (1 + 2 s_j) g, g odd in [-15, 15], sub-block j of 32 | Q5_K (5.5) | d, dmin = 16 d, sc_j = m_j = 1 + 2 s_j, q = g + 16 |
| IQ3_XXS (3.06)  | d (0.5 + s_j) 0.5 g, g = +-{4, 12, .., 52, 62}, j of 32 | Q6_K (6.56) | d / 2, scale = 1 + 2 s_j, q = g / 2 + 32 |
| IQ1_S (1.56)    | d (2 s_j + 1)(g +- 1/8), g in {-1, 0, 1}, j of 32 | Q6_K | d / 8, scale = 2 s_j + 1, q = 8 g +- 1 + 32 |
| IQ1_M (1.75)    | the same with 16-value sub-blocks and IQ1_M's split fp16 d | Q6_K | as IQ1_S |
| MXFP4 (4.25)    | 2^(e - 128) k, k in [-12, 12], per 32   | Q5_0 (5.5)      | d = 2^(e - 128), q = k + 16 |
| Q1_0 (1.13)     | d t, t in {-1, 1}, per 128              | Q4_0 (4.5)      | d (per 32), q = t + 8 |

(IQ2_XXS / IQ2_XS / IQ2_S hold +-{8, 25, 43} times a scale with a factor 1/8: no kernel type fits
them; NVFP4's scales are fp8. Those stay with the Q8_0 requantization.)

Every product above is exact in float32, so the target's decoding is bit for bit the source's
where the target's fp16 scale fields hold d / 2, d / 8, 16 d or 2^(e - 128) exactly: a
per-tensor condition on the data (`target_type` checks every block's scale), else no target.
`transcode` derives the integers from gguf-py's decoding of the source (value / D, which is an
integer by the table), encodes the target blocks and checks, block by block, that gguf-py
decodes them to the source's values (an error otherwise: a bug, never a silent change).
"""

from __future__ import annotations

import numpy as np

TRANSCODE_TARGETS = {"TQ1_0": "Q2_K", "TQ2_0": "Q2_K", "IQ3_S": "Q5_K", "IQ3_XXS": "Q6_K",
                     "IQ1_S": "Q6_K", "IQ1_M": "Q6_K", "MXFP4": "Q5_0", "Q1_0": "Q4_0"}
"""Source GGUF type -> the kernel block type that holds its values exactly (module doc)."""

QK_K = 256


def _qtype(name: str):
    import gguf
    return gguf.GGMLQuantizationType[name]


def _block_bytes(name: str) -> tuple[int, int]:
    """(values, bytes) per block of GGUF type `name`."""
    from gguf.constants import GGML_QUANT_SIZES
    return GGML_QUANT_SIZES[_qtype(name)]


def _fp16_at(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte `at` of every block, as float32 [n]."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view(np.float16)[:, 0].astype(np.float32)


def _iq1m_d(blocks: np.ndarray) -> np.ndarray:
    """IQ1_M's fp16 d, spread over the top nibbles of its four uint16 scale words, as float32."""
    words = np.ascontiguousarray(blocks[:, 48:56]).view(np.uint16)
    bits = np.zeros(len(blocks), np.uint16)
    for i in range(4):
        bits |= (words[:, i] >> np.uint16(12)) << np.uint16(4 * i)
    return bits.view(np.float16).astype(np.float32)


def _mxfp4_d(blocks: np.ndarray) -> np.ndarray:
    """MXFP4's block scale 2^(e - 128) (gguf-py's e8m0_to_fp32_half) as float32 [n]; 0 for a
    block whose values are all zero (every 4-bit code 0 or 8), whatever its e (the quantizer
    writes e = 0, 2^-128, for those)."""
    from gguf.quants import MXFP4
    d = MXFP4.e8m0_to_fp32_half(np.ascontiguousarray(blocks[:, :1]))[:, 0]
    codes = blocks[:, 1:, None] >> np.array([0, 4], np.uint8)
    return np.where(((codes & 7) == 0).all(axis=(1, 2)), np.float32(0), d)


def _target_scale(source: str, blocks: np.ndarray) -> np.ndarray:
    """The float32 value the target's fp16 d field must hold exactly, per source block."""
    if source in ("TQ1_0", "TQ2_0"):
        return _fp16_at(blocks, _block_bytes(source)[1] - 2)
    if source == "Q1_0":
        return _fp16_at(blocks, 0)
    if source == "IQ3_S":
        return _fp16_at(blocks, 0)            # dmin = 16 d is checked as well
    if source == "IQ3_XXS":
        return _fp16_at(blocks, 0) / np.float32(2)
    if source == "IQ1_S":
        return _fp16_at(blocks, 0) / np.float32(8)
    if source == "IQ1_M":
        return _iq1m_d(blocks) / np.float32(8)
    if source == "MXFP4":
        return _mxfp4_d(blocks)
    raise ValueError(f"no exact block type for GGUF type {source}")


def _exact_fp16(x: np.ndarray) -> bool:
    with np.errstate(over="ignore"):
        back = x.astype(np.float16).astype(np.float32)
    return bool(np.isfinite(x).all() and np.array_equal(back, x))


def target_type(source: str, data: np.ndarray) -> str | None:
    """The block type that holds every value of a tensor of GGUF type `source` exactly (its
    raw bytes `data`, any shape of whole blocks), or None: no such type, or a block's scale
    that the target's fp16 field cannot hold (module doc). Reads only the scale fields."""
    if source not in TRANSCODE_TARGETS:
        return None
    blocks = np.asarray(data, np.uint8).reshape(-1, _block_bytes(source)[1])
    d = _target_scale(source, blocks)
    if not _exact_fp16(d) or (source == "IQ3_S" and not _exact_fp16(d * np.float32(16))):
        return None
    return TRANSCODE_TARGETS[source]


def _sub_block_scales(source: str, blocks: np.ndarray) -> np.ndarray:
    """The integer factor of each sub-block's scale (1 + 2 s, 2 s + 1; 1 for TQ / MXFP4),
    [n, sub-blocks per block]: 16-value sub-blocks for the Q6_K targets, 32 for IQ3_S."""
    n = len(blocks)
    if source == "IQ3_S":           # scales[k]: sub-blocks 2k (low nibble), 2k + 1 (high)
        s = blocks[:, 106:110, None] >> np.array([0, 4], np.uint8)
        return 1 + 2 * (s & 15).reshape(n, 8).astype(np.int32)
    if source == "IQ3_XXS":         # 8 uint32 after d and qs: s_j = word_j >> 28
        s = np.ascontiguousarray(blocks[:, 66:98]).view(np.uint32) >> np.uint32(28)
        return np.repeat(1 + 2 * s.astype(np.int32), 2, axis=1)
    if source == "IQ1_S":           # 8 uint16 qh after d and qs: s_j = (qh_j >> 12) & 7
        s = (np.ascontiguousarray(blocks[:, 34:50]).view(np.uint16) >> np.uint16(12)) & 7
        return np.repeat(2 * s.astype(np.int32) + 1, 2, axis=1)
    if source == "IQ1_M":           # 4 uint16 words, 3-bit scales at bits 0, 3, 6, 9
        w = np.ascontiguousarray(blocks[:, 48:56]).view(np.uint16)
        s = (w[:, :, None] >> np.array([0, 3, 6, 9], np.uint16)) & 7
        return 2 * s.reshape(n, 16).astype(np.int32) + 1
    return np.ones((n, 1), np.int32)


def _integers(values: np.ndarray, d: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """values [n, V] / (d [n] * factor [n, S]) per sub-block of V / S values, rounded: int32."""
    n, v = values.shape
    scale = (d[:, None] * factor).astype(np.float32)
    per = values.reshape(n, factor.shape[1], v // factor.shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale[:, :, None] == 0, 0, np.rint(per / scale[:, :, None]))
    return q.reshape(n, v).astype(np.int32)


def _pack_bits(q: np.ndarray, width: int, groups: int) -> np.ndarray:
    """q [n, groups * L] small unsigned ints -> [n, L] bytes: element g * L + c at bits
    width * g of byte c (the k-quants' 'plane' layout)."""
    n = len(q)
    planes = q.reshape(n, groups, -1).astype(np.uint8)
    out = np.zeros((n, planes.shape[2]), np.uint8)
    for g in range(groups):
        out |= planes[:, g] << np.uint8(width * g)
    return out


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def encode_q2_k(q: np.ndarray, sc: np.ndarray, m: np.ndarray, d: np.ndarray,
                dmin: np.ndarray) -> np.ndarray:
    """Q2_K blocks [n, 84]: value v = d sc_(v//16) q_v - dmin m_(v//16); q [n, 256] in 0..3,
    sc / m [n, 16] in 0..15, d / dmin [n] float32 (exact in fp16). Bytes: scales (sc | m << 4),
    then qs[32 i + c] holding q[128 i + 32 t + c] at bits 2t, then d, dmin."""
    scales = (sc | (m << 4)).astype(np.uint8)
    qs = np.concatenate([_pack_bits(q[:, 128 * i:128 * (i + 1)], 2, 4) for i in range(2)], 1)
    return np.concatenate([scales, qs, _f16_bytes(d), _f16_bytes(dmin)], 1)


def encode_q5_k(q: np.ndarray, sc: np.ndarray, m: np.ndarray, d: np.ndarray,
                dmin: np.ndarray) -> np.ndarray:
    """Q5_K blocks [n, 176]: value v = d sc_(v//32) q_v - dmin m_(v//32); q [n, 256] in 0..31,
    sc / m [n, 8] in 0..63. Bytes: d, dmin, 12 bytes of 6-bit scales and mins (Q4_K's packing:
    bytes 0-3 sc_0..3 | (sc_4..7 >> 4) << 6, 4-7 the same for m, 8-11 sc_4..7 & 15 |
    (m_4..7 & 15) << 4), qh (bit b of byte c: bit 4 of q[32 b + c]), qs (byte 32 i + c: the
    low nibbles of q[64 i + c] and q[64 i + 32 + c])."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    packed = np.concatenate([(sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
                             (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)], 1)
    qh = _pack_bits((q >> 4) & 1, 1, 8)
    qs = np.concatenate([_pack_bits(q[:, 64 * i:64 * (i + 1)] & 15, 4, 2) for i in range(4)], 1)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed, qh, qs], 1)


def encode_q6_k(q: np.ndarray, scales: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q6_K blocks [n, 210]: value v = d scales_(v//16) (q_v - 32); q [n, 256] in 0..63,
    scales [n, 16] int8. Bytes: ql (byte 64 h + e: the low nibbles of q[128 h + e] and
    q[128 h + 64 + e]), qh (byte 32 h + c: bits 4-5 of q[128 h + 32 t + c] at bits 2t), the
    int8 scales, d."""
    ql = np.concatenate([_pack_bits(q[:, 128 * h:128 * (h + 1)] & 15, 4, 2) for h in range(2)],
                        1)
    qh = np.concatenate([_pack_bits((q[:, 128 * h:128 * (h + 1)] >> 4) & 3, 2, 4)
                         for h in range(2)], 1)
    return np.concatenate([ql, qh, scales.astype(np.int8).view(np.uint8), _f16_bytes(d)], 1)


def encode_q5_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q5_0 blocks [n, 22]: value v = d (q_v - 16); q [n, 32] in 0..31. Bytes: d, qh (uint32,
    bit v: bit 4 of q_v), qs (byte j: the low nibbles of q_j and q_(j + 16))."""
    qh = ((((q >> 4) & 1).astype(np.uint32)) << np.arange(32, dtype=np.uint32)).sum(
        1, dtype=np.uint32)
    qs = _pack_bits(q & 15, 4, 2)
    return np.concatenate([_f16_bytes(d), qh.view(np.uint8).reshape(-1, 4), qs], 1)


def transcode(source: str, data: np.ndarray, target: str | None = None) -> np.ndarray:
    """The raw bytes `data` [rows, row bytes] of a tensor of GGUF type `source` re-encoded as
    blocks of `target` (the loader passes what `target_type` gave its plan; None: found here):
    [rows, target row bytes], decoding (gguf-py) to the same values bit for bit. Raises
    ValueError if they would not (no exact target, or scales the target cannot hold)."""
    import torch
    from gguf.quants import dequantize

    from sluice.model.gguf_weights import decode_blocks
    from sluice.model.quantized_checkpoint import to_blocks

    if target is None:
        target = target_type(source, data)
    if target is None or TRANSCODE_TARGETS.get(source) != target:
        raise ValueError(f"{source} blocks with these scales have no exact block type")
    rows = data.shape[0]
    blocks = np.ascontiguousarray(data, np.uint8).reshape(-1, _block_bytes(source)[1])
    values = np.asarray(decode_blocks(blocks, source), np.float32).reshape(len(blocks), -1)
    d = _target_scale(source, blocks)
    factor = _sub_block_scales(source, blocks)
    if target == "Q2_K":
        q = _integers(values, d, factor) + 1
        ones = np.ones((len(blocks), 16), np.int32)
        out = encode_q2_k(q, ones, ones, d, d)
    elif target == "Q5_K":
        q = _integers(values, d, factor) + 16
        out = encode_q5_k(q, factor, factor, d, d * np.float32(16))
    elif target == "Q6_K":
        q = _integers(values, d, factor) + 32
        out = encode_q6_k(q, factor, d)
    elif target == "Q4_0":   # Q1_0's 128-value blocks as four 32-value ones (q in {-1, 1})
        q = torch.from_numpy(_integers(values, d, factor))
        out = to_blocks(q, torch.from_numpy(d[:, None]), "Q4_0")[0].numpy()
    else:   # Q5_0: MXFP4's 32-value blocks
        q = _integers(values, d, factor) + 16
        out = encode_q5_0(q, d)
    decoded = np.asarray(dequantize(out, _qtype(target)), np.float32).reshape(values.shape)
    if not np.array_equal(decoded, values):
        bad = int(np.flatnonzero((decoded != values).any(1))[0])   # a source block
        raise ValueError(f"re-encoding {source} as {target} changes block {bad}")
    return out.reshape(rows, -1)
