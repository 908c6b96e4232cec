"""Which code computes the layers' math: pure torch, or sluice's C++ CPU operators.

    'torch'  F.linear and torch elementwise ops (the reference; any device, dtype, autograd)
    'cpu'    the operators of `sluice.model.cpu_ops` (sluice/model/csrc/):
             * GEMM of every linear layer and the LM head (`PackedGemm`): for 2+ rows
               oneDNN's GEMM on a weight pre-packed at load (`packed_weight`; on this AMD
               CPU 1.2-1.6x faster than MKL's sgemm, which is what torch.mm runs), for one
               row `tiled_linear`'s GEMV that streams each weight row once (faster than
               oneDNN there). Without oneDNN: `tiled_linear` for every shape (row x column
               tiles, each a single-threaded sgemm, spread over the threads; 1-4 rows
               streamed). The packed copies double the weights' memory. oneDNN builds
               a primitive (~0.5 MiB, cached) per input shape, so its row counts are padded
               to a fixed set (`onednn_rows` in csrc/ops.h: exact below 32, < 1/16 extra above);
             * RMSNorm (with the fused residual add), SiLU-and-mul and RoPE as one pass each;
             * with packing and bf16 dot products on the CPU, the LM head's `greedy` screen
               (`sluice.model.layers.greedy`: exact greedy tokens from bf16 scores; two bf16
               copies of the LM-head weight).
             Used for float32 CPU tensors with contiguous rows outside autograd; anything else
             takes the torch code. 'cpu' means 'torch' when the operators cannot be built.

What each fast path supports (and where it steps aside):
    packed weights / C++ GEMM   every linear layer and the LM head, also under tensor
                                parallelism: each rank packs its own shard, and the
                                all-reduce / logits gather stay in the layers' Python.
    greedy screen               one rank only: with a vocabulary split over tp > 1 ranks no
                                rank holds the whole LM head, so `greedy` stays None and the
                                runner computes the (gathered) logits. Also needs bf16 dot
                                products and the packed copy.
    fused decode stack          see `sluice.model.fused_decode` (one rank only).

Layers carry the hooks: `gemm` (LinearBase, LMHead; default F.linear), `greedy` (LMHead;
default None) and `cpu_ops` (RMSNorm, SiluAndMul, LlamaAttention's RoPE; default None).
`install_layer_ops(model, name)`, called by the model loader with the platform's choice
(`Platform.layer_ops_name`), sets all three.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

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


def _packing_fits(model: nn.Module) -> bool:
    """Whether a packed copy of the model's linear weights (~their float32 size, plus the LM
    head's float32 size again for the greedy screen's two bf16 copies) takes at most
    PACK_MEMORY_FRACTION of the memory still available; else the GEMMs stay on MKL tiles (a
    large model keeps its memory for the KV cache)."""
    from sluice.platform.host import memory_bytes
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 2)
    weights += sum(m.lm_weight.numel() * 4 for m in model.modules() if hasattr(m, "greedy"))
    available = memory_bytes()[1]
    if weights <= PACK_MEMORY_FRACTION * available:
        return True
    logger.info("Not pre-packing %.1f GiB of weights for oneDNN (more than %d%% of the %.1f "
                "GiB available); GEMMs run on MKL tiles.", weights / 2**30,
                100 * PACK_MEMORY_FRACTION, available / 2**30)
    return False


class PackedGemm:
    """y = x @ W.T (+ b): oneDNN's GEMM on the pre-packed weight `packed` for 2+ rows (prefill
    and batched decode), `fallback` (`make_tiled_gemm`: the weight-streaming GEMV for one row,
    F.linear where the C++ ops do not apply) otherwise. `packed` must be `packed_weight` of the
    weight the layer passes. `linear(x, packed, bias)` runs the oneDNN GEMM: the C++
    operators' `onednn_linear` (row counts padded to a bounded set, so oneDNN's per-shape
    primitive cache stays small), by default the unpadded torch op."""

    def __init__(self, packed: torch.Tensor, fallback: Gemm,
                 linear: Gemm = onednn_linear) -> None:
        self.packed = packed
        self._fallback = fallback
        self._linear = linear

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] <= 1 or not fast_path_ok(x2, weight, bias) \
                or (bias is not None and not bias.is_contiguous()):
            return self._fallback(x, weight, bias)
        out = self._linear(x2, self.packed, bias)
        return out.view(*x.shape[:-1], out.shape[-1])


def install_layer_ops(model: nn.Module, name: str) -> ModuleType | None:
    """Point every layer hook of `model` at the implementation `name` (see module doc) and
    return the C++ operator module in use (None: pure torch). Call after the weights are
    loaded: with 'cpu' each linear layer's weight is also pre-packed for oneDNN (a second copy
    of the weights; GEMMs of 2+ rows ran 1.2-1.6x faster than MKL's sgemm tiles here), when
    that copy fits in PACK_MEMORY_FRACTION of the available memory."""
    if name not in LAYER_OPS:
        raise ValueError(f"unknown layer ops '{name}'; available: {', '.join(LAYER_OPS)}")
    ops = None
    if name == "cpu":
        from sluice.model.cpu_ops import load_cpu_ops
        ops = load_cpu_ops()
    gemm: Gemm = make_tiled_gemm(ops) if ops is not None else F.linear
    pack = ops is not None and _packing_fits(model)
    for module in model.modules():
        if hasattr(module, "gemm"):
            packed = None
            if pack:
                weight = getattr(module, "lm_weight", None)
                weight = weight if weight is not None else getattr(module, "weight", None)
                packed = packed_weight(weight) if isinstance(weight, torch.Tensor) else None
            module.gemm = (PackedGemm(packed, gemm, ops.onednn_linear) if packed is not None
                           else gemm)
        if hasattr(module, "greedy"):
            from sluice.model.layers.greedy import make_greedy_screen
            whole_vocab = getattr(module, "tp_size", 1) == 1   # steps aside for a split vocab
            module.greedy = make_greedy_screen(ops if pack and whole_vocab else None,
                                               getattr(module, "lm_weight", None),
                                               PACK_ROWS_HINT)
        if hasattr(module, "cpu_ops"):
            module.cpu_ops = ops
    return ops
