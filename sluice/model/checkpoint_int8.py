"""Checkpoints stored in int8: compressed-tensors W8A8 (`hf_config.CheckpointQuantization`).

Such a checkpoint (llm-compressor's int8 W8A8 output, which vLLM reads as `compressed-tensors`)
stores each quantized linear layer X as `X.weight` int8 [out, in] and `X.weight_scale` (float
[out, 1] per output channel, or [1] per tensor):

    W[n, k] = weight[n, k] * scale[n]

sluice computes with these integers as stored: each row becomes llama.cpp Q8_0 blocks of 32
values that all carry the row's scale (the int8 values unchanged; the scale stored in fp16,
exact for a bf16 scale within fp16's range, else rounded by at most 2^-11 relative, which is
logged), run by `GgufBlockLinearMethod` with int8 activations — the kernels of `--quantization
int8` (`sluice.model.int8_quant`: on a CPU with AVX512-VNNI `vpdpbusd` at every step, the fused
decode stack included). Activations are quantized per 32 values at run time (llama.cpp's Q8_0
rule, finer than the checkpoint's per-token scales; int8_quant's doc has the measurements
behind that choice), which is logged once.

Which layers: those whose checkpoint tensors come with a `weight_scale`. A fused layer (q/k/v,
gate/up) is kept in int8 when all its parts are; parts stored differently are a ModelLoadError.
Dequantized exactly instead (W as float32, then the model's dtype): with `--quantization
none`, where the kernels do not run (no C++ operators, another device, 16-bit compute), with
LoRA enabled (adapters need float base weights), for a layer whose local in_features is not a
multiple of 32 (a row-parallel shard), and for quantized tensors outside the decoder's linear
layers (an LM head). Every choice is logged in one line.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from sluice.errors import ModelLoadError
from sluice.model.gguf_quant import use_block_method
from sluice.model.int8_quant import INT8_BLOCK_TYPE
from sluice.model.layers.gguf_linear import BLOCK_TYPES, GgufBlockLinearMethod
from sluice.model.layers.linear import LazyTensor, LinearBase, materialize

logger = logging.getLogger(__name__)

SCALE_SUFFIX = ".weight_scale"
WEIGHT_SUFFIX = ".weight"
Q8_0 = BLOCK_TYPES[INT8_BLOCK_TYPE]


def read_weight_scales(files: list[Path]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """(every tensor name of the safetensors `files`, HF weight name ('...q_proj.weight') ->
    its float32 scales [out] (per channel) or [1] (per tensor), from its `*.weight_scale`)."""
    from safetensors import safe_open

    names, scales = [], {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                names.append(name)
                if name.endswith(SCALE_SUFFIX):
                    scale = f.get_tensor(name).to(torch.float32).reshape(-1)
                    scales[name[:-len(SCALE_SUFFIX)] + WEIGHT_SUFFIX] = scale
    return names, scales


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 W = q * scale (per row, or one scale for all rows): exact, an int8 times a
    16-bit scale fits float32's 24-bit significand (a float32 scale: one rounding)."""
    return q.to(torch.float32) * scale.reshape(-1, 1)


def q8_0_rows(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, float]:
    """int8 [N, K] (K a multiple of 32) and scales [N] or [1] -> (uint8 Q8_0 blocks [N, K / 32
    * 34] whose values are q and whose every block of row n carries fp16(scale[n]), the largest
    relative change of a scale by that rounding). ModelLoadError where a scale does not fit
    fp16 (overflow, or a nonzero scale that rounds to zero)."""
    n, k = q.shape
    scale = scale.to(torch.float32).reshape(-1).expand(n)
    half = scale.to(torch.float16)
    bad = ~torch.isfinite(half) | ((half == 0) & (scale != 0))
    if bool(bad.any()):
        raise ModelLoadError(f"int8 weight scale {scale[bad][0].item():g} does not fit the fp16 "
                             "scale of a Q8_0 block.")
    err = ((half.to(torch.float32) - scale).abs() / scale.abs().clamp_min(1e-30)).max().item()
    blocks = torch.empty(n, k // Q8_0.block_elems, Q8_0.block_bytes, dtype=torch.uint8)
    blocks[:, :, :2] = half.view(torch.uint8).view(n, 1, 2)    # little-endian fp16 d
    blocks[:, :, 2:] = q.contiguous().view(torch.uint8).view(n, -1, Q8_0.block_elems)
    return blocks.view(n, -1), err


def keep_int8_layers(model: nn.Module, names: list[str], scales: dict[str, torch.Tensor],
                     method: GgufBlockLinearMethod | None, dtype: torch.dtype) -> frozenset[str]:
    """Give the decoder linear layers whose checkpoint weights (among `names`) are all int8
    (they have scales) `method` (Q8_0 blocks; None: keep none); returns the HF weight names to
    load as blocks. ModelLoadError for a fused layer whose parts are stored differently."""
    sources: dict[str, list[str]] = defaultdict(list)   # our weight name -> HF weight names
    for hf in names:
        if hf.endswith(WEIGHT_SUFFIX):
            target, _ = model.map_checkpoint_name(hf)
            sources[target].append(hf)
    kept: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase):
            continue
        parts = sources.get(f"{name}.weight", [])
        int8_parts = [p for p in parts if p in scales]
        if int8_parts and len(int8_parts) != len(parts):
            raise ModelLoadError(f"{name}: the checkpoint stores {sorted(int8_parts)} in int8 "
                                 f"but {sorted(set(parts) - set(int8_parts))} in float; the "
                                 "parts of a fused layer must be all int8 or all float.")
        if not int8_parts or method is None or module.in_features % Q8_0.block_elems:
            continue
        use_block_method(module, method, dtype)
        kept.update(parts)
    return frozenset(kept)


def int8_checkpoint_weights(model: nn.Module, files: list[Path], weights: Callable[
        [torch.dtype], Iterator[tuple[str, torch.Tensor | LazyTensor]]], keep: bool,
        ops: ModuleType | None, dtype: torch.dtype, bf16_products: bool
        ) -> Callable[[torch.dtype], Iterator[tuple[str, torch.Tensor | LazyTensor]]]:
    """Prepare `model` for an int8 checkpoint (module doc) and return the weight source to load
    it from: `weights` (the safetensors iterator) with each int8 weight turned into Q8_0 blocks
    for a layer that keeps them (`keep`: the kernels run here and the mode allows it) or into
    float32, and the scale tensors consumed."""
    names, scales = read_weight_scales(files)
    method = (GgufBlockLinearMethod(ops, INT8_BLOCK_TYPE, int8_activations=True,
                                    bf16_products=bf16_products) if keep else None)
    kept = keep_int8_layers(model, names, scales, method, dtype)
    logger.info("int8 checkpoint (compressed-tensors W8A8): %d of %d int8 weights computed in "
                "int8 (Q8_0 blocks, activations quantized per 32 values at run time), %d "
                "dequantized to %s%s.", len(kept), len(scales), len(scales) - len(kept), dtype,
                "" if keep else " (--quantization none, LoRA, or no int8 kernels here)")
    worst = [0.0]

    def source(load_dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor | LazyTensor]]:
        for name, tensor in weights(load_dtype):
            if name.endswith(SCALE_SUFFIX):
                continue
            if name not in scales:
                yield name, tensor
                continue
            q = materialize(tensor)
            if q.dtype != torch.int8:
                raise ModelLoadError(f"{name}: an int8 checkpoint weight (it has a "
                                     f"{SCALE_SUFFIX}) stored as {q.dtype}, not int8.")
            if name in kept:
                blocks, err = q8_0_rows(q, scales[name])
                worst[0] = max(worst[0], err)
                yield name, blocks
            else:
                yield name, dequantize_int8(q, scales[name])
        if worst[0] > 0:
            logger.info("int8 checkpoint: weight scales rounded to fp16 for the Q8_0 blocks "
                        "(largest relative change %.2g).", worst[0])

    return source
