"""Decode attention alone: one W1-shaped decode step through every layer's paged KV cache.

    python benchmarks/decode_attention.py                   # bf16 cache, 30 layers
    python benchmarks/decode_attention.py --dtype float32 --layers 1
    python benchmarks/decode_attention.py --dtype fp8_e4m3     # --kv-cache-dtype fp8's cache
    python benchmarks/decode_attention.py --dtype float16      # a GGUF file's default cache

`--rows` requests (default 64, W1's batch) with 128..384 cached keys each (seeded), SmolLM2's
heads (9 query / 3 KV heads of 64 dims), `--block-size`-token blocks scattered over one cache
per layer (a random permutation of the blocks, as a long-running cache holds them), the cache
in transparent huge pages as the engine allocates it (`host_memory.huge_page_buffer`; with 4 KiB
pages, `--small-pages`, the same step ran ~1.2x slower here); one call of
the C++ `paged_decode_attention` per layer. Prints the best of `--repeats` steps and the rate
at which it read the step's keys and values. With `--layers 1` the cache stays in the last-level
cache (the kernel's arithmetic alone); with 30 it streams from memory, as in W1.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from sluice.model.cpu_ops import load_cpu_ops
from sluice.model.host_memory import huge_page_buffer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16",
                        choices=("bfloat16", "float16", "float32", "fp8_e4m3", "fp8_e5m2"))
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--small-pages", action="store_true",
                        help="allocate the cache in ordinary 4 KiB pages")
    args = parser.parse_args(argv)
    ops = load_cpu_ops()
    if ops is None:
        parser.error("sluice's CPU operators are not available here")
    torch.manual_seed(0)
    heads, kv_heads, dim, bs = 9, 3, 64, args.block_size
    lens = torch.randint(128, 385, (args.rows,), dtype=torch.int64)
    nb = int((lens.max() + bs - 1) // bs)
    blocks = args.layers * args.rows * nb
    dtype = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}.get(
        args.dtype) or getattr(torch, args.dtype)
    shape = (2, blocks, bs, kv_heads, dim)
    if args.small_pages:
        cache = torch.empty(shape, dtype=dtype)
    else:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        cache = huge_page_buffer(nbytes).view(dtype).view(shape)
    for part in cache.view(-1).split(1 << 24):   # torch has no uniform_ for fp8
        part.copy_(torch.empty(part.shape).uniform_(-0.5, 0.5))
    order = torch.randperm(blocks)
    tables = [order[i * args.rows * nb:(i + 1) * args.rows * nb].reshape(args.rows, nb)
              .contiguous() for i in range(args.layers)]
    q = torch.randn(args.rows, heads, dim)
    out = torch.empty_like(q)
    step_bytes = int(lens.sum()) * 2 * kv_heads * dim * cache.element_size() * args.layers

    def step() -> None:
        for table in tables:
            ops.paged_decode_attention(out, q, cache, table, nb, lens, dim ** -0.5)

    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    pages = "4 KiB pages" if args.small_pages else "huge pages"
    print(f"{args.dtype} cache ({pages}), {args.rows} rows x {args.layers} layers, "
          f"{bs}-token blocks: "
          f"{best * 1e3:.2f} ms per step, {step_bytes / best / 1e9:.1f} GB/s of keys and values")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
