"""Greedy tokens of a bf16 LM head without float32 logits: `Bf16HeadArgmax`.

With `--dtype bfloat16` on a CPU with native bf16 products (`HalfWeightLinearMethod` holding
its oneDNN packed copy), the head's logits are oneDNN's bf16 GEMM result widened to float32
(`bf16_linear`: oneDNN's, or a streaming GEMV with its roundings). Widening is exact and keeps the order, so the argmax of that bf16 result
is the very token the sampler's argmax takes over the float32 logits (first maximum; a NaN
first): `Bf16HeadArgmax` computes it without writing and re-reading the float32 logits (64 rows
x a 49,152-token vocabulary: 12.6 MB per step). For inputs the C++ operators do not take it
returns None and the runner computes the logits.

Where it applies (`BF16_HEAD_ARGMAX_SUPPORT`): an LM head whose method is exactly
`HalfWeightLinearMethod` over bf16 weights, with the packed copy made, on one tensor-parallel
rank. It is installed in the head's `greedy` seam (`greedy.greedy_screen_for`), which the model
runner uses for plain greedy steps only.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from sluice.model.layers.half_linear import HalfWeightLinearMethod
from sluice.model.layers.layer_ops import fast_path_ok
from sluice.model.layers.linear_method import FastPathSupport

BF16_HEAD_ARGMAX_SUPPORT = FastPathSupport("bf16 head argmax",
                                           methods=(HalfWeightLinearMethod,),
                                           dtypes=(torch.bfloat16,), single_rank=True)


class Bf16HeadArgmax:
    """hidden [n, K] float32 -> the head's greedy token per row [n] int64, or None (module
    doc)."""

    def __init__(self, ops: ModuleType, head: nn.Module) -> None:
        self._ops = ops
        self._head = head

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor | None:
        x = hidden.contiguous()
        packed = self._head.__dict__.get("packed_weight")
        if packed is None or not fast_path_ok(x):
            return None
        logits = self._ops.bf16_linear(x, self._head.weight, packed, None, False)  # [n, V] bf16
        tokens = torch.empty(x.shape[0], dtype=torch.long)
        self._ops.argmax_rows_bf16(tokens, logits)
        return tokens


def bf16_head_argmax_for(head: nn.Module) -> Bf16HeadArgmax | None:
    """The argmax path for a loaded LM head, or None where it does not apply (module doc)."""
    method = head.__dict__.get("linear_method")
    if BF16_HEAD_ARGMAX_SUPPORT.unsupported(head) is not None or method.ops is None \
            or head.__dict__.get("packed_weight") is None:
        return None
    return Bf16HeadArgmax(method.ops, head)
