"""Which code computes the layers' math: pure torch, or sluice's C++ CPU operators.

    'torch'  F.linear and torch elementwise ops (the reference; any device, dtype, autograd)
    'cpu'    the operators of `sluice.model.cpu_ops` (sluice/model/csrc/):
             * the product of every linear layer and the LM head, through the layer's
               `LinearMethod` (`sluice.model.layers.linear_method`): for float32 with oneDNN
               `CpuPackedLinearMethod` (for 2+ rows oneDNN's GEMM on a weight pre-packed at
               load, on this AMD CPU 1.2-1.6x faster than MKL's sgemm, which is what torch.mm
               runs; for one row `tiled_linear`'s GEMV that streams each weight row once,
               faster than oneDNN there; the packed copies double the weights' memory;
               oneDNN builds a primitive (~0.5 MiB, cached) per input shape, so its row
               counts are padded to a fixed set, `onednn_rows` in csrc/ops.h: exact below
               32, < 1/16 extra above); otherwise `DenseLinearMethod` over `tiled_linear`
               for every shape (row x column tiles, each a single-threaded sgemm, spread over
               the threads; 1-4 rows streamed); for bfloat16 / float16
               `HalfWeightLinearMethod` (16-bit weights, the model computing in float32:
               `LayerOps.compute_dtype`; `sluice.model.layers.half_linear`);
             * RMSNorm (with the fused residual add), SiLU-and-mul and RoPE as one pass each;
             * with packing and bf16 dot products on the CPU, the LM head's `greedy` screen
               (`sluice.model.layers.greedy`: exact greedy tokens from bf16 scores; two bf16
               copies of the LM-head weight).
             Used for float32 CPU tensors with contiguous rows outside autograd; anything else
             takes the torch code. 'cpu' means 'torch' when the operators cannot be built.

The choice is made once, before the model is built: `select_layer_ops(name, dtype, device)`
returns a `LayerOps` record (the C++ module or None, and the linear method), and the model
loader builds the model inside `building_with(layer_ops)`. Layers read
`current_layer_ops()` once in their constructors (as they read their tensor-parallel group):
linear layers and the LM head take its `linear_method`, RMSNorm / SiluAndMul / the attention
layer's RoPE its `cpu_ops`. Nothing is patched onto the layers after loading; the loader only
calls `linear_method.process_weights_after_loading(model)` (packing, the greedy screen) and
`fused_decode.install_fused_decode`.

What each fast path supports (and where it steps aside), each declared in one place:
    packed weights              `CpuPackedLinearMethod.supports` (float32 on a CPU with
                                oneDNN); every linear layer and the LM head, also under tensor
                                parallelism: each rank packs its own shard, and the all-reduce
                                / logits gather stay in the layers' Python.
    greedy screen               `greedy.GREEDY_SCREEN_SUPPORT`: the LM head's method is
                                CpuPackedLinearMethod over float32, one rank only (with a
                                vocabulary split over tp > 1 ranks no rank holds the whole LM
                                head); also needs bf16 dot products and the packed copy.
    fused decode stack          `fused_decode.FUSED_DECODE_SUPPORT` (dense or packed float32
                                weights, one rank, the whole model; with LoRA only the steps
                                without adapter tokens; see that module).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from sluice.model.layers.linear_method import LinearMethod

logger = logging.getLogger(__name__)

Gemm = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
LAYER_OPS = ("torch", "cpu")
PACK_ROWS_HINT = 64  # oneDNN picks its packed layout for about this many rows
PACK_MEMORY_FRACTION = 0.25  # pack only when the copy takes at most this share of free memory


def fast_path_ok(*tensors: torch.Tensor | None) -> bool:
    """True when every given tensor is float32 on CPU with contiguous last dim and needs no
    gradient: what the C++ operators accept (None entries are skipped). Called per layer and
    step, so it is a plain loop."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"
                              or t.stride(-1) != 1 or (grad and t.requires_grad)):
            return False
    return True


def native_bf16_products() -> bool:
    """Whether this CPU multiplies bf16 natively (it reports AVX-512-BF16 or AMX-BF16) and
    torch's oneDNN runs bf16 GEMMs on it: where a bf16 GEMM beats widening to float32 (the
    greedy screen, 16-bit weights' GEMMs, `--dtype auto`)."""
    from sluice.platform.host import isa_flags
    flags = isa_flags()
    if not (flags.get("avx512_bf16") or flags.get("amx_bf16")):
        return False
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (RuntimeError, AttributeError):
        return False


def make_tiled_gemm(ops: ModuleType) -> Gemm:
    """y = x @ W.T (+ b) through `ops.tiled_linear`, F.linear where it does not apply."""

    def tiled_gemm(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if not fast_path_ok(x2, weight, bias) or (bias is not None and not bias.is_contiguous()):
            return F.linear(x, weight, bias)
        out = x2.new_empty(x2.shape[0], weight.shape[0])
        ops.tiled_linear(out, x2, weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])

    return tiled_gemm


def make_argmax(ops: ModuleType | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Row-wise argmax (greedy sampling) through `ops.argmax_rows` (~10x faster than torch's
    on a 32k vocabulary; same first-maximum rule), torch's where it does not apply."""

    def argmax(logits: torch.Tensor) -> torch.Tensor:
        if ops is None or logits.dim() != 2 or not fast_path_ok(logits):
            return logits.argmax(dim=-1)
        out = torch.empty(logits.shape[0], dtype=torch.long)
        ops.argmax_rows(out, logits)
        return out

    return argmax


def packed_weight(weight: torch.Tensor, rows_hint: int = PACK_ROWS_HINT) -> torch.Tensor | None:
    """oneDNN's blocked (pre-packed) copy of a float32 [N, K] CPU weight, laid out for about
    `rows_hint` rows of input, or None where torch has no oneDNN. Made once at load; the copy
    does not follow later writes to `weight`."""
    if not torch.backends.mkldnn.is_available() or weight.dtype != torch.float32 \
            or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    try:
        with torch.no_grad():
            return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)
    except (RuntimeError, AttributeError):  # an older torch or a build without the op
        return None


def onednn_linear(x: torch.Tensor, packed: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W.T (+ bias) on oneDNN, W given as `packed_weight(W)`. torch builds and
    caches (ideep's LRU, 1024 entries of ~0.5 MiB) a oneDNN primitive per distinct M: fine for
    a fixed shape, not for a server's steps. The hot paths use the C++ operators'
    `onednn_linear`, which pads M to a fixed set of row counts (`onednn_rows`, ops.h)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")




@dataclass(frozen=True)
class LayerOps:
    """What computes the layers of one model, chosen before it is built (module doc): the
    layer-ops `name`, the C++ operator module (None: torch code) for the elementwise layers,
    the `linear_method` every linear layer and the LM head is built with, and
    `compute_dtype`: the dtype the model is built in when it differs from the requested one
    (16-bit weights over float32 activations, `half_linear`); None: the requested dtype."""

    name: str
    cpu_ops: ModuleType | None
    linear_method: LinearMethod
    compute_dtype: torch.dtype | None = None

    def model_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the model's activations and non-linear parameters take for `--dtype`
        `dtype`."""
        return self.compute_dtype or dtype


_BUILDING: ContextVar[LayerOps | None] = ContextVar("sluice_layer_ops", default=None)


def current_layer_ops() -> LayerOps:
    """The `LayerOps` of the model being built (`building_with`); outside a build, pure torch
    (F.linear, no C++ operators): what layers made on their own (tests) compute with."""
    current = _BUILDING.get()
    if current is not None:
        return current
    from sluice.model.layers.linear_method import DenseLinearMethod
    return LayerOps("torch", None, DenseLinearMethod(F.linear))


@contextmanager
def building_with(layer_ops: LayerOps) -> Iterator[LayerOps]:
    """Layers constructed inside this block compute with `layer_ops`."""
    token = _BUILDING.set(layer_ops)
    try:
        yield layer_ops
    finally:
        _BUILDING.reset(token)


def select_layer_ops(name: str, dtype: torch.dtype, device: torch.device | str) -> LayerOps:
    """The `LayerOps` for layer ops `name` ('torch' or 'cpu') and a model of `dtype` on
    `device`: 'cpu' loads the C++ operators (falling back to 'torch' where they cannot be
    built) and picks `CpuPackedLinearMethod` where it supports (dtype, device); for bfloat16 /
    float16 on a CPU `HalfWeightLinearMethod` (16-bit weights) with float32 as the compute
    dtype; else `DenseLinearMethod` over the C++ tiles. One fresh record (and method objects)
    per model."""
    if name not in LAYER_OPS:
        raise ValueError(f"unknown layer ops '{name}'; available: {', '.join(LAYER_OPS)}")
    from sluice.model.layers.linear_method import CpuPackedLinearMethod, DenseLinearMethod
    ops = None
    if name == "cpu":
        from sluice.model.cpu_ops import load_cpu_ops
        ops = load_cpu_ops()
    if ops is None:
        return LayerOps("torch", None, DenseLinearMethod(F.linear))
    if CpuPackedLinearMethod.supports(dtype, torch.device(device)):
        return LayerOps(name, ops, CpuPackedLinearMethod(ops))
    from sluice.model.layers.half_linear import HalfWeightLinearMethod
    if torch.device(device).type == "cpu" and dtype in HalfWeightLinearMethod.DTYPES:
        return LayerOps(name, ops, HalfWeightLinearMethod(ops, dtype), torch.float32)
    return LayerOps(name, ops, DenseLinearMethod(make_tiled_gemm(ops)))


def model_compute_dtype(name: str, dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype a model requested in `dtype` computes in under layer ops `name`: float32 for
    16-bit weights on a CPU with the C++ operators (`LayerOps.model_dtype`), else `dtype`."""
    return select_layer_ops(name, dtype, device).model_dtype(dtype)
