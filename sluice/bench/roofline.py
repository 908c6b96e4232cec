"""The fp32 compute roofline of a throughput run: useful FLOPs / measured GEMM peak.

A run's roofline time is the time it would take if every FLOP the model must do ran at the
machine's dense fp32 GEMM rate:

    roofline_s           = total_flops / (peak_gflops * 1e9)
    fraction_of_roofline = roofline_s / elapsed_s          (1.0 = as fast as dense GEMM allows)

`peak_gflops` is measured here (`measure_gemm_peak`: the faster of `torch.mm` and oneDNN's
packed-weight linear on square fp32 matrices, same thread count as the engine), and
`total_flops` is counted from the model's shapes and the workload's lengths
(`workload_flops`). FLOPs are counted as 2 per multiply-add and are the
*useful* work of a greedy run: no padding, no recomputation, no norms/activations/rotary
(elementwise, negligible next to the GEMMs). Only `measure_gemm_peak` imports torch (lazily);
the counting is plain arithmetic.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sluice.hf_config import ModelSpec

DEFAULT_GEMM_SIZE = 2048
DEFAULT_GEMM_REPEATS = 5


def measure_gemm_peak(num_threads: int | None = None, size: int = DEFAULT_GEMM_SIZE,
                      repeats: int = DEFAULT_GEMM_REPEATS) -> float:
    """GFLOP/s of the fastest fp32 GEMM of two `size x size` CPU matrices this torch offers:
    `torch.mm` (MKL on x86) and, where torch has oneDNN, oneDNN's linear on a pre-packed
    weight (what sluice's layers run; on AMD CPUs it beats MKL by ~15 %). 2 * size^3 FLOPs
    divided by the best (shortest) of `repeats` timed calls of each, after one untimed warm-up.

    `num_threads`: torch's intra-op threads during the measurement (None: leave torch's
    current setting); the previous setting is restored afterwards.
    """
    import torch

    from sluice.model.layers.layer_ops import onednn_linear, packed_weight
    if size < 1 or repeats < 1:
        raise ValueError(f"size and repeats must be >= 1, got size={size}, repeats={repeats}")
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, dtype=torch.float32, generator=gen)
        b = torch.randn(size, size, dtype=torch.float32, generator=gen)
        out = torch.empty(size, size, dtype=torch.float32)
        candidates = [lambda: torch.mm(a, b, out=out)]
        packed = packed_weight(b, rows_hint=size)  # a @ b.T: the same FLOPs as a @ b
        if packed is not None:
            candidates.append(lambda: onednn_linear(a, packed))
        best = float("inf")
        with torch.inference_mode():
            for gemm in candidates:
                gemm()  # warm-up: thread pool start, page faults, kernel selection
                for _ in range(repeats):
                    start = time.perf_counter()
                    gemm()
                    best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return 2.0 * size ** 3 / max(best, 1e-12) / 1e9


def linear_weights_per_layer(spec: ModelSpec) -> int:
    """Weights of one decoder layer's q, k, v, o, gate, up and down projections (no biases):

        q: hidden * heads * head_dim          o: heads * head_dim * hidden
        k, v: hidden * kv_heads * head_dim    gate, up, down: hidden * intermediate each
    """
    h, d = spec.hidden_size, spec.head_dim
    attn = 2 * h * spec.num_attention_heads * d + 2 * h * spec.num_key_value_heads * d
    mlp = 3 * h * spec.intermediate_size
    return attn + mlp


def workload_flops(spec: ModelSpec, prompt_lens: Sequence[int],
                   output_lens: Sequence[int]) -> dict[str, float]:
    """FLOPs (2 per multiply-add) of a greedy run that prefills every prompt once and then
    decodes `output_len - 1` more tokens per request (the first output token comes from the
    prefill's last position). With P = prompt_len, O = output_len, L = layers, and
    T = P + O - 1 the tokens a request pushes through the layers (positions 0 .. T-1):

        linear    = 2 * L * linear_weights_per_layer * sum(T)        (LM head excluded)
        lm_head   = 2 * vocab * hidden * sum(O)          (only rows that produce a token)
        attention = 4 * heads * head_dim * L * sum(T * (T + 1) / 2)

    Attention: a token at position p attends to p + 1 keys, and QK^T plus PV cost
    2 * heads * head_dim * (p + 1) each per layer; summing p + 1 over p = 0 .. T-1 gives
    T(T+1)/2. Returns {"linear", "lm_head", "attention", "total"} as floats.
    """
    if len(prompt_lens) != len(output_lens):
        raise ValueError(f"{len(prompt_lens)} prompt lengths but {len(output_lens)} output "
                         "lengths")
    if any(p < 1 for p in prompt_lens) or any(o < 1 for o in output_lens):
        raise ValueError("every prompt_len and output_len must be >= 1")
    layers = spec.num_hidden_layers
    processed = [p + o - 1 for p, o in zip(prompt_lens, output_lens)]
    linear = 2 * layers * linear_weights_per_layer(spec) * sum(processed)
    lm_head = 2 * spec.vocab_size * spec.hidden_size * sum(output_lens)
    attention = (4 * spec.num_attention_heads * spec.head_dim * layers
                 * sum(t * (t + 1) // 2 for t in processed))
    return {"linear": float(linear), "lm_head": float(lm_head), "attention": float(attention),
            "total": float(linear + lm_head + attention)}


def roofline_report(total_flops: float, elapsed_s: float, peak_gflops: float) -> dict[str, Any]:
    """How close a run of `total_flops` in `elapsed_s` came to the GEMM peak:

        roofline_s           = total_flops / (peak_gflops * 1e9)
        achieved_gflops      = total_flops / elapsed_s / 1e9
        fraction_of_roofline = roofline_s / elapsed_s  (= achieved_gflops / peak_gflops)
    """
    if elapsed_s <= 0 or peak_gflops <= 0:
        raise ValueError(f"elapsed_s and peak_gflops must be > 0, got {elapsed_s}, "
                         f"{peak_gflops}")
    roofline_s = total_flops / (peak_gflops * 1e9)
    return {"total_flops": float(total_flops), "elapsed_s": float(elapsed_s),
            "peak_gflops": float(peak_gflops), "roofline_s": roofline_s,
            "achieved_gflops": total_flops / elapsed_s / 1e9,
            "fraction_of_roofline": roofline_s / elapsed_s}


def format_roofline_line(backend: str, report: dict[str, Any], gemm_size: int,
                         num_threads: int) -> str:
    """One printed line, e.g. `[sluice] Roofline: 1185.3 GFLOP in 12.27 s = 96.6 GFLOP/s;
    fp32 GEMM peak 147.2 GFLOP/s (best GEMM 2048^3, 2 threads) -> 65.7% of roofline`."""
    return (f"[{backend}] Roofline: {report['total_flops'] / 1e9:.1f} GFLOP in "
            f"{report['elapsed_s']:.2f} s = {report['achieved_gflops']:.1f} GFLOP/s; "
            f"fp32 GEMM peak {report['peak_gflops']:.1f} GFLOP/s (best GEMM {gemm_size}^3, "
            f"{num_threads} thread{'s' if num_threads != 1 else ''}) -> "
            f"{100 * report['fraction_of_roofline']:.1f}% of roofline")
