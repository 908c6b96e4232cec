"""LoRA on the linear layers: a `LinearMethod` that wraps the layer's base method.

    y = base.apply(layer, x, bias)                       (the base product, unchanged)
    y[rows of slot s] += (x[rows] @ A_s.T) @ B_s.T       (one shrink + one expand GEMM per slot)

Each wrapped layer holds its `max_loras` slots stacked (plain tensors on the layer, filled by
the worker's `LoRAWorkerManager`, counted by the model runner's memory accounting):

    layer.lora_a      [max_loras * stride, in_local]     A; slot s: rows [s*stride, s*stride + r_s)
    layer.lora_b      [max_loras * stride, out_local]    B.T; slot s: the same rows
    layer.lora_ranks  [max_loras] ints                   r_s (0: the slot's adapter, if any,
                                                         does not touch this layer)

with stride = (number of sub-projections) x max_lora_rank, the scaling folded into B and the
padding zero. The rows of each slot come from the step's `LoRAMapping`
(`sluice.lora.forward_context`): contiguous runs are used in place, otherwise the adapter rows
are gathered once per layer, each slot's segment runs its two GEMMs, and the deltas are
scatter-added back (`index_add_`); a decode-sized step with several segments runs the stacked
form instead (three ops for all adapters: shrink by every used slot, mask, expand). The Python
cost per layer is O(active slots) at most, never O(tokens).

Merged layers apply each sub-projection's adapter to its output slice by stacking: for
QKVLinear (subs q, k, v) and MergedColumnLinear (gate, up) slot s holds

    A = [A_q; A_k; A_v]                 [r_q + r_k + r_v, in]      one shrink for all subs
    B = block-diagonal                  [out_local, r_q + r_k + r_v]
        rows [q rows | k rows | v rows] x cols [r_q | r_k | r_v], zeros elsewhere

so one expand writes every slice (the zero blocks cost rank x out extra multiply-adds, a few
per cent of the base GEMM at rank 16; a sub the adapter does not target takes no columns).

Tensor parallelism (as the base weights split): column-parallel layers (q/k/v, gate/up) keep
A whole and this rank's rows of B (the same rows as the base weight, `QKVLinear._slice` /
`MergedColumnLinear._local_sizes`, KV-head replication included); row-parallel layers (o, down)
keep this rank's columns of A and all of B: the rank's delta B (A_r x_r) is added to its
partial product before the layer's all-reduce, which sums them to B (A x).

Fast paths: `LoRALinearMethod` is its own type. The fused decode stack lists it as a step
wrapper (`fused_decode.FUSED_DECODE_SUPPORT`): it stays installed and runs only decode steps in
which no token uses an adapter; any other step runs these layers. The LM head is never wrapped
(adapters on lm_head are refused), so its method and the greedy screen stay.

`wrap_lora_layers(model, max_loras, max_lora_rank)` is called by the model loader (before the
weights are loaded) when `--enable-lora`: it wraps the decoder projections and gives each a
`lora_target` (layer index, its HF sub-projections) and empty (zero) slots.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from sluice.lora.forward_context import current_lora_mapping
from sluice.model.layers.linear import (LinearBase, MergedColumnLinear, QKVLinear,
                                        RowParallelLinear)
from sluice.model.layers.linear_method import LinearMethod

#: our module name (suffix after `model.layers.N.`) -> its HF sub-projections, in row order
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "self_attn.o_proj": ("o_proj",),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"),
    "mlp.down_proj": ("down_proj",),
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

SlotWeights = tuple[torch.Tensor, torch.Tensor]   # (A [R, in_local], B [out_local, R])


class LoRALinearMethod(LinearMethod):
    """The base method's weights and product, plus the step's adapter deltas (module doc).
    Parameters, packing and planning are the base method's."""

    def __init__(self, base: LinearMethod) -> None:
        self.base = base

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, *,
                       bias: bool, dtype: torch.dtype | None, weight_loader) -> None:
        self.base.create_weights(layer, in_features, out_features, bias=bias, dtype=dtype,
                                 weight_loader=weight_loader)

    def plan(self, model: nn.Module) -> None:
        self.base.plan(model)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.base.process_weights_after_loading(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        out = self.base.apply(layer, x, bias)
        mapping = current_lora_mapping()
        if mapping is None:
            return out
        a, b, stride, ranks = layer.lora_a, layer.lora_b, layer.lora_stride, layer.lora_ranks
        x2 = x.reshape(-1, x.shape[-1])
        o2 = out.view(-1, out.shape[-1])
        if mapping.stacked:
            if not any(ranks[:mapping.num_slots]):
                return out
            n = mapping.num_slots * stride
            h = torch.mm(x2, a[:n].t())
            h.mul_(mapping.mask(stride, h.dtype))
            o2.addmm_(h, b[:n])
            return out
        live = [(slot * stride, ranks[slot], s, e) for slot, s, e in mapping.segments
                if ranks[slot]]
        if not live:
            return out
        if mapping.index is None:
            for col, r, s, e in live:
                o2[s:e].addmm_(torch.mm(x2[s:e], a[col:col + r].t()), b[col:col + r])
            return out
        xs = x2.index_select(0, mapping.index)
        delta = xs.new_zeros(xs.shape[0], o2.shape[1])
        for col, r, s, e in live:
            delta[s:e].addmm_(torch.mm(xs[s:e], a[col:col + r].t()), b[col:col + r])
        o2.index_add_(0, mapping.index, delta)
        return out

    def __repr__(self) -> str:
        return f"LoRA({self.base!r})"


def wrap_lora_layers(model: nn.Module, max_loras: int, max_lora_rank: int,
                     dtype: torch.dtype | None = None) -> list[nn.Module]:
    """Wrap every decoder projection of `model` (LORA_TARGETS) in a `LoRALinearMethod`; each
    gets `lora_target` = (layer index, HF sub-projections), `lora_stride` = len(subs) *
    max_lora_rank and zero slots `lora_a` / `lora_b` / `lora_ranks` (module doc) in `dtype`
    (the activations' dtype; default: the weight's) on the weight's device. Returns the wrapped
    layers in module order. Called before the weights load."""
    wrapped = []
    for name, module in model.named_modules():
        match = _LAYER.match(name)
        if match is None or match[2] not in LORA_TARGETS or not isinstance(module, LinearBase):
            continue
        subs = LORA_TARGETS[match[2]]
        stride = len(subs) * max_lora_rank
        weight = module.weight
        module.linear_method = LoRALinearMethod(module.linear_method)
        module.lora_target = (int(match[1]), subs)
        module.lora_stride = stride
        module.lora_a = torch.zeros(max_loras * stride, module.in_features,
                                    dtype=dtype or weight.dtype, device=weight.device)
        module.lora_b = torch.zeros(max_loras * stride, module.out_features,
                                    dtype=dtype or weight.dtype, device=weight.device)
        module.lora_ranks = [0] * max_loras
        wrapped.append(module)
    return wrapped


def set_slot(layer: nn.Module, slot: int, weights: SlotWeights | None) -> None:
    """Write one adapter's (A [r, in_local], B [out_local, r]) for `layer` into `slot`
    (None: clear it); the rest of the slot's block is zeroed."""
    col, stride = slot * layer.lora_stride, layer.lora_stride
    layer.lora_a[col:col + stride].zero_()
    layer.lora_b[col:col + stride].zero_()
    if weights is None:
        layer.lora_ranks[slot] = 0
        return
    a, b = weights
    r = a.shape[0]
    assert r <= stride, (r, stride)
    layer.lora_a[col:col + r].copy_(a)
    layer.lora_b[col:col + r].copy_(b.t())
    layer.lora_ranks[slot] = r


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The LoRA-wrapped layers of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m.__dict__.get("linear_method"),
                                                     LoRALinearMethod)]


def _column_rows(layer: nn.Module, i: int, sub: str) -> tuple[int, int, int]:
    """(offset in this rank's output rows, size, start row in the full HF tensor) of
    sub-projection i of a column-parallel layer."""
    if isinstance(layer, QKVLinear):
        offset, size, start, _ = layer._slice(sub[0])   # "q_proj" -> "q"
        return offset, size, start
    if isinstance(layer, MergedColumnLinear):
        size = layer._local_sizes[i]
        return sum(layer._local_sizes[:i]), size, layer.tp_rank * size
    rows = layer.out_features
    return 0, rows, getattr(layer, "tp_rank", 0) * rows


def shard_for_layer(layer: nn.Module, pairs: dict[str, SlotWeights], dtype: torch.dtype,
                    device: torch.device | str) -> SlotWeights | None:
    """The slot weights (A, B) of `layer` for one adapter, from its full-size HF pairs
    `pairs[proj] = (A [r, in], B [out, r])` (only the projections it targets): stacked and
    block-diagonal for merged layers, this rank's shard under TP (module doc); None when the
    adapter targets none of the layer's sub-projections."""
    subs = layer.lora_target[1]
    present = [(i, sub) for i, sub in enumerate(subs) if sub in pairs]
    if not present:
        return None
    if isinstance(layer, RowParallelLinear):
        a, b = pairs[subs[0]]
        cols = layer.in_features
        a = a.narrow(1, layer.tp_rank * cols, cols)
        return (a.to(device=device, dtype=dtype).contiguous(),
                b.to(device=device, dtype=dtype).contiguous())
    total_rank = sum(pairs[sub][0].shape[0] for _, sub in present)
    a_cat = torch.cat([pairs[sub][0] for _, sub in present]).to(device=device, dtype=dtype)
    b_bd = torch.zeros(layer.out_features, total_rank, dtype=dtype, device=device)
    col = 0
    for i, sub in present:
        a, b = pairs[sub]
        r = a.shape[0]
        offset, size, start = _column_rows(layer, i, sub)
        b_bd[offset:offset + size, col:col + r] = b.narrow(0, start, size)
        col += r
    return a_cat.contiguous(), b_bd
