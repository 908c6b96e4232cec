"""Activation functions for gated MLPs."""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from sluice.model.layers.layer_ops import current_layer_ops, fast_path_ok


class SiluAndMul(nn.Module):
    """[..., 2*d] -> [..., d]: silu(x[..., :d]) * x[..., d:] (gate first, then up).
    With `cpu_ops` (the model's layer ops, read at construction), 2-D float32 inputs run as
    one fused C++ pass, and so do bfloat16 ones (computed in float32, rounded to bf16 once:
    a bf16 MLP's activations, `half_linear.bf16_mlp_layers`)."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu_ops: ModuleType | None = current_layer_ops().cpu_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        if self.cpu_ops is not None and x.dim() == 2 and (fast_path_ok(x) or _bf16_rows(x)):
            out = torch.empty(x.shape[0], d, dtype=x.dtype)
            self.cpu_ops.silu_and_mul(out, x)
            return out
        return F.silu(x[..., :d]) * x[..., d:]


def _bf16_rows(x: torch.Tensor) -> bool:
    """A bfloat16 CPU tensor with contiguous rows needing no gradient (the C++ op's bf16 form)."""
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.stride(-1) == 1
            and not (torch.is_grad_enabled() and x.requires_grad))


def get_act_and_mul(name: str) -> nn.Module:
    """The fused gate activation for HF's `hidden_act` (only 'silu' is supported)."""
    if name not in ("silu", "swish"):
        raise ValueError(f"hidden_act '{name}' is not supported; supported: silu")
    return SiluAndMul()
