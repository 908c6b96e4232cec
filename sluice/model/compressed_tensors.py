"""Checkpoints stored quantized in vLLM's compressed-tensors format
(`hf_config.CheckpointQuantization`): int8 W8A8 and int4 W4A16, as llm-compressor writes them.

Each quantized linear layer X is stored with `X.weight_scale` and either

    W8A8: X.weight int8 [out, in];  scale [out, 1] (per channel) or [1] (per tensor)
    W4A16: X.weight_packed int32 [out, in / 8], eight values per int32 (value 8j + i in bits
          4i .. 4i + 3, stored as q + 8), X.weight_shape [2];  scale [out, in / group_size]
          (per group) or [out, 1] (per channel); asymmetric ones also X.weight_zero_point
          int32 [out / 8, groups], packed the same way along the output dimension

    W[n, k] = (q[n, k] - z[n, k / group]) * scale[n, k / group]    (symmetric: z = 0)

sluice computes with these integers as stored: each row becomes llama.cpp blocks of 32 values
that carry their group's scale — Q8_0 for int8 (the values unchanged), Q4_0 for int4 (whose
nibble is exactly the stored q + 8; Q4_1 with zero points, d = scale and min m = -(8 + z) *
scale) — with d and m in fp16 (d exact for a bf16 or fp16 scale within fp16's range, else
rounded by at most 2^-11 relative; m rounded by at most 2^-11 of itself, under 0.01 of a step:
the largest change is logged). The layers take
`GgufBlockLinearMethod` of that type, the kernels GGUF files run:
* W8A8: int8 activations, quantized per 32 values at run time (llama.cpp's Q8_0 rule, finer
  than the checkpoint's per-token scales; `sluice.model.int8_quant` has the measurements), on a
  CPU with AVX512-VNNI `vpdpbusd` at every step;
* W4A16: by default (and under `--quantization int8`) int8 activations too, llama.cpp's Q4_0
  numerics as for a GGUF file's blocks (`gguf_quant.llama_cpp_numerics`: W1 on SmolLM2 ~3.5x
  the float activations', held-out perplexity +0.5%); `--quantization compressed-tensors`
  keeps the scheme's float activations (the blocks dequantized inside the kernels; results
  equal the float model on W up to summation order).

Which layers: those whose checkpoint weight comes with a `weight_scale`. A fused layer (q/k/v,
gate/up) keeps its blocks when all its parts are quantized alike; parts stored differently are a
ModelLoadError. Dequantized exactly instead (W in float32, then the model's dtype): with
`--quantization none`, where the kernels do not run (no C++ operators, another device, 16-bit
compute), with LoRA enabled (adapters need float base weights), for a layer whose local
in_features is not a multiple of 32 (a row-parallel shard), and for quantized tensors outside
the decoder's linear layers (an LM head). Every choice is logged in one line.
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
from sluice.hf_config import CheckpointQuantization
from sluice.model.gguf_quant import use_block_method
from sluice.model.layers.gguf_linear import BLOCK_TYPES, GgufBlockLinearMethod
from sluice.model.layers.linear import LazyTensor, LinearBase, materialize

logger = logging.getLogger(__name__)

WeightSource = Callable[[torch.dtype], Iterator[tuple[str, torch.Tensor | LazyTensor]]]

SCALE_SUFFIX = ".weight_scale"
PACKED_SUFFIX = ".weight_packed"
SHAPE_SUFFIX = ".weight_shape"
ZERO_POINT_SUFFIX = ".weight_zero_point"  # asymmetric int4; all zeros in a symmetric
                                          # checkpoint (some writers save them): checked
WEIGHT_SUFFIX = ".weight"
#: (scheme, symmetric) -> the GGML block type its rows become
BLOCK_TYPE_OF = {("w8a8-int8", True): "Q8_0", ("w4a16-int4", True): "Q4_0",
                 ("w4a16-int4", False): "Q4_1"}
BLOCK = 32  # values per block (Q8_0 and Q4_0)


def read_quantization_tensors(files: list[Path], symmetric: bool = True
                       ) -> tuple[list[str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(every tensor name of the safetensors `files` but zero points; HF weight name
    ('...q_proj.weight') -> its float32 scales [out, groups] ([1, 1] per tensor), from its
    `*.weight_scale`; the same -> its int8 zero points [out, groups] (asymmetric: unpacked
    from int32 along the output dimension)). A symmetric checkpoint's zero points must be 0."""
    from safetensors import safe_open

    names, scales, zeros = [], {}, {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(ZERO_POINT_SUFFIX):
                    zero = f.get_tensor(name)
                    if symmetric and bool(zero.any()):
                        raise ModelLoadError(f"{name}: a nonzero zero point in a checkpoint "
                                             "declared symmetric.")
                    if not symmetric:
                        zeros[name[:-len(ZERO_POINT_SUFFIX)] + WEIGHT_SUFFIX] = unpack_int4(
                            zero.t().contiguous(), zero.shape[0] * 8).t()
                    continue
                names.append(name)
                if name.endswith(SCALE_SUFFIX):
                    scale = f.get_tensor(name).to(torch.float32)
                    scale = scale.reshape(scale.shape[0] if scale.dim() else 1, -1)
                    scales[name[:-len(SCALE_SUFFIX)] + WEIGHT_SUFFIX] = scale
    return names, scales, zeros


def weight_name(name: str) -> str:
    """The HF weight name a stored tensor holds ('X.weight_packed' -> 'X.weight')."""
    return name[:-len(PACKED_SUFFIX)] + WEIGHT_SUFFIX if name.endswith(PACKED_SUFFIX) else name


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 [out, in / 8] of a pack-quantized weight -> its int8 values q [out, in] in
    [-8, 7] (module doc: value 8j + i in bits 4i .. 4i + 3, stored as q + 8)."""
    nibbles = torch.stack([(packed >> (4 * i)) & 0xF for i in range(8)], dim=-1)
    return (nibbles.reshape(packed.shape[0], -1)[:, :in_features] - 8).to(torch.int8)


def group_scales(scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """float32 [n, k / 32]: the value (scale or zero point) of each 32-value block of an [n, k]
    weight, from per-group values [n or 1, groups] (groups dividing k into runs of a multiple
    of 32)."""
    if scale.shape[0] not in (1, n) or (k // BLOCK) % scale.shape[1]:
        raise ModelLoadError(f"{scale.shape[1]} scale groups do not split {k} inputs into "
                             f"whole 32-value blocks (scales {tuple(scale.shape)} for a weight "
                             f"[{n}, {k}]).")
    return scale.expand(n, -1).repeat_interleave(k // BLOCK // scale.shape[1], dim=1)


def dequantize(q: torch.Tensor, scale: torch.Tensor,
               zero: torch.Tensor | None = None) -> torch.Tensor:
    """float32 W = (q - its group's zero point) * its group's scale: exact (a small integer
    times a 16-bit scale fits float32's significand; a float32 scale: one rounding)."""
    n, k = q.shape
    values = q.to(torch.float32)
    if zero is not None:
        z = group_scales(zero.to(torch.float32), n, k)
        values = values - z.repeat_interleave(BLOCK, dim=1)
    return values * group_scales(scale, n, k).repeat_interleave(BLOCK, dim=1)


def _fp16(values: torch.Tensor, what: str) -> tuple[torch.Tensor, float]:
    """(values in fp16, the largest change of a value by that rounding, relative to it);
    ModelLoadError naming `what` for a value fp16 cannot hold (overflow, or nonzero -> 0)."""
    half = values.to(torch.float16)
    bad = ~torch.isfinite(half) | ((half == 0) & (values != 0))
    if bool(bad.any()):
        raise ModelLoadError(f"weight {what} {values[bad][0].item():g} does not fit the fp16 "
                             f"{what} of a block.")
    err = ((half.to(torch.float32) - values).abs() / values.abs().clamp_min(1e-30)).max()
    return half, err.item()


def to_blocks(q: torch.Tensor, scale: torch.Tensor, qtype: str,
              zero: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """int8 values q [N, K] (K a multiple of 32; int4 ones in [-8, 7] for Q4_0 / Q4_1), their
    scales and (Q4_1) zero points -> (uint8 blocks [N, K / 32 * bytes] of `qtype` whose values
    are q, the largest relative change of a scale or min by fp16 rounding):
        Q8_0: fp16 d + 32 int8;  Q4_0: fp16 d + 16 bytes, byte j holding q_j + 8 low and
        q_(j+16) + 8 high;  Q4_1: fp16 d, fp16 m = -(8 + z) * d, then Q4_0's 16 bytes
    with d the block's scale. ModelLoadError where a scale or min does not fit fp16."""
    n, k = q.shape
    scale = group_scales(scale, n, k)
    half, err = _fp16(scale, "scale")
    block_type = BLOCK_TYPES[qtype]
    blocks = torch.empty(n, k // BLOCK, block_type.block_bytes, dtype=torch.uint8)
    blocks[:, :, :2] = half.contiguous().view(torch.uint8).view(n, -1, 2)  # little-endian d
    values = q.contiguous().view(n, -1, BLOCK)
    if qtype == "Q8_0":
        blocks[:, :, 2:] = values.view(torch.uint8)
        return blocks.view(n, -1), err
    start = 2
    if qtype == "Q4_1":
        mins = -(8 + group_scales(zero.to(torch.float32), n, k)) * scale
        half_min, min_err = _fp16(mins, "min")
        blocks[:, :, 2:4] = half_min.contiguous().view(torch.uint8).view(n, -1, 2)
        err, start = max(err, min_err), 4
    u = (values + 8).to(torch.uint8)
    blocks[:, :, start:] = u[:, :, :16] | (u[:, :, 16:] << 4)
    return blocks.view(n, -1), err


def keep_block_layers(model: nn.Module, names: list[str], scales: dict[str, torch.Tensor],
                      method: GgufBlockLinearMethod | None, dtype: torch.dtype
                      ) -> frozenset[str]:
    """Give the decoder linear layers whose checkpoint weights (among `names`) are all
    quantized (they have scales) `method` (None: keep none); returns the HF weight names to
    load as blocks. ModelLoadError for a fused layer whose parts are stored differently."""
    sources: dict[str, list[str]] = defaultdict(list)   # our weight name -> HF weight names
    for stored in names:
        hf = weight_name(stored)
        if hf.endswith(WEIGHT_SUFFIX):
            target, _ = model.map_checkpoint_name(hf)
            sources[target].append(hf)
    kept: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase):
            continue
        parts = sources.get(f"{name}.weight", [])
        quantized = [p for p in parts if p in scales]
        if quantized and len(quantized) != len(parts):
            raise ModelLoadError(f"{name}: the checkpoint stores {sorted(quantized)} quantized "
                                 f"but {sorted(set(parts) - set(quantized))} in float; the "
                                 "parts of a fused layer must be stored alike.")
        if not quantized or method is None or module.in_features % BLOCK:
            continue
        use_block_method(module, method, dtype)
        kept.update(quantized)
    return frozenset(kept)


def compressed_weights(model: nn.Module, scheme: CheckpointQuantization, files: list[Path],
                       weights: WeightSource, keep: bool, int8_activations: bool,
                       ops: ModuleType | None, dtype: torch.dtype,
                       bf16_products: bool) -> WeightSource:
    """Prepare `model` for a compressed-tensors checkpoint (module doc) and return the weight
    source to load it from: `weights` (the safetensors iterator) with each quantized weight
    turned into blocks for a layer that keeps them (`keep`: the kernels run here and the mode
    allows it; `int8_activations`: the W4A16 layers' too, W8A8's always) or into float32, and
    the scale and shape tensors consumed."""
    qtype = BLOCK_TYPE_OF[scheme.scheme, scheme.symmetric]
    int8 = int8_activations or scheme.scheme == "w8a8-int8"
    names, scales, zeros = read_quantization_tensors(files, scheme.symmetric)
    method = GgufBlockLinearMethod(ops, qtype, int8_activations=int8,
                                   bf16_products=bf16_products) if keep else None
    kept = keep_block_layers(model, names, scales, method, dtype)
    logger.info("compressed-tensors %s checkpoint: %d of %d quantized weights kept as %s "
                "blocks (%s activations), %d dequantized to %s%s.", scheme.scheme, len(kept),
                len(scales), qtype, "int8 per-32-value" if int8 else "float",
                len(scales) - len(kept), dtype,
                "" if keep else " (--quantization none, LoRA, or no block kernels here)")
    worst = [0.0]

    def source(load_dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor | LazyTensor]]:
        for stored, tensor in weights(load_dtype):
            if stored.endswith((SCALE_SUFFIX, SHAPE_SUFFIX, ZERO_POINT_SUFFIX)):
                continue
            name = weight_name(stored)
            if name not in scales:
                yield stored, tensor
                continue
            q = _values(stored, materialize(tensor), scheme)
            zero = zeros.get(name)
            if zero is not None:
                zero = zero[:q.shape[0]]          # the packing pads rows to a multiple of 8
            if not scheme.symmetric and zero is None:
                raise ModelLoadError(f"{stored}: no {ZERO_POINT_SUFFIX} in an asymmetric "
                                     "checkpoint.")
            if name in kept:
                blocks, err = to_blocks(q, scales[name], qtype, zero)
                worst[0] = max(worst[0], err)
                yield name, blocks
            else:
                yield name, dequantize(q, scales[name], zero)
        if worst[0] > 0:
            logger.info("compressed-tensors checkpoint: weight scales / mins rounded to fp16 "
                        "for the blocks (largest relative change %.2g).", worst[0])

    return source


def _values(stored: str, tensor: torch.Tensor, scheme: CheckpointQuantization) -> torch.Tensor:
    """The int8 values [out, in] of a stored quantized weight (checked against the scheme)."""
    if scheme.scheme == "w8a8-int8":
        if tensor.dtype != torch.int8:
            raise ModelLoadError(f"{stored}: a W8A8 weight (it has a {SCALE_SUFFIX}) stored as "
                                 f"{tensor.dtype}, not int8.")
        return tensor
    if not stored.endswith(PACKED_SUFFIX) or tensor.dtype != torch.int32:
        raise ModelLoadError(f"{stored}: a W4A16 checkpoint stores its quantized weights as "
                             f"int32 `{PACKED_SUFFIX}`, not {tensor.dtype} `{stored}`.")
    return unpack_int4(tensor, tensor.shape[1] * 8)
