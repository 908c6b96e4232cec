"""Load a checkpoint stored quantized (`CheckpointQuantization`: compressed-tensors, GPTQ, AWQ)
with its integers kept: the part shared by every format.

A format's reader (`compressed_tensors.read`, `gptq_awq.read`) turns its files into a
`StoredQuantization`: for each quantized linear weight W [out, in] (by its HF name
'...X.weight') the integer values q, per-group scales s and (asymmetric) zero points z, so that

    W[n, k] = (q[n, k] - z[n, g(k)]) * s[n, g(k)]     (symmetric: z = 0)

with g(k) = k // (in / groups) (groups are runs of inputs) or, for GPTQ's activation order, a
per-input group index (then a kept layer stores W[:, order], its inputs sorted by group, and
gathers its activations in that order: `layers/act_order_linear.py`). Scales, zero points and
group indexes are read up front (they are small); each weight's integers are unpacked as the
weight streams past.

`quantized_weight_source` then gives the decoder's linear layers whose weights are all
quantized a `GgufBlockLinearMethod` of the reader's block type and yields their rows as
llama.cpp blocks of 32 values carrying their group's scale:

    Q8_0 (int8 values, |q| <= 128): fp16 d = s, the values unchanged;
    Q4_0 (int4 values in [-8, 7]): fp16 d = s, nibble q + 8;
    Q4_1 (int4 values with zero points): fp16 d = s, fp16 min m = -(8 + z) * s, nibble q + 8

(d exact for a bf16 or fp16 scale within fp16's range, else rounded by at most 2^-11
relative; m rounded by at most 2^-11 of itself, under 0.01 of a step: the largest change is
logged). Every other quantized weight -- no block type for the scheme (the reader says None),
`keep` off (`--quantization none`, LoRA, no block kernels here), a layer whose local
in_features is not a whole number of blocks (a row-parallel shard), an activation order that
blocks cannot follow (`act_order_fits`), tensors outside the
decoder's linear layers (an LM head) -- is dequantized exactly to float32 (a small integer
times a 16-bit scale fits float32's significand), then the model's dtype. One log line says
which.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import nn

from sluice.errors import ModelLoadError
from sluice.model.gguf_quant import use_block_method
from sluice.model.layers.act_order_linear import ActOrderBlockLinearMethod, input_order
from sluice.model.layers.gguf_linear import BLOCK_TYPES, F8_BLOCK_TYPE, GgufBlockLinearMethod
from sluice.model.layers.linear import LazyTensor, LinearBase, RowParallelLinear

logger = logging.getLogger(__name__)

WeightSource = Callable[[torch.dtype], Iterator[tuple[str, torch.Tensor | LazyTensor]]]
BLOCK = 32  # values per block (Q8_0, Q4_0, Q4_1)
WEIGHT_SUFFIX = ".weight"


@dataclass
class StoredQuantization:
    """What a format's reader found in a checkpoint (module doc), in one form for all formats.

    `weight_names`: the HF weight name of every stored weight tensor, quantized or not (a
    fused layer's parts must be stored alike). `scales`: HF weight name -> float32 [out,
    groups] ([1, 1] per tensor) for each quantized weight. `zeros`: the same -> its zero points
    [out, groups] (integers; asymmetric schemes only). `group_of_input`: the same -> int64
    [in], each input's group, only where groups are not runs of inputs. `consumed`: stored
    tensor names the reader has used up (scales, zero points, shapes, g_idx): not loaded.
    `values(stored name, tensor)`: for a stored quantized weight, (its HF weight name, its
    values q [out, in] as int8 or int32); None for any other tensor. `block_type`: the GGML
    block type the rows become ('Q8_0', 'Q4_0', 'Q4_1'), None where the integers cannot be
    kept (then every weight is dequantized). `description`: for the log line."""
    description: str
    block_type: str | None
    weight_names: list[str]
    scales: dict[str, torch.Tensor]
    values: Callable[[str, torch.Tensor], tuple[str, torch.Tensor] | None]
    zeros: dict[str, torch.Tensor] = field(default_factory=dict)
    group_of_input: dict[str, torch.Tensor] = field(default_factory=dict)
    consumed: set[str] = field(default_factory=set)
    why_float: str = ""   # why block_type is None, for the log line


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [r, c] holding p = 32 / bits values per word along dim 0 -> int32 [r * p, c]:
    row r * p + i is bits bits*i .. bits*i + bits - 1 of row r (unsigned)."""
    per, mask = 32 // bits, (1 << bits) - 1
    values = torch.stack([(packed >> (bits * i)) & mask for i in range(per)], dim=1)
    return values.reshape(-1, packed.shape[1])


def unpack_columns(packed: torch.Tensor, bits: int,
                   order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 [r, c] holding p = 32 / bits values per word along dim 1 -> int32 [r, c * p]:
    column c * p + j is the value in slot order[j] (default j) of word [r, c] (unsigned)."""
    per, mask = 32 // bits, (1 << bits) - 1
    slots = order or tuple(range(per))
    values = torch.stack([(packed >> (bits * slots[j])) & mask for j in range(per)], dim=2)
    return values.reshape(packed.shape[0], -1)


def group_scales(scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """float32 [n, k / 32]: the value (scale or zero point) of each 32-value block of an [n, k]
    weight, from per-group values [n or 1, groups] (groups dividing k into runs of a multiple
    of 32)."""
    if scale.shape[0] not in (1, n) or (k // BLOCK) % scale.shape[1]:
        raise ModelLoadError(f"{scale.shape[1]} scale groups do not split {k} inputs into "
                             f"whole 32-value blocks (scales {tuple(scale.shape)} for a weight "
                             f"[{n}, {k}]).")
    return scale.expand(n, -1).repeat_interleave(k // BLOCK // scale.shape[1], dim=1)


def run_length(k: int, groups: int) -> int:
    """Inputs per group of k inputs split into `groups` equal runs; ModelLoadError where they
    do not split."""
    if k % groups:
        raise ModelLoadError(f"{groups} scale groups do not split {k} inputs into equal runs.")
    return k // groups


def input_groups(k: int, groups: int) -> torch.Tensor:
    """int64 [k]: the group of each of k inputs split into `groups` equal runs."""
    return torch.arange(k) // run_length(k, groups)


def ordered_groups(name: str, g_idx: torch.Tensor, groups: int) -> torch.Tensor | None:
    """A stored per-input group index (GPTQ `g_idx`, compressed-tensors `weight_g_idx`, named
    `name`) as int64 [in] where it is not `groups` equal runs of inputs (activation order),
    None where it is; ModelLoadError for a group outside 0 .. groups - 1."""
    g_idx = g_idx.to(torch.int64).flatten()
    k = g_idx.numel()
    if k % groups == 0 and torch.equal(g_idx, input_groups(k, groups)):
        return None
    if k and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ModelLoadError(f"{name} names groups outside the weight's {groups} scale groups.")
    return g_idx


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
               group_of_input: torch.Tensor | None = None) -> torch.Tensor:
    """float32 W [n, k] = (q - z[:, g(k)]) * s[:, g(k)] (module doc; `scale` [n or 1, groups],
    g from `group_of_input` or equal runs): exact (a small integer times a 16-bit scale fits
    float32's significand; a float32 scale: one rounding)."""
    n, k = q.shape
    scale = scale.expand(n, -1)
    values = q.to(torch.float32)
    if group_of_input is None:           # equal runs: broadcast over [n, groups, run], no gather
        groups = scale.shape[1]
        values = values.view(n, groups, run_length(k, groups))
        if zero is not None:
            values = values - zero.to(torch.float32).unsqueeze(-1)
        return (values * scale.unsqueeze(-1)).view(n, k)
    g = group_of_input
    if zero is not None:
        values = values - zero.to(torch.float32)[:, g]
    return values * scale[:, g]


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
    """Values q [N, K] (K a multiple of 32; Q8_0 in [-128, 127], Q4_0 / Q4_1 in [-8, 7],
    integers; F8_E4M3 float8_e4m3fn), their scales and (Q4_1) zero points -> (uint8 blocks
    [N, K / 32 * bytes] of `qtype` whose values are q, the largest relative change of a scale
    or min by fp16 rounding):
        Q8_0: fp16 d + 32 int8;  Q4_0: fp16 d + 16 bytes, byte j holding q_j + 8 low and
        q_(j+16) + 8 high;  Q4_1: fp16 d, fp16 m = -(8 + z) * d, then Q4_0's 16 bytes;
        F8_E4M3: float32 d + the 32 e4m3 bytes (d exact: no rounding)
    with d the block's scale. ModelLoadError where a scale or min does not fit fp16."""
    n, k = q.shape
    scale = group_scales(scale, n, k)
    if qtype == F8_BLOCK_TYPE:
        blocks = torch.empty(n, k // BLOCK, BLOCK_TYPES[qtype].block_bytes, dtype=torch.uint8)
        blocks[:, :, :4] = scale.to(torch.float32).contiguous().view(torch.uint8).view(n, -1, 4)
        blocks[:, :, 4:] = q.contiguous().view(torch.uint8).view(n, -1, BLOCK)
        return blocks.view(n, -1), 0.0
    half, err = _fp16(scale, "scale")
    block_type = BLOCK_TYPES[qtype]
    blocks = torch.empty(n, k // BLOCK, block_type.block_bytes, dtype=torch.uint8)
    blocks[:, :, :2] = half.contiguous().view(torch.uint8).view(n, -1, 2)  # little-endian d
    values = q.to(torch.int8).contiguous().view(n, -1, BLOCK)
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


def act_order_fits(module: nn.Module, groups: list[torch.Tensor]) -> str | None:
    """Why the per-input groups of a layer's checkpoint parts (one int64 [in] per fused part)
    cannot run as an `ActOrderBlockLinearMethod` (its inputs sorted by group, every block in
    one group), or None where they can."""
    first = groups[0]
    if any(not torch.equal(first, g) for g in groups[1:]):
        return "its fused parts order their inputs differently"
    sizes = torch.bincount(first)
    if bool((sizes != sizes[0]).any()) or int(sizes[0]) % BLOCK:
        return "its groups are not equal runs of whole 32-value blocks"
    if isinstance(module, RowParallelLinear) and module.tp_size > 1:
        return "a row-parallel shard under tensor parallelism"
    return None


def keep_block_layers(model: nn.Module, stored: StoredQuantization,
                      methods: tuple[GgufBlockLinearMethod, GgufBlockLinearMethod] | None,
                      dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    """Give the decoder linear layers whose checkpoint weights are all quantized (they have
    scales) the first of `methods` (None: keep none), or the second (an
    `ActOrderBlockLinearMethod`) where the parts carry one activation order that blocks can
    follow (`act_order_fits`; else the layer is dequantized); returns the HF weight names to
    load as blocks, each with its input order (None: the stored one). ModelLoadError for a
    fused layer whose parts are stored differently."""
    sources: dict[str, list[str]] = defaultdict(list)   # our weight name -> HF weight names
    for hf in stored.weight_names:
        if hf.endswith(WEIGHT_SUFFIX):
            target, _ = model.map_checkpoint_name(hf)
            sources[target].append(hf)
    kept: dict[str, torch.Tensor | None] = {}
    unordered: Counter[str] = Counter()
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase):
            continue
        parts = sources.get(f"{name}.weight", [])
        quantized = [p for p in parts if p in stored.scales]
        if quantized and len(quantized) != len(parts):
            raise ModelLoadError(f"{name}: the checkpoint stores {sorted(quantized)} quantized "
                                 f"but {sorted(set(parts) - set(quantized))} in float; the "
                                 "parts of a fused layer must be stored alike.")
        if not quantized or methods is None or module.in_features % BLOCK:
            continue
        order = None
        if any(p in stored.group_of_input for p in quantized):
            k = next(stored.group_of_input[p] for p in quantized
                     if p in stored.group_of_input).numel()
            groups = [stored.group_of_input.get(p, input_groups(k, stored.scales[p].shape[1]))
                      for p in quantized]
            why = act_order_fits(module, groups)
            if why is not None:
                unordered[why] += 1
                continue
            order = input_order(groups[0])
        use_block_method(module, methods[order is not None], dtype)
        if order is not None:
            module.input_order.copy_(order)
        kept.update((p, order) for p in quantized)
    for why, count in unordered.items():
        logger.info("%d layers with activation order dequantized: %s.", count, why)
    return kept


def quantized_weight_source(model: nn.Module, stored: StoredQuantization, weights: WeightSource,
                            keep: bool, int8_activations: bool, ops: ModuleType | None,
                            dtype: torch.dtype, bf16_products: bool,
                            why_not_kept: str | None = None) -> WeightSource:
    """Prepare `model` for the checkpoint `stored` describes (module doc) and return the weight
    source to load it from: `weights` (the safetensors iterator) with each quantized weight
    turned into blocks for a layer that keeps them (`keep`: the kernels run here and the mode
    allows it; `int8_activations`: the blocks multiply activations quantized to int8 per 32
    values) or into float32, and the tensors the reader consumed left out. `why_not_kept`:
    the log's reason when `keep` is False (default: the modes and builds without blocks); the
    dequantized weights are logged in the dtype the layers store them in (bfloat16 with
    `bf16_products`: 16-bit weights)."""
    qtype = stored.block_type if keep else None
    methods = (tuple(cls(ops, qtype, int8_activations=int8_activations,
                         bf16_products=bf16_products)
                     for cls in (GgufBlockLinearMethod, ActOrderBlockLinearMethod))
               if qtype else None)
    kept = keep_block_layers(model, stored, methods, dtype)
    stored_dtype = torch.bfloat16 if bf16_products else dtype
    if qtype is None:
        why = (stored.why_float if stored.block_type is None
               else why_not_kept or "--quantization none, LoRA, or no block kernels here")
        logger.info("%s checkpoint: all %d quantized weights dequantized to %s (%s).",
                    stored.description, len(stored.scales), stored_dtype, why)
    else:
        logger.info("%s checkpoint: %d of %d quantized weights kept as %s blocks (%s "
                    "activations), %d dequantized to %s.", stored.description, len(kept),
                    len(stored.scales), qtype,
                    "int8 per-32-value" if int8_activations else "float",
                    len(stored.scales) - len(kept), stored_dtype)
    worst = [0.0]

    def source(load_dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor | LazyTensor]]:
        for name, tensor in weights(load_dtype):
            if name in stored.consumed:
                continue
            found = stored.values(name, tensor)
            if found is None:
                yield name, tensor
                continue
            hf, q = found
            zero = stored.zeros.get(hf)
            if zero is not None:
                zero = zero[:q.shape[0]]          # packings pad rows to a multiple of 8
            if hf in kept:
                order = kept[hf]
                if order is not None:
                    q = q.index_select(1, order)      # W[:, order]: each group a run
                blocks, err = to_blocks(q, stored.scales[hf], qtype, zero)
                worst[0] = max(worst[0], err)
                yield hf, blocks
            else:
                yield hf, dequantize(q, stored.scales[hf], zero, stored.group_of_input.get(hf))
        if worst[0] > 0:
            logger.info("%s checkpoint: weight scales / mins rounded to fp16 for the blocks "
                        "(largest relative change %.2g).", stored.description, worst[0])

    return source

