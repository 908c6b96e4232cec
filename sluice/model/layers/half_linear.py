"""Linear layers with 16-bit weights and float32 activations: `HalfWeightLinearMethod`.

What `--dtype bfloat16` (or float16) means on a CPU with layer ops 'cpu'
(`layer_ops.select_layer_ops`): the linear layers' and the LM head's weights — nearly all of a
model's bytes — are stored in the 16-bit dtype, and everything else computes in float32 (the
model is built in `LayerOps.compute_dtype` = float32: the residual stream, RMSNorm, RoPE,
attention, logits and sampling, through the float32 C++ operators and the fused decode stack).
The token embedding is stored in the 16-bit dtype too and looked up into float32. This is the
mixed precision that keeps a bf16 checkpoint's weights exact, halves the weight bytes every
decode step streams, and adds no rounding of activations beyond what the GEMM hardware needs.

The product, per call (`apply`):
* where the CPU has native bf16 products (`layer_ops.native_bf16_products`: AMX-BF16 or
  AVX-512-BF16 reported, oneDNN takes bf16), every bf16 product, one row or many: oneDNN's GEMM
  on a copy of the weight pre-packed at load (`layer.packed_weight`), activations rounded to
  bf16 at its input (what AMX multiplies), float32 accumulation, the result (rounded to bf16
  by oneDNN) widened to float32 — the C++ `onednn_bf16_linear`, which does both conversions
  in one vectorised pass each. On a Xeon with AMX it beat the streaming GEMV below from one
  row on (SmolLM2's projections and head, weights from memory: ~0.9x its time at 1 row, 0.4x
  at 4, 0.3x at 8), and every step, decode or prefill, rounds activations alike. Without AMX
  (AVX-512-BF16 only) up to `ops.streamed_bf16_rows()` = 8 rows (decode of a few requests) the
  C++ `bf16_linear` streams the plain bf16 weight instead: csrc/bf16_gemv.cpp's vdpbf16ps
  kernel on x rounded to bf16, float32 sums, the result rounded to bf16 — oneDNN's numerics up
  to float32 summation order — at the memory's pace whatever the row count (SmolLM2's products
  on a Zen 5: 0.66-0.82x oneDNN's time from 1 to 8 rows, `benchmarks/bf16_rows.py`; the
  x86-64-v3 build uses the widening GEMV below for up to 2 rows);
* elsewhere up to MAX_STREAMED_ROWS rows (decode), on every x86 CPU: the C++ `gguf_linear`
  with GGML type BF16 (30) / F16 (1): each weight row is streamed once and widened to float32
  in registers (bf16: a 16-bit shift; f16: F16C), fp32 FMA with the activations — half the
  bytes of the float32 GEMV;
* more rows there: `gguf_linear`'s panel path (weight rows widened into an fp32 tile in L2,
  one sgemm of all rows against it);
* anything the C++ operators do not take (no operators, autograd, another device): F.linear on
  the weight widened to the activations' dtype (the reference).
Results equal float32 F.linear on the 16-bit weight up to summation order, except the oneDNN
path, which also rounds the activations to bf16 (as HF's bf16 model does). On that path a bf16
x is taken as oneDNN's input as it is, and `bf16_product` hands out oneDNN's bf16 result
unwidened: a gated MLP whose two projections both take the path (`bf16_mlp_layers`) keeps its
[T, 2I] and [T, I] activations in bf16 — the same bits as widening them and rounding again.

The fused decode stack lists this method in its `FastPathSupport` (its projections take the same
paths on the same weights); the greedy screen, which reads a float32 head, does not (a packed
bf16 head has its own greedy path, `greedy_bf16`).
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from sluice.model.layers.layer_ops import fast_path_ok, native_bf16_products
from sluice.model.layers.linear_method import LinearMethod

logger = logging.getLogger(__name__)

#: the GGML type id `gguf_linear` takes for a weight stored in each 16-bit dtype
HALF_KERNEL_TYPES: dict[torch.dtype, int] = {torch.float16: 1, torch.bfloat16: 30}
#: the most rows the weight-streaming GEMV takes (CPUs without native bf16); more run a GEMM
MAX_STREAMED_ROWS = 8


def packed_bf16_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's pre-packed copy of a bf16 [N, K] weight, or None where oneDNN refuses it."""
    try:
        with torch.no_grad():
            return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64)
    except (RuntimeError, AttributeError) as e:
        logger.warning("oneDNN did not pack a bf16 weight (%s); its GEMMs widen to float32.", e)
        return None


class HalfWeightLinearMethod(LinearMethod):
    """The weight in `storage_dtype` (bfloat16 or float16) [out, in], activations and bias in
    the model's float32 (module doc). `native_gemm`: pack bf16 weights for oneDNN's GEMM
    (default: `native_bf16_products()` for bfloat16)."""

    DTYPES: tuple[torch.dtype, ...] = tuple(HALF_KERNEL_TYPES)

    def __init__(self, ops: ModuleType | None, storage_dtype: torch.dtype,
                 native_gemm: bool | None = None) -> None:
        if storage_dtype not in HALF_KERNEL_TYPES:
            raise ValueError("HalfWeightLinearMethod stores bfloat16 or float16, not "
                             f"{storage_dtype}")
        self.ops = ops
        self.storage_dtype = storage_dtype
        self.kernel_type = HALF_KERNEL_TYPES[storage_dtype]
        self.native_gemm = (storage_dtype == torch.bfloat16 and ops is not None
                            and (native_bf16_products() if native_gemm is None else native_gemm))

    def weight_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        """`storage_dtype`, whatever the layer's (compute) dtype; the bias stays in that dtype.
        The loaders' copies convert the checkpoint's values to the parameters' dtypes."""
        return self.storage_dtype

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight
        layer.packed_weight = (packed_bf16_weight(weight) if self.native_gemm
                               and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
                               else None)

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        weight = layer.weight
        x2 = x.reshape(-1, x.shape[-1])
        if x.dtype == torch.bfloat16 and self.bf16_product_ok(layer, x2, bias):
            out = self.ops.bf16_linear(x2, weight, layer.packed_weight, bias)   # float32
            return out.view(*x.shape[:-1], weight.shape[0])
        if self.ops is None or weight.dtype != self.storage_dtype or weight.stride(-1) != 1 \
                or not fast_path_ok(x2, bias) or weight.device != x.device \
                or (bias is not None and not bias.is_contiguous()):
            return F.linear(x, weight.to(x.dtype), bias)
        rows = x2.shape[0]
        packed = layer.__dict__.get("packed_weight")  # a plain attribute; absent before loading
        if packed is not None:
            out = self.ops.bf16_linear(x2, weight, packed, bias)
        else:
            out = x2.new_empty(rows, weight.shape[0])
            self.ops.gguf_linear(out, x2, weight, self.kernel_type, bias)
        return out.view(*x.shape[:-1], weight.shape[0])

    def bf16_product_ok(self, layer: nn.Module, x2: torch.Tensor,
                        bias: torch.Tensor | None = None) -> bool:
        """Whether `layer` runs oneDNN's bf16 GEMM (a packed weight) on the 2-D CPU x2, float32
        or bfloat16 (a bf16 x is oneDNN's input as it is, rounded before)."""
        return (self.ops is not None and layer.__dict__.get("packed_weight") is not None
                and x2.dtype in (torch.float32, torch.bfloat16) and x2.device.type == "cpu"
                and x2.stride(-1) == 1 and not (torch.is_grad_enabled() and x2.requires_grad)
                and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())))

    def bf16_product(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """oneDNN's bf16 result of x @ W.T (no bias) as it is, [*, out] bfloat16: what `apply`
        widens to float32. None where the layer does not take that path."""
        x2 = x.reshape(-1, x.shape[-1])
        if layer.bias is not None or not self.bf16_product_ok(layer, x2):
            return None
        out = self.ops.bf16_linear(x2, layer.weight, layer.packed_weight, None, False)
        return out.view(*x.shape[:-1], out.shape[-1])

    def __repr__(self) -> str:
        native = ", oneDNN bf16 GEMM" if self.native_gemm else ""
        return f"{type(self).__name__}({str(self.storage_dtype).removeprefix('torch.')}{native})"


def bf16_mlp_layers(gate_up: nn.Module, down: nn.Module) -> HalfWeightLinearMethod | None:
    """gate_up's method when a gated MLP can stay in bf16 between its GEMMs: gate_up (no bias)
    and down both HalfWeightLinearMethod (exactly: not wrapped, e.g. by LoRA) with packed
    weights. None otherwise."""
    gm, dm = getattr(gate_up, "linear_method", None), getattr(down, "linear_method", None)
    if type(gm) is not HalfWeightLinearMethod or type(dm) is not HalfWeightLinearMethod:
        return None
    if gate_up.bias is not None or gate_up.__dict__.get("packed_weight") is None \
            or down.__dict__.get("packed_weight") is None:
        return None
    return gm
