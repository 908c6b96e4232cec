"""Which linear layers of a GGUF model keep the file's quantized blocks (`--quantization`).

`keep_gguf_blocks(model, gguf_file, mode, ops, dtype, device, lora_enabled)` runs after the
model is built and before its weights load. For every linear layer (`LinearBase`: the decoder
projections) it collects the GGUF tensors that fill its weight (q/k/v, gate/up fused ones
included) and keeps the blocks when

* they share one type of `gguf_linear.BLOCK_TYPES` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K,
  Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS), and
* the layer's local `in_features` is a whole number of blocks (a row-parallel shard under
  tensor parallelism must start on a block boundary; column shards split rows, never blocks),
* and, for `gguf_linear.PACKED_ONLY_TYPES` (Q2_K, Q3_K, IQ4_NL, IQ4_XS), the layer will be packed
  for the int8 kernel (int8 activations on an x86 CPU with AVX2, whole 16-row tiles): their
  blocks have no other fast kernel, so elsewhere (`--quantization gguf`, another CPU) they are
  dequantized at load.

A linear layer stored in one of `DEQUANTIZED_TYPES` (IQ1_S .. IQ3_S, TQ1_0 / TQ2_0, MXFP4,
NVFP4, Q1_0: no block kernels of their own) is dequantized at load; where int8 activations
run it at every step anyway (default mode or 'int8', the packed int8 kernel, whole 16-row tiles,
whole blocks of the type it runs as) it gets blocks of a kernel type instead, as it streams in:

* `gguf_transcode`'s exact re-encoding where every tensor of the layer has one, and the same
  one (TQ1_0 / TQ2_0 -> Q2_K, IQ3_S -> Q5_K, IQ3_XXS / IQ1_S / IQ1_M -> Q6_K, MXFP4 -> Q5_0,
  Q1_0 -> Q4_0, each where the tensor's block scales fit the target's fp16 field):
  `iterate_gguf(..., transcode=)`, the same values bit for bit at 2.6-6.6 bits per weight;
* else its dequantized rows quantized again to Q8_0 blocks (`iterate_gguf(..., requantize=)`):
  8.5 bits per weight instead of 32, for an error per weight (< 1/254 of its block's largest)
  far below the stored type's own (IQ2_XXS / IQ2_XS / IQ2_S, NVFP4, mixed layers).

Either way the int8 kernel runs instead of sgemm. `--quantization gguf` keeps them exact (float).

Such a layer gets a `GgufBlockLinearMethod` of the type it runs as (its weight re-created as
uint8 blocks). The token embedding and the LM head follow the same rule on their own tensors
(`token_embd`, `output`; a tied head is the embedding's): an embedding over blocks dequantizes
the rows it looks up, a head over blocks computes its logits with the method (the greedy
screen, which needs a float head, steps aside). Every other tensor is dequantized to `dtype`
at load as before. Returns a `GgufLoadPlan`: the HF tensor names to be read as raw blocks
(`gguf_weights.iterate_gguf(..., keep_quantized=)`), those transcoded (with their target type)
and those requantized to Q8_0, and logs one line naming the types kept quantized, transcoded,
requantized and dequantized.

Modes (`ModelConfig.quantization`):
    None (default)  keep blocks where sluice's C++ kernels run them: layer ops 'cpu' (the
                    operators built), float32, CPU; else dequantize everything. The kept
                    blocks compute with int8 activations (`llama_cpp_numerics`): on an x86
                    CPU with AVX2 or AVX512-VNNI at every step (the packed kernel), elsewhere
                    in calls of up to 8 rows (decode), more rows with float activations
    'gguf'          keep blocks whatever the layer ops (without the C++ operators the products
                    run the pure-torch reference, which dequantizes per call: slow), always
                    with float activations (the blocks' exact dequantization times x)
    'none'          dequantize everything (the float path)
    'int8'          as None, and the kept blocks (linear layers, embedding lookups aside,
                    LM head) compute with int8 activations in decode steps
                    (`GgufBlockLinearMethod.int8_activations`, llama.cpp's dot products) and
                    every kept type with bf16 products for more rows (`bf16_products`); the
                    loader then quantizes the linear layers left float to Q8_0
                    (`sluice.model.int8_quant`)
The loader passes `bf16_products` for `--dtype bfloat16` (see gguf_linear's module doc).
With LoRA enabled nothing is kept (the adapters' slots take the base weight's float dtype).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn

from sluice.errors import ConfigError
from sluice.model.gguf_transcode import target_type
from sluice.model.layers.gguf_linear import BLOCK_TYPES, PACKED_ONLY_TYPES, GgufBlockLinearMethod
from sluice.model.layers.linear import LinearBase
from sluice.model.layers.linear_method import set_weight_loader
from sluice.model_spec.gguf import (DEQUANTIZED_TYPES, NON_WEIGHT_TENSORS, gguf_reader,
                                    hf_tensor_name)

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor

logger = logging.getLogger(__name__)

QUANTIZATION_MODES = (None, "gguf", "none", "int8")
REQUANTIZED_TYPE = "Q8_0"
"""What a linear layer stored in one of DEQUANTIZED_TYPES runs as where int8 activations run."""


@dataclass(frozen=True)
class GgufLoadPlan:
    """How `iterate_gguf` reads a GGUF file's weights: HF names kept as the file's raw blocks,
    those re-encoded exactly as blocks of another type (name -> that type), and those
    dequantized then quantized to REQUANTIZED_TYPE blocks; every other tensor is dequantized to
    the model's dtype."""

    kept: frozenset[str] = field(default_factory=frozenset)
    requantized: frozenset[str] = field(default_factory=frozenset)
    transcoded: Mapping[str, str] = field(default_factory=dict)


def gguf_tensor_types(gguf_file: str | Path | GGUFReader) -> dict[str, str]:
    """HF tensor name -> GGUF type name (e.g. 'Q4_1') of every weight in the file (a path or
    an open reader; header only, no tensor data is read)."""
    reader = gguf_reader(gguf_file)
    types = {}
    for t in reader.tensors:
        name = hf_tensor_name(t.name) if t.name not in NON_WEIGHT_TENSORS else None
        if name is not None:
            types[name] = t.tensor_type.name
    return types


def blocks_wanted(mode: str | None, ops: ModuleType | None, dtype: torch.dtype,
                  device: torch.device, lora_enabled: bool) -> bool:
    """Whether quantized weights (a GGUF file's, a compressed-tensors checkpoint's) keep their
    blocks under `--quantization` `mode`: never for 'none' or with LoRA (adapters need float
    base weights), always for 'gguf', else where the C++ block kernels run (the operators,
    float32 compute, CPU)."""
    if mode not in QUANTIZATION_MODES:
        raise ConfigError(f"--quantization {mode!r} is not supported; choose gguf, none or "
                          "int8 (or leave it unset).")
    if mode == "none":
        return False
    if lora_enabled:
        logger.info("Quantized weights are dequantized to %s: LoRA adapters need float base "
                    "weights.", dtype)
        return False
    if mode == "gguf":
        return True
    return ops is not None and dtype == torch.float32 and device.type == "cpu"


def llama_cpp_numerics(mode: str | None, ops: ModuleType | None) -> bool:
    """Whether the default mode runs the kept blocks of `gguf_linear.INT8_ACTIVATION_TYPES`
    with int8 activations quantized per 32 values, as llama.cpp computes these types (its
    `vec_dot_type` Q8_0 / Q8_1; the k-quants' Q8_K has one scale per 256 values, ours per 32):
    wherever the C++ operators run. On an x86 CPU with AVX2 or AVX512-VNNI every call takes them
    (csrc/vnni_linear.cpp: batched W1 3.7x the float activations' on SmolLM2 Q4_1); elsewhere
    calls of up to 8 rows do (quant_linear.cpp's integer decode kernels: TPOT ~1.3x lower on
    the x86-64-v3 build) and larger ones keep float activations. `--quantization gguf` asks
    for float activations on any CPU."""
    return mode is None and ops is not None


def use_block_method(module: LinearBase, method: GgufBlockLinearMethod,
                     dtype: torch.dtype) -> None:
    """Give the (not yet loaded) linear layer `module` the block `method`: its weight re-created
    as uint8 blocks, its bias (if any) kept in its dtype (else `dtype`), the layer's loader."""
    bias = module.bias
    module.linear_method = method
    method.create_weights(module, module.in_features, module.out_features,
                          bias=bias is not None, dtype=bias.dtype if bias is not None else dtype,
                          weight_loader=module.weight_loader)


def keep_gguf_blocks(model: nn.Module, gguf_file: str | Path | GGUFReader, mode: str | None,
                     ops: ModuleType | None, dtype: torch.dtype, device: torch.device,
                     lora_enabled: bool = False, bf16_products: bool = False) -> GgufLoadPlan:
    """Give the layers that keep their blocks (or are requantized) a `GgufBlockLinearMethod`
    (module doc); returns which HF tensors load as blocks; an empty plan: everything
    dequantized. `bf16_products`: the methods' flag (bf16 products for more rows on AMX), which
    mode 'int8' sets in any case."""
    reader = gguf_reader(gguf_file)
    types = gguf_tensor_types(reader)
    if not blocks_wanted(mode, ops, dtype, device, lora_enabled):
        logger.info("GGUF weights dequantized to %s at load (%s).", dtype, _summary(types))
        return GgufLoadPlan()
    sources: dict[str, list[str]] = defaultdict(list)  # our param name -> HF tensor names
    for hf in types:
        target, _ = model.map_checkpoint_name(hf)
        sources[target].append(hf)
    methods: dict[str, GgufBlockLinearMethod] = {}

    int8 = mode == "int8" or llama_cpp_numerics(mode, ops)

    def method_for(qtype: str) -> GgufBlockLinearMethod:  # one per type
        return methods.setdefault(qtype, GgufBlockLinearMethod(
            ops, qtype, int8, bf16_products or mode == "int8"))

    def packed_as(qtype: str | None, module: LinearBase) -> bool:
        """Whether `module` can run packed `qtype` blocks (whole blocks, whole tiles)."""
        return qtype is not None and module.in_features % BLOCK_TYPES[qtype].block_elems == 0 \
            and method_for(qtype).packs(module.weight.shape[0])

    tensors = {hf_tensor_name(t.name): t for t in reader.tensors
               if t.name not in NON_WEIGHT_TENSORS}
    kept: set[str] = set()
    requantized: set[str] = set()
    transcoded: dict[str, str] = {}
    why_not: Counter[str] = Counter()
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase) or f"{name}.weight" not in sources:
            continue
        hf_names = sources[f"{name}.weight"]
        kinds = {types[h] for h in hf_names}
        qtype = next(iter(kinds)) if len(kinds) == 1 else None
        if kinds <= set(DEQUANTIZED_TYPES) and int8:
            exact = _common_target(tensors, hf_names)
            if packed_as(exact, module):
                use_block_method(module, method_for(exact), dtype)
                transcoded.update(dict.fromkeys(hf_names, exact))
                continue
            if packed_as(REQUANTIZED_TYPE, module):
                use_block_method(module, method_for(REQUANTIZED_TYPE), dtype)
                requantized.update(hf_names)
                continue
        if qtype not in BLOCK_TYPES:
            why_not[", ".join(sorted(kinds))] += 1
            continue
        if module.in_features % BLOCK_TYPES[qtype].block_elems:
            why_not[f"{qtype} (row shards of {module.in_features} columns split blocks)"] += 1
            continue
        if not _runs_packed_if_needed(method_for(qtype), module.weight.shape[0]):
            why_not[f"{qtype} (no packed int8 kernel for it here)"] += 1
            continue
        use_block_method(module, method_for(qtype), dtype)
        kept.update(hf_names)
    kept |= _keep_vocab_blocks(model, types, method_for)
    kept_types = Counter(types[h] for h in kept)
    rest = {h: t for h, t in types.items()
            if h not in kept and h not in requantized and h not in transcoded}
    requantized_types = {h: types[h] for h in requantized}
    transcoded_types = Counter(f"{types[h]} -> {t}" for h, t in transcoded.items())
    int8_types = sorted(q for q, m in methods.items() if m.int8_activations)
    vnni = sorted(q for q, m in methods.items() if m.vnni)
    logger.info("GGUF weights kept quantized: %s;%s%s dequantized to %s: %s%s%s%s.",
                ", ".join(f"{t} ({n} tensors)" for t, n in sorted(kept_types.items()))
                or "none",
                " re-encoded exactly as kernel blocks: "
                f"{', '.join(f'{t} ({n} tensors)' for t, n in sorted(transcoded_types.items()))};"
                * bool(transcoded),
                f" requantized to {REQUANTIZED_TYPE} blocks: {_summary(requantized_types)};"
                * bool(requantized), dtype, _summary(rest),
                f"; int8 activations for {', '.join(int8_types)}" * bool(int8_types),
                f"; regrouped for the packed int8 kernel: {', '.join(vnni)}" * bool(vnni),
                "".join(f"; linear layers left float ({n}): {k}" for k, n in why_not.items()))
    return GgufLoadPlan(frozenset(kept), frozenset(requantized), transcoded)


def _common_target(tensors: Mapping[str, ReaderTensor], hf_names: list[str]) -> str | None:
    """The one block type every tensor in `hf_names` (HF name -> the file's tensor) re-encodes
    to exactly (`gguf_transcode.target_type`: reads their scale fields), else None."""
    targets = {target_type(tensors[h].tensor_type.name, tensors[h].data) for h in hf_names}
    return targets.pop() if len(targets) == 1 else None


def _vocab_method(qtype: str, cols: int, method_for: Callable[[str], GgufBlockLinearMethod]
                  ) -> GgufBlockLinearMethod | None:
    if qtype not in BLOCK_TYPES or cols % BLOCK_TYPES[qtype].block_elems:
        return None
    return method_for(qtype)


def _runs_packed_if_needed(method: GgufBlockLinearMethod, rows: int) -> bool:
    """Whether a product of `rows` output rows over `method`'s blocks has a fast kernel: every
    type but PACKED_ONLY_TYPES, and those where the layer gets packed (module doc)."""
    return method.qtype not in PACKED_ONLY_TYPES or method.packs(rows)


def _keep_vocab_blocks(model: nn.Module, types: dict[str, str],
                       method_for: Callable[[str], GgufBlockLinearMethod]) -> set[str]:
    """Blocks for the embedding and the LM head where their types allow (module doc); returns
    the HF names kept."""
    kept: set[str] = set()
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    name = "model.embed_tokens.weight"
    if embed is not None and name in types:
        method = _vocab_method(types[name], embed.embedding_dim, method_for)
        rows = embed.weight.shape[0]
        if method is not None and head is not None and head.tied \
                and not _runs_packed_if_needed(method, rows):   # the head multiplies them
            method = None
        if method is not None:
            embed.weight = nn.Parameter(torch.empty(
                rows, method.block_type.row_bytes(embed.embedding_dim), dtype=torch.uint8),
                requires_grad=False)
            set_weight_loader(embed.weight, embed._load_rows)
            embed.gguf_blocks = method
            kept.add(name)
    if head is None:
        return kept
    if head.tied:
        if embed is not None and embed.gguf_blocks is not None:
            head.linear_method = embed.gguf_blocks
        return kept
    source = "lm_head.weight" if "lm_head.weight" in types else name  # a tied head on a
    if source not in types:                                            # later pipeline stage
        return kept
    cols = head.weight.shape[1]
    method = _vocab_method(types[source], cols, method_for)
    if method is not None and _runs_packed_if_needed(method, head.weight.shape[0]):
        head.linear_method = method
        method.create_weights(head, cols, head.weight.shape[0], bias=False,
                              dtype=head.weight.dtype, weight_loader=head._load_rows)
        kept.add(source)
    return kept


def _summary(types: dict[str, str]) -> str:
    """'Q8_0 (1 tensors), F32 (61 tensors)' for a name -> type map."""
    counts = Counter(types.values())
    return ", ".join(f"{t} ({n} tensors)" for t, n in counts.most_common()) or "none"
