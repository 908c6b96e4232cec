"""GGUF block kernels, one type at a time: the GGUF layout against the VNNI-packed one.

    python benchmarks/block_kernels.py                          # every type, [1536, 1024]
    python benchmarks/block_kernels.py --types Q4_K,Q6_K --n 4096 --k 4096 --rows 1,8,64

For each block type, one weight [n, k] of random blocks (random bits, fp16 scales set to small
positive values so every weight is finite) is multiplied with random activations of each row
count through `gguf_linear` with int8 activations: as stored (`gguf` column: quant_linear.cpp's
decode kernels up to 8 rows, panels dequantized into an fp32 tile for sgemm beyond) and
regrouped by `vnni_pack` (`vnni` column: vnni_linear.cpp's int8 kernel at every row count,
vpdpbusd on AVX512-VNNI, its AVX2 form elsewhere; `SLUICE_CPU_KERNELS=x86_64_v3` runs that
build on any x86 CPU with AVX2). Each round times both layouts alternately (the
median call time of `--calls` calls after one warm-up call); the table shows the medians over
`--rounds` rounds and their ratio. Weights this small stay in the last-level cache: a model's
decode steps stream theirs from memory (compare_latency.py measures those).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from sluice.model.cpu_ops import load_cpu_ops
from sluice.model.layers.gguf_linear import (BLOCK_TYPES, INT8_ACTIVATIONS_FLAG,
                                             VNNI_PACKED_FLAG)

SCALE_OFFSETS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
                 "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0],
                 "IQ4_XS": [0]}
"""Byte offsets of each type's fp16 scales (d, then m / dmin) in a block."""


def random_blocks(qtype: str, n: int, k: int, rng: np.random.Generator) -> torch.Tensor:
    """uint8 [n, row bytes] of valid random `qtype` blocks (module doc)."""
    block = BLOCK_TYPES[qtype]
    count = n * k // block.block_elems
    blocks = rng.integers(0, 256, size=(count, block.block_bytes), dtype=np.uint8)
    for offset in SCALE_OFFSETS[qtype]:
        scale = (rng.uniform(0.5, 1.5, size=count) * 1e-3).astype(np.float16)
        blocks[:, offset:offset + 2] = scale.view(np.uint8).reshape(count, 2)
    return torch.from_numpy(blocks.reshape(n, -1))


def call_time(ops, weight: torch.Tensor, flags: int, x: torch.Tensor, calls: int) -> float:
    """The median seconds of one `gguf_linear` call (after a warm-up call)."""
    out = torch.empty(x.shape[0], weight.shape[0])
    ops.gguf_linear(out, x, weight, flags, None)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        ops.gguf_linear(out, x, weight, flags, None)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default=",".join(BLOCK_TYPES))
    parser.add_argument("--n", type=int, default=1536, help="output channels (a multiple of 16)")
    parser.add_argument("--k", type=int, default=1024, help="input features (a multiple of 256)")
    parser.add_argument("--rows", default="1,8,64,256")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    ops = load_cpu_ops()
    if ops is None:
        parser.error("sluice's CPU operators are not available here")
    kernel = ops.packed_int8_kernel()
    vnni = bool(kernel)
    rows = [int(r) for r in args.rows.split(",")]
    rng = np.random.default_rng(0)
    print(f"[{args.n}, {args.k}] weights, int8 activations; packed kernel: {kernel or 'none'}")
    print(f"{'type':6} {'rows':>5} {'gguf us':>9} {'vnni us':>9} {'gguf/vnni':>9}")
    for qtype in args.types.split(","):
        block = BLOCK_TYPES[qtype]
        stored = random_blocks(qtype, args.n, args.k, rng)
        packed = stored.clone()
        if vnni:
            ops.vnni_pack(packed, block.ggml_id)
        flags = block.ggml_id | INT8_ACTIVATIONS_FLAG
        for m in rows:
            x = torch.randn(m, args.k)
            gguf, fast = [], []
            for _ in range(args.rounds):
                gguf.append(call_time(ops, stored, flags, x, args.calls))
                if vnni:
                    fast.append(call_time(ops, packed, flags | VNNI_PACKED_FLAG, x, args.calls))
            g = statistics.median(gguf) * 1e6
            v = statistics.median(fast) * 1e6 if vnni else float("nan")
            print(f"{qtype:6} {m:5d} {g:9.1f} {v:9.1f} {g / v:8.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
