"""sluice's decoding of the GGUF types it has no kernels for, and their exact re-encodings,
against llama.cpp's own C decoders, bit for bit.

    python benchmarks/llamacpp_decoders.py [--work-dir /tmp/sluice-peers] [--blocks 2048]

llama.cpp's quantizer cannot write most of these types without an importance matrix (and not
at all for SmolLM2's 576-wide rows in Q1_0), so no real file of them is at hand. Instead, for
each type, random valid blocks (`tests/model/_gguf_helpers.random_dequantized_type_blocks`:
random bits, block scales of weight-like size) are decoded by

* sluice (`gguf_weights.decode_blocks`: gguf-py, or sluice's own Q1_0 decoder) and
* llama.cpp (`dequantize_row_<type>` of the libggml-base.so in compare_peers.py's llama.cpp
  venv, called through ctypes),

and, where `gguf_transcode` re-encodes the type, its target blocks are decoded by llama.cpp's
decoder of the target type too. The types sluice keeps in their blocks (`BLOCK_TYPES`: Q4_0 ..
Q6_K, IQ4_NL, IQ4_XS) are checked the same way on `block_kernels.py`'s random blocks: gguf-py's
decoding is the reference sluice's kernels are tested against. Prints one line per type; exits
1 on any difference.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "model"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TYPES = ("Q1_0", "TQ1_0", "TQ2_0", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS",
         "IQ3_S", "MXFP4", "NVFP4")


def ggml_base(work_dir: Path) -> ctypes.CDLL:
    libs = sorted(work_dir.glob("llamacpp/lib/python3*/site-packages/llama_cpp/lib/"
                                "libggml-base.so"))
    if not libs:
        raise SystemExit(f"no llama.cpp under {work_dir} (python benchmarks/compare_peers.py "
                         "--setup --backends llama.cpp)")
    return ctypes.CDLL(str(libs[0]))


def llamacpp_decode(lib: ctypes.CDLL, qtype: str, blocks: np.ndarray) -> np.ndarray:
    """llama.cpp's dequantize_row_<qtype> of [n, block bytes] blocks, float32 [n * values]."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    values, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    blocks = np.ascontiguousarray(blocks, np.uint8).reshape(-1, nbytes)
    out = np.zeros(len(blocks) * values, np.float32)
    fn = getattr(lib, f"dequantize_row_{qtype.lower().replace('_k', '_K')}")
    fn(blocks.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p),
       ctypes.c_int64(out.size))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/sluice-peers"))
    p.add_argument("--blocks", type=int, default=2048)
    a = p.parse_args(argv)
    from _gguf_helpers import random_dequantized_type_blocks

    from sluice.model.gguf_transcode import TRANSCODE_TARGETS, target_type, transcode
    from sluice.model.gguf_weights import decode_blocks

    from block_kernels import random_blocks

    from sluice.model.layers.gguf_linear import BLOCK_TYPES, dequantize_blocks

    lib = ggml_base(a.work_dir)
    rng = np.random.default_rng(0)
    ok = True
    for qtype, block in BLOCK_TYPES.items():
        blocks = random_blocks(qtype, 16, a.blocks // 16 * block.block_elems, rng)
        same = np.array_equal(dequantize_blocks(blocks, qtype).numpy().ravel(),
                              llamacpp_decode(lib, qtype, blocks.numpy()))
        print(f"{qtype:8} (kept in its blocks) decoded as llama.cpp does: {same}", flush=True)
        ok &= same
    for qtype in TYPES:
        blocks = random_dequantized_type_blocks(qtype, a.blocks, rng)
        if qtype == "IQ3_XXS":   # scales whose d / 2 is an fp16, so that it re-encodes
            d = (rng.uniform(0.5, 1.5, a.blocks) * 1e-3).astype(np.float16)
            blocks[:, 0:2] = d.view(np.uint8).reshape(-1, 2)
        ref = llamacpp_decode(lib, qtype, blocks)
        same = np.array_equal(np.asarray(decode_blocks(blocks, qtype), np.float32).ravel(), ref)
        line = f"{qtype:8} decoded as llama.cpp does: {same}"
        ok &= same
        target = target_type(qtype, blocks) if qtype in TRANSCODE_TARGETS else None
        if target is not None:
            encoded = transcode(qtype, blocks.reshape(16, -1))
            same = np.array_equal(llamacpp_decode(lib, target, encoded), ref)
            line += f"; re-encoded as {target}, llama.cpp decodes the same values: {same}"
            ok &= same
        print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
