"""Checkpoints stored quantized in vLLM's compressed-tensors format
(`hf_config.CheckpointQuantization`): int8 W8A8 and int4 W4A16, as llm-compressor writes them.

Each quantized linear layer X is stored with `X.weight_scale` and either

    W8A8: X.weight int8 [out, in];  scale [out, 1] (per channel) or [1] (per tensor)
    W4A16: X.weight_packed int32 [out, in / 8], eight values per int32 (value 8j + i in bits
          4i .. 4i + 3, stored as q + 8), X.weight_shape [2];  scale [out, in / group_size]
          (per group) or [out, 1] (per channel); asymmetric ones also X.weight_zero_point
          int32 [out / 8, groups], packed the same way along the output dimension

    W[n, k] = (q[n, k] - z[n, k / group]) * scale[n, k / group]    (symmetric: z = 0)

`read` turns these files into a `quantized_checkpoint.StoredQuantization` (q in [-8, 7] for
int4: the stored value minus 8; zero points z likewise; per-tensor scales as [1, 1]), and
`quantized_checkpoint.quantized_weight_source` keeps each row as llama.cpp blocks of 32 values
-- Q8_0 for int8 (the values unchanged), Q4_0 for int4 (whose nibble is exactly the stored
q + 8), Q4_1 with zero points -- run by `GgufBlockLinearMethod`, the kernels GGUF files run:
* W8A8: int8 activations, quantized per 32 values at run time (llama.cpp's Q8_0 rule, finer
  than the checkpoint's per-token scales; `sluice.model.int8_quant` has the measurements), on a
  x86 CPU with AVX2 or AVX512-VNNI `vpdpbusd` at every step;
* W4A16: by default (and under `--quantization int8`) int8 activations too, llama.cpp's Q4_0
  numerics as for a GGUF file's blocks (`gguf_quant.llama_cpp_numerics`: W1 on SmolLM2 ~3.5x
  the float activations', held-out perplexity +0.5%); `--quantization compressed-tensors`
  keeps the scheme's float activations (the blocks dequantized inside the kernels; results
  equal the float model on W up to summation order).

Activation order: `actorder` 'weight' / 'static' changed only the calibration (read as
without); 'group' / 'dynamic' stores X.weight_g_idx int32 [in], each input's group: where that
is not runs of inputs, a layer keeps its blocks over the inputs sorted by group
(`layers/act_order_linear.py`), or is dequantized exactly where the order does not fit blocks
(W[n, k] = (q - z) * s of group g_idx[k]; vLLM 0.32 refuses such checkpoints).

Which layers: those whose checkpoint weight comes with a `weight_scale`; a fused layer (q/k/v,
gate/up) keeps its blocks when all its parts are quantized alike (quantized_checkpoint's rules
for what is dequantized instead).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sluice.errors import ModelLoadError
from sluice.hf_config import CheckpointQuantization
from sluice.model.layers.linear import LazyTensor, materialize
from sluice.model.quantized_checkpoint import (WEIGHT_SUFFIX, StoredQuantization,
                                               ordered_groups, unpack_columns)

SCALE_SUFFIX = ".weight_scale"
PACKED_SUFFIX = ".weight_packed"
SHAPE_SUFFIX = ".weight_shape"
ZERO_POINT_SUFFIX = ".weight_zero_point"  # asymmetric int4; all zeros in a symmetric
                                          # checkpoint (some writers save them): checked
G_IDX_SUFFIX = ".weight_g_idx"            # actorder 'group': each input's group
#: (scheme, symmetric) -> the GGML block type its rows become
BLOCK_TYPE_OF = {("w8a8-int8", True): "Q8_0", ("w4a16-int4", True): "Q4_0",
                 ("w4a16-int4", False): "Q4_1"}


def read(files: list[Path], scheme: CheckpointQuantization) -> StoredQuantization:
    """The checkpoint's quantized weights (module doc) as a StoredQuantization: scales and zero
    points read now, values unpacked as the weights stream. A symmetric checkpoint's zero
    points must be 0 (some writers save them; they are checked and dropped)."""
    from safetensors import safe_open

    names, scales, zeros, consumed, g_idx = [], {}, {}, set(), {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith((SCALE_SUFFIX, SHAPE_SUFFIX, ZERO_POINT_SUFFIX, G_IDX_SUFFIX)):
                    consumed.add(name)
                if name.endswith(G_IDX_SUFFIX):
                    g_idx[name[:-len(G_IDX_SUFFIX)] + WEIGHT_SUFFIX] = f.get_tensor(name)
                    continue
                if name.endswith(ZERO_POINT_SUFFIX):
                    zero = f.get_tensor(name)
                    if scheme.symmetric and bool(zero.any()):
                        raise ModelLoadError(f"{name}: a nonzero zero point in a checkpoint "
                                             "declared symmetric.")
                    if not scheme.symmetric:
                        zeros[name[:-len(ZERO_POINT_SUFFIX)] + WEIGHT_SUFFIX] = unpack_int4(
                            zero.t().contiguous(), zero.shape[0] * 8).t()
                    continue
                names.append(weight_name(name))
                if name.endswith(SCALE_SUFFIX):
                    scale = f.get_tensor(name).to(torch.float32)
                    scale = scale.reshape(scale.shape[0] if scale.dim() else 1, -1)
                    scales[name[:-len(SCALE_SUFFIX)] + WEIGHT_SUFFIX] = scale

    def values(stored: str, tensor: torch.Tensor | LazyTensor
               ) -> tuple[str, torch.Tensor] | None:
        name = weight_name(stored)
        if name not in scales or stored in consumed:
            return None
        q = _values(stored, materialize(tensor), scheme)
        if not scheme.symmetric and name not in zeros:
            raise ModelLoadError(f"{stored}: no {ZERO_POINT_SUFFIX} in an asymmetric "
                                 "checkpoint.")
        return name, q

    groups = {name: order for name, order in
              ((name, ordered_groups(name, g_idx[name], scales[name].shape[1]))
               for name in g_idx if name in scales) if order is not None}
    return StoredQuantization(f"compressed-tensors {scheme.scheme}",
                              BLOCK_TYPE_OF[scheme.scheme, scheme.symmetric],
                              names, scales, values, zeros=zeros, group_of_input=groups,
                              consumed=consumed)


def weight_name(name: str) -> str:
    """The HF weight name a stored tensor holds ('X.weight_packed' -> 'X.weight')."""
    return name[:-len(PACKED_SUFFIX)] + WEIGHT_SUFFIX if name.endswith(PACKED_SUFFIX) else name


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 [out, in / 8] of a pack-quantized weight -> its int8 values q [out, in] in
    [-8, 7] (module doc: value 8j + i in bits 4i .. 4i + 3, stored as q + 8)."""
    return (unpack_columns(packed, 4)[:, :in_features] - 8).to(torch.int8)


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
