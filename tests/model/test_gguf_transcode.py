"""`sluice.model.gguf_transcode`: GGUF low-bit types re-encoded exactly as kernel block types.

The target blocks are decoded by the test's own transcription of ggml's C decoders
(`reference_dequantize`, Q2_K / Q5_K / Q6_K) or gguf-py (Q4_0 / Q5_0) and must equal gguf-py's
decoding of the source blocks (the transcription of ggml's for Q1_0) bit for bit; scales the
target's fp16 field cannot hold give no target (the loader then keeps the Q8_0
requantization)."""

from __future__ import annotations

import numpy as np
import pytest

from _gguf_helpers import random_dequantized_type_blocks, reference_dequantize
from sluice.model.gguf_transcode import TRANSCODE_TARGETS, target_type, transcode


def _decode(qtype: str, blocks: np.ndarray) -> np.ndarray:
    """gguf-py's decoding (the test's transcription of ggml's for Q1_0, which gguf-py lacks)."""
    import gguf
    from gguf.quants import dequantize
    if qtype == "Q1_0":
        return reference_dequantize(qtype, blocks)
    return np.asarray(dequantize(blocks, gguf.GGMLQuantizationType[qtype]), np.float32)


def _blocks(qtype: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blocks = random_dequantized_type_blocks(qtype, n, rng)
    if qtype == "IQ3_XXS":   # d / 2 must be a normal fp16 for every block (see test below)
        d = (rng.uniform(0.5, 1.5, n) * 1e-3).astype(np.float16)
        blocks[:, 0:2] = d.view(np.uint8).reshape(n, 2)
    blocks[3] = 0            # an all-zero block: d = 0
    return blocks


@pytest.mark.parametrize("source", sorted(TRANSCODE_TARGETS))
def test_transcoded_blocks_decode_to_the_same_values(source):
    from gguf.constants import GGML_QUANT_SIZES
    import gguf

    blocks = _blocks(source, 512)
    rows = 8
    target = target_type(source, blocks)
    assert target == TRANSCODE_TARGETS[source]
    out = transcode(source, blocks.reshape(rows, -1))
    assert out.dtype == np.uint8 and out.shape[0] == rows
    expected = _decode(source, blocks).reshape(-1)
    tblocks = out.reshape(-1, GGML_QUANT_SIZES[gguf.GGMLQuantizationType[target]][1])
    got = (_decode(target, tblocks) if target in ("Q4_0", "Q5_0")
           else reference_dequantize(target, tblocks)).reshape(-1)
    assert got.shape == expected.shape and np.array_equal(got, expected)
    assert np.abs(expected).max() > 0
    # fewer bytes than the Q8_0 requantization it replaces (34 bytes per 32 values)
    assert out.nbytes < expected.size // 32 * 34


def test_scales_the_target_cannot_hold_give_no_target():
    iq3_xxs = _blocks("IQ3_XXS", 64)
    iq3_xxs[5, 0:2] = np.array([3], np.uint16).view(np.uint8)   # d = 3 * 2^-24: d / 2 inexact
    assert target_type("IQ3_XXS", iq3_xxs) is None
    with pytest.raises(ValueError, match="no exact block type"):
        transcode("IQ3_XXS", iq3_xxs)
    iq3_xxs[5, 0:2] = np.array([2], np.uint16).view(np.uint8)   # 2 * 2^-24: d / 2 exact
    assert target_type("IQ3_XXS", iq3_xxs) == "Q6_K"
    iq3_s = _blocks("IQ3_S", 64)
    iq3_s[1, 0:2] = np.array([5000.0], np.float16).view(np.uint8)   # dmin = 16 d overflows
    assert target_type("IQ3_S", iq3_s) is None
    mxfp4 = _blocks("MXFP4", 64)
    mxfp4[2, 0] = 200                                               # 2^72: beyond fp16
    assert target_type("MXFP4", mxfp4) is None
    tq2 = _blocks("TQ2_0", 64)
    tq2[0, 64:66] = np.array([np.inf], np.float16).view(np.uint8)
    assert target_type("TQ2_0", tq2) is None
    for qtype in ("IQ2_XXS", "IQ2_S", "NVFP4", "Q4_0"):
        assert qtype not in TRANSCODE_TARGETS
        assert target_type(qtype, np.zeros(4096, np.uint8)) is None
