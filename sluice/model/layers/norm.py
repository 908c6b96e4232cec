"""RMSNorm, numerically as Hugging Face's LlamaRMSNorm (statistics in float32)."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from sluice.model.layers.layer_ops import current_layer_ops, fast_path_ok


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)) over the last dim.

    `forward(x)` returns the normed tensor. `forward(x, residual)` first adds, then norms, and
    returns `(normed, x + residual)` — the fused residual add used between decoder sub-blocks
    (the new residual is the sum, un-normed, in the input dtype).
    With `cpu_ops` (the model's layer ops, read at construction), 2-D float32 inputs run as
    one fused C++ pass.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.cpu_ops: ModuleType | None = current_layer_ops().cpu_ops

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(in_dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        ops = self.cpu_ops
        if ops is not None and x.dim() == 2 and fast_path_ok(x, residual, self.weight):
            out = torch.empty(x.shape, dtype=x.dtype)
            if residual is None:
                ops.rms_norm(out, x, self.weight, self.eps)
                return out
            total = torch.empty(x.shape, dtype=x.dtype)
            ops.add_rms_norm(out, total, x, residual, self.weight, self.eps)
            return out, total
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
