"""GEMM backends of the linear layers and the LM head: y = x @ W.T (+ b), W [out, in].

    'torch'      F.linear (the reference; any device, dtype, autograd)
    'cpu_tiled'  sluice's tiled CPU operator (`sluice/model/csrc/tiled_linear.cpp`): the output
                 is cut into row x column tiles, each a single-threaded sgemm, spread over
                 the threads. On small models' decode-shaped GEMMs it runs 1.2-2x faster than
                 one multi-threaded call. Used for float32 CPU inference with row-contiguous
                 weights; anything else (other dtypes, autograd) takes F.linear. F.linear also when the operators
                 cannot be built.

The model loader picks the backend from the platform (`Platform.gemm_backend_name`) and installs
it on every layer with `use_gemm`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Gemm = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def make_tiled_gemm(ops: ModuleType) -> Gemm:
    """The 'cpu_tiled' GEMM over the compiled operator module `ops`."""

    def tiled_gemm(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
        if (x.dtype != torch.float32 or weight.dtype != torch.float32
                or x.device.type != "cpu" or weight.device.type != "cpu"
                or weight.stride(-1) != 1 or (bias is not None and not bias.is_contiguous())
                or (bias is not None and bias.dtype != torch.float32)
                or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
            return F.linear(x, weight, bias)
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out = x2.new_empty(x2.shape[0], weight.shape[0])
        ops.tiled_linear(out, x2, weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])

    return tiled_gemm


def get_gemm(name: str) -> Gemm:
    """The GEMM called `name` ('torch' or 'cpu_tiled'; see the module docstring)."""
    if name == "torch":
        return F.linear
    if name == "cpu_tiled":
        from sluice.model.cpu_ops import load_cpu_ops
        ops = load_cpu_ops()
        return make_tiled_gemm(ops) if ops is not None else F.linear
    raise ValueError(f"unknown GEMM backend '{name}'; available: cpu_tiled, torch")


def use_gemm(model: nn.Module, gemm: Gemm) -> None:
    """Make every layer of `model` that has a `gemm` attribute (linear layers, LM head) call
    `gemm`."""
    for module in model.modules():
        if hasattr(module, "gemm"):
            module.gemm = gemm
