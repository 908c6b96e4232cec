"""Few-row bf16 products: oneDNN's GEMM on packed weights against the streaming kernels over
the plain weights, on one model's shapes, alternating, weights from memory. What sets
`kStreamedBf16Rows` / `kWidenedBf16Rows` (csrc/ops.h: up to how many rows `bf16_linear`
streams, on CPUs without AMX-BF16).

    python benchmarks/bf16_rows.py [--rows 1,2,3,4,8] [--rounds 5]

Each pass runs every layer's qkv, o, gate_up and down products and the LM head once, over
random bf16 weights of SmolLM2-135M's shapes (30 layers, hidden 576, intermediate 1536,
9 / 3 heads of 64, vocabulary 49,152: 269 MB, more than the last-level cache of the machines
this ran on): `onednn_bf16_linear` on `torch.ops.mkldnn._reorder_linear_weight` copies (what
`HalfWeightLinearMethod` packs), `gguf_linear` type BF16 (30) on the plain weights (the
widening GEMV), and `bf16_linear` (what the layers call: bf16_gemv.cpp's vdpbf16ps kernel up
to `streamed_bf16_rows()` rows where the CPU has AVX512-BF16 and no AMX, else one of the
others). Prints the median pass time of each and the ratios to oneDNN's per row count.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB = 576, 1536, 9, 3, 64, 30, 49152
GGML_BF16 = 30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,2,3,4,8")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    from sluice.model.cpu_ops import load_cpu_ops
    from sluice.model.layers.half_linear import packed_bf16_weight
    ops = load_cpu_ops()
    if ops is None:
        raise SystemExit("sluice's C++ operators are not built here")
    g = torch.Generator().manual_seed(0)
    qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    shapes = [(qkv, HIDDEN), (HIDDEN, HEADS * HEAD_DIM), (2 * INTERMEDIATE, HIDDEN),
              (HIDDEN, INTERMEDIATE)] * LAYERS + [(VOCAB, HIDDEN)]
    weights = [(torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16) for n, k in shapes]
    packed = [packed_bf16_weight(w) for w in weights]
    if any(w is None for w in packed):
        raise SystemExit("oneDNN does not pack bf16 weights here")
    x = {k: torch.randn(64, k, generator=g) for k in (HIDDEN, INTERMEDIATE)}

    def onednn(rows: int) -> None:   # a packed copy's K is its plain weight's
        for w, (_, k) in zip(packed, shapes):
            ops.onednn_bf16_linear(x[k][:rows], w, None)

    def widened(rows: int) -> None:
        for w, (n, k) in zip(weights, shapes):
            ops.gguf_linear(torch.empty(rows, n), x[k][:rows], w, GGML_BF16, None)

    def bf16_linear(rows: int) -> None:
        for w, p, (_, k) in zip(weights, packed, shapes):
            ops.bf16_linear(x[k][:rows], w, p, None)

    print(f"AMX-BF16: {ops.amx_bf16_available()}; vdpbf16ps kernel: "
          f"{ops.bf16_gemv_available()}; bf16_linear streams up to {ops.streamed_bf16_rows()} "
          "rows here")
    passes = {"oneDNN": onednn, "widened": widened, "bf16_linear": bf16_linear}
    for rows in (int(r) for r in a.rows.split(",")):
        times: dict[str, list[float]] = {name: [] for name in passes}
        for _ in range(a.rounds):
            for name, f in passes.items():
                t = time.perf_counter()
                f(rows)
                times[name].append((time.perf_counter() - t) * 1e3)
        med = {name: statistics.median(v) for name, v in times.items()}
        print(f"rows {rows:3d}: " + "   ".join(f"{name} {ms:7.2f} ms" for name, ms in med.items())
              + "   " + "  ".join(f"{name}/oneDNN {med[name] / med['oneDNN']:.2f}"
                                  for name in ("widened", "bf16_linear")))


if __name__ == "__main__":
    main()
