"""Activation functions for gated MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """[..., 2*d] -> [..., d]: silu(x[..., :d]) * x[..., d:] (gate first, then up)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


def get_act_and_mul(name: str) -> nn.Module:
    """The fused gate activation for HF's `hidden_act` (only 'silu' is supported)."""
    if name not in ("silu", "swish"):
        raise ValueError(f"hidden_act '{name}' is not supported; supported: silu")
    return SiluAndMul()
