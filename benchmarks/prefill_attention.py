"""Prefill attention alone: one fresh prompt's causal attention through a paged KV cache.

    python benchmarks/prefill_attention.py                          # 2048 tokens, float16 cache
    python benchmarks/prefill_attention.py --prompt-len 512 --dtype float32
    python benchmarks/prefill_attention.py --heads 8 --kv-heads 4   # the reference model's heads
    python benchmarks/prefill_attention.py --dtype bfloat16 --bf16-products

`--prompts` prompts of `--prompt-len` tokens each (one prefill step), SmolLM2's heads by default
(9 query / 3 KV heads of 64 dims), the keys and values already in the cache (as the model
writes them before attending), `--block-size`-token blocks in a random order; one call of the
C++ `paged_prefill_attention` per layer for `--layers` layers. Prints the best of `--repeats`
steps, per layer and in all, and the rate in GFLOP/s counting the causal half of QK^T and PV
(4 * D multiply-adds per visible query-key pair and head: 2 * 2 * D flops each).
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
    parser.add_argument("--dtype", default="float16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16-products", action="store_true",
                        help="bf16 products over a bfloat16 cache (what the engine runs where "
                             "the CPU has AVX512-BF16; else the float32 products run)")
    args = parser.parse_args(argv)
    ops = load_cpu_ops()
    if ops is None:
        parser.error("sluice's CPU operators are not available here")
    torch.manual_seed(0)
    n, p, bs = args.prompt_len, args.prompts, args.block_size
    heads, kv_heads, dim = args.heads, args.kv_heads, args.head_dim
    nb = -(-n // bs)
    blocks = p * nb + 1
    dtype = getattr(torch, args.dtype)
    shape = (2, blocks, bs, kv_heads, dim)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    caches = []
    for _ in range(args.layers):
        cache = huge_page_buffer(nbytes).view(dtype).view(shape)
        cache.copy_(torch.randn(shape))
        caches.append(cache)
    table = (torch.randperm(blocks - 1)[:p * nb] + 1).to(torch.int32).reshape(p, nb)
    q = torch.randn(p * n, heads, dim)
    out = torch.empty_like(q)
    qsl = torch.arange(0, (p + 1) * n, n, dtype=torch.int64)
    seq_lens = torch.full((p,), n, dtype=torch.int64)
    scale = dim ** -0.5
    best = math.inf
    for _ in range(args.repeats):
        start = time.perf_counter()
        for cache in caches:
            ops.paged_prefill_attention(out, q, cache, table, qsl, seq_lens, scale,
                                        args.bf16_products)
        best = min(best, time.perf_counter() - start)
    pairs = p * n * (n + 1) / 2
    flops = 4 * dim * pairs * heads * args.layers
    products = ("bf16" if args.bf16_products and args.dtype == "bfloat16"
                and n >= ops.prefill_bf16_min_queries()
                and ops.prefill_bf16_products_available(dim) else "float32")
    print(f"{args.dtype} cache, {products} products, {p} x {n} tokens, "
          f"{heads}/{kv_heads} heads of {dim}: "
          f"{best / args.layers * 1e3:.2f} ms per layer, {best * 1e3:.1f} ms for "
          f"{args.layers} layers, {flops / best / 1e9:.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
