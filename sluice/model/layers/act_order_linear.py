"""Block weights over reordered inputs: GPTQ's activation order (`desc_act`) kept quantized.

A checkpoint quantized in activation order stores, per input k, the group g(k) whose scale
(and zero point) it uses (`g_idx`): W[n, k] = (q[n, k] - z[n, g(k)]) * s[n, g(k)], the groups
scattered over the inputs. Sorting the inputs by group makes each group a run: with

    order = the inputs sorted by g (stable),    W'[:, i] = W[:, order[i]],

y = x @ W.T = x[:, order] @ W'.T, and W' is an ordinary grouped weight whose 32-value blocks
each lie in one group when every group holds the same multiple of 32 inputs (GPTQ's groups do).
`sluice.model.quantized_checkpoint` stores W' as GGUF blocks and the layer's `input_order`
(int64 [in_features], a non-persistent buffer); `ActOrderBlockLinearMethod.apply` gathers the
activations' columns in that order first (one [M, in] copy per call) and runs the block
kernels of `GgufBlockLinearMethod`. vLLM's GPU kernels (exllama, marlin) reorder the same way.

Where the order cannot apply the layer is dequantized instead (`quantized_checkpoint`'s
`act_order_fits`): the parts of a fused layer (q/k/v, gate/up) with different orders, groups of
unequal size or not whole blocks, and a row-parallel shard under tensor parallelism (its inputs
are a slice of the original order, which the sorted weight's columns do not follow).

Fast paths compare methods by exact type (`FastPathSupport`): the fused decode stack lists
this method and gathers each projection's input in its `input_order` (csrc/decode_stack.cpp).
"""

from __future__ import annotations

import torch
from torch import nn

from sluice.model.layers.gguf_linear import GgufBlockLinearMethod


def input_order(groups: torch.Tensor) -> torch.Tensor:
    """int64 [in]: the inputs sorted by their group (stable; module doc)."""
    return torch.argsort(groups, stable=True)


class ActOrderBlockLinearMethod(GgufBlockLinearMethod):
    """`GgufBlockLinearMethod` over the weight W[:, order] with `layer.input_order` = order
    (module doc): x[..., order] @ blocks.T."""

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, *,
                       bias: bool, dtype: torch.dtype | None, weight_loader) -> None:
        super().create_weights(layer, in_features, out_features, bias=bias, dtype=dtype,
                               weight_loader=weight_loader)
        layer.register_buffer("input_order", torch.arange(in_features), persistent=False)

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        return super().apply(layer, x.index_select(-1, layer.input_order), bias)

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        """The layer's weight W as float32 [out, in], in the checkpoint's input order (the
        blocks, `stored_weight`, hold W[:, order])."""
        sorted_weight = self.stored_weight(layer)
        weight = torch.empty_like(sorted_weight)
        weight[:, layer.input_order.to(weight.device)] = sorted_weight
        return weight
