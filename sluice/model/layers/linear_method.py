"""How a linear layer computes y = x @ W.T (+ b): a `LinearMethod`, chosen when the model is built.

Every linear layer (`sluice.model.layers.linear`) and the LM head (`embedding.LMHead`) holds a
`linear_method`, read once in its constructor from the model's `LayerOps`
(`layer_ops.current_layer_ops()`, set by the model loader from the config: layer ops 'torch' |
'cpu', the dtype, the device and what this CPU and torch build offer; see
`layer_ops.select_layer_ops`). The layer keeps its shape, its tensor-parallel shard and group
and its weight loaders; the method owns the parameters' form and the product:

    create_weights(layer, in_features, out_features, bias=, dtype=, weight_loader=)
        registers `layer.weight` [out, in] and `layer.bias` [out] (or None) with the layer's
        `weight_loader` attached (loaders narrow the checkpoint tensor to the rank's shard);
    process_weights_after_loading(layer)
        once the checkpoint is in: packing and the like (idempotent: it may run again);
    apply(layer, x, bias) -> x @ W.T (+ bias)
        `bias` is passed, not read from the layer, so a row-parallel layer can add it after
        its all-reduce (it passes None).

A method object is shared by the layers of one model and holds no per-layer tensors: those
live on the layer as plain attributes (e.g. `layer.packed_weight`), where the model runner's
memory accounting (which walks module attributes) counts them. `plan(model)` runs once per
method before the per-layer processing, for decisions over the whole model (the memory-fit
rule of packing).

Methods:
    DenseLinearMethod      the weight as loaded, through a GEMM function: F.linear (layer ops
                           'torch'), or the C++ `tiled_linear` (layer ops 'cpu' where oneDNN
                           packing does not apply: no oneDNN, or a dtype other than float32).
    CpuPackedLinearMethod  layer ops 'cpu', float32 on a CPU with oneDNN (its declaration:
                           `CpuPackedLinearMethod.supports`): oneDNN's GEMM on a copy of the
                           weight pre-packed at load (`layer.packed_weight`, ~the weight's size
                           again; 1.2-1.6x MKL's sgemm for 2+ rows), the weight-streaming GEMV
                           for one row. When the copies of the whole model would take more than
                           PACK_MEMORY_FRACTION of the available memory (`_packing_fits`),
                           nothing is packed and every layer runs the tiled GEMM.

Fast paths that read a layer's weights or packed copy directly (the fused decode stack, the LM
head's greedy screen) declare in one `FastPathSupport` each which methods and dtypes they
handle, and step aside for any other layer. Methods are compared by exact type, so a method
added later (LoRA wrapping a method, int8, GGUF blocks) — or a subclass of one listed — makes
them step aside until its author adds it to their declaration.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from sluice.model.layers.layer_ops import (PACK_MEMORY_FRACTION, Gemm, fast_path_ok,
                                          make_tiled_gemm, packed_weight)

logger = logging.getLogger(__name__)

WeightLoader = Callable[[nn.Parameter, Any, "str | int | None"], None]


def set_weight_loader(param: nn.Parameter, loader: WeightLoader) -> None:
    """Attach `loader` to `param` (read back by the model's `load_weights`)."""
    param.weight_loader = loader  # type: ignore[attr-defined]


class LinearMethod(ABC):
    """The form of a linear layer's weight and how its product is computed (module doc)."""

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, *,
                       bias: bool, dtype: torch.dtype | None,
                       weight_loader: WeightLoader) -> None:
        """Register `layer.weight` [out_features, in_features] in `weight_dtype(dtype)`
        (uninitialised, no gradient) and `layer.bias` [out_features] in `dtype` or None, each
        with `weight_loader` attached."""
        layer.weight = nn.Parameter(torch.empty(out_features, in_features,
                                                dtype=self.weight_dtype(dtype)),
                                    requires_grad=False)
        layer.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
                      if bias else None)
        for p in (layer.weight, layer.bias):
            if p is not None:
                set_weight_loader(p, weight_loader)

    def weight_dtype(self, dtype: torch.dtype | None) -> torch.dtype | None:
        """The dtype the weight is stored in for a layer built in `dtype` (the same here)."""
        return dtype

    def plan(self, model: nn.Module) -> None:
        """Decisions over the whole loaded `model`, made once before its layers' processing."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Derive what `apply` needs from the loaded weight (nothing by default)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., in] -> x @ layer.weight.T (+ bias) [..., out]."""

    def __repr__(self) -> str:
        return type(self).__name__


class DenseLinearMethod(LinearMethod):
    """The weight as loaded; the product by `gemm(x, weight, bias)`: F.linear by default, or
    `layer_ops.make_tiled_gemm(ops)` (the C++ tiles, F.linear where they do not apply)."""

    def __init__(self, gemm: Gemm = F.linear) -> None:
        self.gemm = gemm

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        return self.gemm(x, layer.weight, bias)


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


class CpuPackedLinearMethod(LinearMethod):
    """oneDNN's GEMM on a pre-packed weight for 2+ rows (prefill and batched decode): the C++
    operators' `onednn_linear`, whose row counts are padded to a bounded set (`onednn_rows`
    in csrc/ops.h) so oneDNN's per-shape primitive cache stays small. One row (and anything
    the C++ ops do not take: autograd, strided weights) runs `make_tiled_gemm(ops)`: the
    weight-streaming GEMV, F.linear where it does not apply.

    `process_weights_after_loading` sets `layer.packed_weight` = `packed_weight(layer.weight)`
    (None when the model's copies do not fit, see `plan`, or torch has no oneDNN); it does not
    follow later writes to the weight."""

    #: what this path packs: float32 weights on the CPU (oneDNN's f32 blocked layout)
    DTYPES: tuple[torch.dtype, ...] = (torch.float32,)

    def __init__(self, ops: ModuleType) -> None:
        self.ops = ops
        self._tiled = make_tiled_gemm(ops)
        self.pack = True  # the memory-fit rule's verdict, set by `plan`

    @classmethod
    def supports(cls, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether layers of `dtype` on `device` can take this method: a CPU, a dtype in
        DTYPES and a torch with oneDNN."""
        return (device.type == "cpu" and dtype in cls.DTYPES
                and torch.backends.mkldnn.is_available())

    def plan(self, model: nn.Module) -> None:
        self.pack = _packing_fits(model)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight
        layer.packed_weight = (packed_weight(weight)
                               if self.pack and isinstance(weight, torch.Tensor) else None)

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        weight = layer.weight
        packed = layer.__dict__.get("packed_weight")  # a plain attribute; absent before loading
        x2 = x.reshape(-1, x.shape[-1])
        if packed is None or x2.shape[0] <= 1 or not fast_path_ok(x2, weight, bias) \
                or (bias is not None and not bias.is_contiguous()):
            return self._tiled(x, weight, bias)
        out = self.ops.onednn_linear(x2, packed, bias)
        return out.view(*x.shape[:-1], out.shape[-1])


@dataclass(frozen=True)
class FastPathSupport:
    """What a fast path that reads layers' weights directly handles; it steps aside (the
    plain layers run) for any layer outside this. `methods` are compared by exact type: a
    subclass or a wrapper (LoRA) is a different feature until listed.

    `step_wrappers`: wrapper methods (exact types, holding the wrapped method as `.base`) that
    add nothing to the product in some steps, e.g. LoRA in a step without adapter tokens. A
    layer with one is judged by its base method, and the path itself must step aside in the
    steps where the wrapper adds something (its `applies` check says how).

    `method_dtypes`: the weight dtypes of the listed methods that differ from `dtypes` (e.g.
    uint8 GGUF blocks), by exact type."""

    name: str
    methods: tuple[type[LinearMethod], ...]
    dtypes: tuple[torch.dtype, ...]
    single_rank: bool  # no tensor-parallel split: the path has no collective of its own
    step_wrappers: tuple[type[LinearMethod], ...] = ()
    method_dtypes: tuple[tuple[type[LinearMethod], tuple[torch.dtype, ...]], ...] = ()

    def unsupported(self, layer: nn.Module) -> str | None:
        """Why this path cannot take `layer` (a module with `linear_method` and `weight`), or
        None when it can."""
        method = getattr(layer, "linear_method", None)
        if type(method) in self.step_wrappers:
            method = method.base
        if type(method) not in self.methods:
            return (f"the {self.name} supports linear methods "
                    f"{', '.join(m.__name__ for m in self.methods)}, not {method!r}")
        dtypes = dict(self.method_dtypes).get(type(method), self.dtypes)
        dtype = layer.weight.dtype
        if dtype not in dtypes:
            return (f"the {self.name} supports {', '.join(map(str, dtypes))} weights with "
                    f"{type(method).__name__}, not {dtype}")
        if self.single_rank and getattr(layer, "tp_size", 1) != 1:
            return f"the {self.name} runs on one tensor-parallel rank only"
        return None

    def first_unsupported(self, layers: Iterable[nn.Module]) -> str | None:
        """`unsupported` of the first layer it does not take, or None for all taken."""
        for layer in layers:
            reason = self.unsupported(layer)
            if reason is not None:
                return reason
        return None


def linear_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that hold a `linear_method`, in module order."""
    return [m for m in model.modules() if isinstance(m.__dict__.get("linear_method"),
                                                     LinearMethod)]


def process_weights_after_loading(model: nn.Module) -> None:
    """After the checkpoint is loaded: `plan(model)` once per distinct method, then every
    linear layer's `process_weights_after_loading()` (the method's, and for the LM head also
    its greedy screen)."""
    layers = linear_layers(model)
    methods = {id(layer.linear_method): layer.linear_method for layer in layers}
    for method in methods.values():
        method.plan(model)
    for layer in layers:
        layer.process_weights_after_loading()
