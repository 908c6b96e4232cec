"""Linear layers that keep a GGUF file's quantized blocks: `GgufBlockLinearMethod`.

llama.cpp's quantized types store a weight row (one output channel, `in_features` values) as
consecutive blocks; each block holds `block_elems` values in `block_bytes` bytes (fp16 scales
and packed integers; the byte layouts of each type are spelled out in
sluice/model/csrc/quant_linear.cpp):

    type   GGML id  block_elems  block_bytes  bits/weight
    Q4_0      2         32           18          4.5
    Q4_1      3         32           20          5.0
    Q5_0      6         32           22          5.5
    Q5_1      7         32           24          6.0
    Q8_0      8         32           34          8.5
    Q2_K     10        256           84          2.63
    Q3_K     11        256          110          3.44
    Q4_K     12        256          144          4.5
    Q5_K     13        256          176          5.5
    Q6_K     14        256          210          6.56
    IQ4_NL   20         32           18          4.5   (value = d * a 16-entry int8 codebook
                                                        entry: the 4-bit index as Q4_0 stores)
    IQ4_XS   23        256          136          4.25  (IQ4_NL's codebook, a 6-bit scale per
                                                        32 values)
    F8_E4M3 200         32           36          9.0   (sluice's own, no GGML type: a float32
                                                        d and 32 float8_e4m3fn values; an
                                                        FP8 checkpoint's weights)

A layer with this method holds `layer.weight` = the file's bytes as a uint8 Parameter
[out_features, in_features / block_elems * block_bytes] (row n = output channel n, as in the
file: GGUF dims [in, out] are the row-major [out, in] of the HF layout) and a float `bias`.
Because blocks run along the input dimension, every row operation of the loaders works on the
packed rows unchanged: the Q/K row un-permutation of llama files (`gguf_weights.unpermute_qk`),
the fused QKV / gate-up row offsets and column-parallel row shards. A row-parallel shard
(columns) narrows whole blocks, so it needs `in_features` per rank to be a multiple of
`block_elems` (checked by `sluice.model.gguf_quant`, which leaves such a layer dequantized).

The product: the C++ `gguf_linear` (layer ops 'cpu', float32 activations): one to eight rows
stream each weight row's blocks once, unpacked in registers (fp32 FMA with the activations);
more rows dequantize panels of rows into an fp32 tile and run sgemm on it (Q2_K, Q3_K, IQ4_NL
and IQ4_XS, which have only the packed kernel below, take the panels at every row count when not
packed). With
`bf16_products`, more than eight rows multiply x and the weight rounded to bf16 (float32 sums)
on every CPU: on one with AMX-BF16 as bf16 tiles on AMX (csrc/amx_gemm.cpp: 3-25x the sgemm at
64 rows), elsewhere by rounding before the sgemm. Anything else (no C++ operators, another
activation dtype, autograd) takes `dequantize_blocks` (gguf-py's numpy decoder, the reference)
and F.linear, with the same roundings: exact, but it dequantizes the whole weight per call.

`bf16_products` is the model's choice (`sluice.model.gguf_quant`, `sluice.model.int8_quant`):
set where bf16 rounding is already the contract — `--dtype bfloat16` (a bf16 GEMM rounds its
inputs to bf16 for every 16-bit weight too) and `--quantization int8` (whose decode steps round
activations far more coarsely, to int8 per 32 values).

`int8_activations` (INT8_ACTIVATION_TYPES: every type here but F8_E4M3, each 32-value block
of the weight (two 16-value sub-blocks for Q6_K) meeting one activation block in vpmaddubsw;
`--quantization int8` sets it, and so does a GGUF file's default,
`gguf_quant.llama_cpp_numerics`): up to MAX_INT8_ACTIVATION_ROWS rows, the activations are
quantized per 32-element block (`quantize_activations_q8`) and the kernels
compute integer dot products; the reference path applies the same quantization before
F.linear.

VNNI-packed blocks (`vnni_packed`): on an x86 CPU with AVX2 or AVX512-VNNI, a layer of any block
type with int8 activations and `out_features` a multiple of 16 has its blocks regrouped in
place at load (`process_weights_after_loading`: the C++ `vnni_pack`, the same bytes per 16 rows
in vpdpbusd's order, Q5's fifth bits as lane masks; csrc/vnni_linear.cpp) and every row count
— prefill too — quantizes its activations per 32 values and runs integer block sums (Q8_0:
1.5-1.9x oneDNN's bf16 GEMM on an AMD EPYC with AVX-512 at 64-512 rows, where the float path
above ran at ~0.4x; the k-quants 5-6x their dequantize-and-sgemm path at 64 rows). Such a
layer's `layer_kernel_type` carries VNNI_PACKED_FLAG; `stored_weight` unpacks a copy. An LM
head tied to a block embedding is regrouped too (the embedding's lookups, `dequantize_rows`,
unpack the 16-row tiles that hold their ids); a weight that any other module reads is never
regrouped (`plan`).

The fused decode stack lists this method in its `FastPathSupport` (its projections run
`gguf_linear` in C++); the greedy screen, which reads a float LM head, does not and steps aside.
`--quantization int8` (`sluice.model.int8_quant`) gives float checkpoints' linear layers this
method too, with weights quantized to Q8_0 at load.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sluice.model.layers.layer_ops import fast_path_ok
from sluice.model.layers.linear_method import LinearMethod, WeightLoader, set_weight_loader


F8_BLOCK_TYPE = "F8_E4M3"
"""sluice's block of 32 float8_e4m3fn weights with a float32 scale d (value = d * e4m3): the
kernels' form of an FP8 checkpoint's weights (`sluice.model.fp8_checkpoint`)."""


@dataclass(frozen=True)
class BlockType:
    """A GGML block type the kernels run (module doc)."""
    name: str
    ggml_id: int
    block_elems: int
    block_bytes: int

    def row_bytes(self, in_features: int) -> int:
        """Bytes of one weight row of `in_features` values (a multiple of block_elems)."""
        if in_features % self.block_elems:
            raise ValueError(f"{self.name} rows hold multiples of {self.block_elems} values, "
                             f"not {in_features}")
        return in_features // self.block_elems * self.block_bytes


BLOCK_TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("Q4_0", 2, 32, 18), BlockType("Q4_1", 3, 32, 20), BlockType("Q5_0", 6, 32, 22),
    BlockType("Q5_1", 7, 32, 24), BlockType("Q8_0", 8, 32, 34),
    BlockType("Q2_K", 10, 256, 84), BlockType("Q3_K", 11, 256, 110),
    BlockType("Q4_K", 12, 256, 144),
    BlockType("Q5_K", 13, 256, 176), BlockType("Q6_K", 14, 256, 210),
    BlockType("IQ4_NL", 20, 32, 18), BlockType("IQ4_XS", 23, 256, 136),
    BlockType(F8_BLOCK_TYPE, 200, 32, 36))}
"""The block types the linear layers run directly, by name: the GGML types by their GGUF type
name, and sluice's F8_E4M3 (which no GGUF file holds)."""

PACKED_ONLY_TYPES = ("Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS")
"""The types whose only fast kernel is the packed int8 one (`vnni_packed`): elsewhere every call
dequantizes panels of the weight (correct, slow), so `gguf_quant` keeps them only where they
will be packed."""

INT8_ACTIVATION_TYPES = tuple(t for t in BLOCK_TYPES if t != F8_BLOCK_TYPE)
"""The types whose kernels take int8 activations (fp8 values are not integers)."""
INT8_ACTIVATIONS_FLAG = 256     # or'ed into the type id given to gguf_linear
BF16_PRODUCTS_FLAG = 512        # likewise: more rows may multiply in bf16 on AMX
VNNI_PACKED_FLAG = 1024         # likewise: blocks regrouped for vpdpbusd, int8 at any M
MAX_INT8_ACTIVATION_ROWS = 8    # the kernels' row limit for int8 activations (kMaxQuantSkinnyRows)


def quantize_activations_q8(x: torch.Tensor) -> torch.Tensor:
    """float32 [..., K] (K a multiple of 32) -> the same shape, each 32-element block b of a row
    replaced by xq * xd: xd = max|x_b| / 127, xq = round(x_b * (1 / xd)) (ties to even), as the
    kernels quantize activations (an all-zero block stays 0)."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(blocks * inv) * d).reshape(x.shape)


def dequantize_blocks(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """uint8 [N, row bytes] blocks of type `qtype` -> float32 [N, in_features], decoded by
    gguf-py (numpy; the reference the kernels are tested against), F8_E4M3 by torch's e4m3
    conversion (d * float32(e4m3), one rounding)."""
    if qtype == F8_BLOCK_TYPE:       # float32 d, then the block's e4m3 values
        raw = blocks.detach().cpu().contiguous().view(
            blocks.shape[0], -1, BLOCK_TYPES[qtype].block_bytes)
        d = raw[:, :, :4].contiguous().view(torch.float32)          # [N, blocks, 1]
        values = raw[:, :, 4:].contiguous().view(torch.float8_e4m3fn).to(torch.float32)
        return (values * d).reshape(blocks.shape[0], -1)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    values = dequantize(np.ascontiguousarray(blocks.detach().cpu().numpy()),
                        GGMLQuantizationType[qtype])
    return torch.from_numpy(np.asarray(values, dtype=np.float32))


class GgufBlockLinearMethod(LinearMethod):
    """The weight as GGUF blocks of one type (module doc); one instance per type per model.

    `create_weights` registers `layer.weight` uint8 [out, row bytes] and `layer.bias` (float, of
    the given dtype, or None); `apply` computes x @ dequant(W).T (+ bias) through `ops`'
    `gguf_linear` where it applies (float32 CPU activations), else the reference."""

    def __init__(self, ops: ModuleType | None, qtype: str,
                 int8_activations: bool = False, bf16_products: bool = False) -> None:
        self.ops = ops
        self.block_type = BLOCK_TYPES[qtype]
        self.int8_activations = int8_activations and qtype in INT8_ACTIVATION_TYPES
        self.bf16_products = bf16_products
        #: int8 activations on an x86 CPU with AVX2 or AVX512-VNNI: layers get packed at load
        self.vnni = self.int8_activations and ops is not None and bool(ops.packed_int8_kernel())
        self._shared_weights: set[int] = set()

    @property
    def qtype(self) -> str:
        return self.block_type.name

    @property
    def kernel_type(self) -> int:
        """The type id `gguf_linear` (and the fused decode stack) take: the GGML id, with
        INT8_ACTIVATIONS_FLAG set for int8 activations and BF16_PRODUCTS_FLAG for bf16
        products."""
        return (self.block_type.ggml_id | (INT8_ACTIVATIONS_FLAG if self.int8_activations else 0)
                | (BF16_PRODUCTS_FLAG if self.bf16_products else 0))

    def layer_kernel_type(self, layer: nn.Module) -> int:
        """`kernel_type` for this layer: with VNNI_PACKED_FLAG once its weight is packed."""
        return self.kernel_type | (VNNI_PACKED_FLAG if getattr(layer, "vnni_packed", False)
                                   else 0)

    def plan(self, model: nn.Module) -> None:
        """Note the parameters that a module other than a linear layer or a block embedding
        reads (`_shared_weights`): those keep the GGUF layout. An embedding whose weight a tied
        LM head packs reads its rows through `dequantize_rows`, which follows the packing."""
        if self.vnni:
            self._shared_weights = {
                id(p) for m in model.modules()
                if not isinstance(m.__dict__.get("linear_method"), LinearMethod)
                and not isinstance(getattr(m, "gguf_blocks", None), GgufBlockLinearMethod)
                for p in m.parameters(recurse=False)}

    def packs(self, rows: int) -> bool:
        """Whether a weight of `rows` output rows gets regrouped for the packed kernel (`vnni`,
        whole 16-row tiles; a CPU weight that no other module reads, see
        `process_weights_after_loading`)."""
        return self.vnni and rows % 16 == 0

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """With `vnni`: regroup the layer's blocks in place for the VNNI kernel (module
        doc) where its shape allows and no other module reads the weight."""
        weight = layer.weight
        layer.vnni_packed = False
        if (self.packs(weight.shape[0]) and weight.device.type == "cpu"
                and weight.dtype == torch.uint8 and weight.is_contiguous()
                and id(weight) not in self._shared_weights):
            self.ops.vnni_pack(weight.data, self.block_type.ggml_id)
            layer.vnni_packed = True
            weight.vnni_packed = True    # for a tied embedding's lookups (`dequantize_rows`)

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int, *,
                       bias: bool, dtype: torch.dtype | None,
                       weight_loader: WeightLoader) -> None:
        row_bytes = self.block_type.row_bytes(in_features)
        layer.weight = nn.Parameter(torch.empty(out_features, row_bytes, dtype=torch.uint8),
                                    requires_grad=False)
        layer.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
                      if bias else None)
        for p in (layer.weight, layer.bias):
            if p is not None:
                set_weight_loader(p, weight_loader)

    def stored_weight(self, layer: nn.Module) -> torch.Tensor:
        """The layer's blocks as float32 [out, in] in their stored column order, what the
        kernels multiply (a fresh tensor)."""
        blocks = layer.weight
        if getattr(layer, "vnni_packed", False):
            blocks = self._unpack(blocks.detach().cpu().clone()).to(blocks.device)
        return dequantize_blocks(blocks, self.qtype)

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        """The layer's weight as float32 [out, in] (a fresh tensor)."""
        return self.stored_weight(layer)

    def _unpack(self, blocks: torch.Tensor) -> torch.Tensor:
        """VNNI-packed CPU blocks -> the GGUF layout, in place (the C++ `vnni_unpack`; only the
        operators pack a weight, so they are loaded here for a method without them, as a
        reference model's)."""
        from sluice.model.cpu_ops import load_cpu_ops
        ops = self.ops if self.ops is not None else load_cpu_ops()
        ops.vnni_unpack(blocks, self.block_type.ggml_id)
        return blocks

    def dequantize_rows(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` [n] of a block weight (uint8 [N, row bytes]) as float32 [n, in] (an
        embedding lookup): the C++ `gguf_dequantize` of just those rows, or the reference. A
        weight a tied LM head packed for VNNI (`weight.vnni_packed`) is read by unpacking the
        16-row tiles that hold the ids."""
        if getattr(weight, "vnni_packed", False):
            tiles, where = torch.unique(ids // 16, return_inverse=True)
            rows = weight.view(-1, 16 * weight.shape[1]).index_select(0, tiles)  # a copy
            rows = self._unpack(rows.view(-1, weight.shape[1]))
            rows = rows.index_select(0, where * 16 + ids % 16)
        else:
            rows = weight.index_select(0, ids)
        if self.ops is None or rows.device.type != "cpu":
            return dequantize_blocks(rows, self.qtype).to(rows.device)
        out = torch.empty(rows.shape[0], rows.shape[1] // self.block_type.block_bytes
                          * self.block_type.block_elems)
        self.ops.gguf_dequantize(out, rows, self.block_type.ggml_id)
        return out

    def apply(self, layer: nn.Module, x: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        weight = layer.weight
        x2 = x.reshape(-1, x.shape[-1])
        if self.ops is None or not fast_path_ok(x2, bias) or x.device != weight.device \
                or (bias is not None and not bias.is_contiguous()):
            w = self.stored_weight(layer).to(device=x.device, dtype=x.dtype)
            if self.int8_activations and (x2.shape[0] <= MAX_INT8_ACTIVATION_ROWS
                                          or getattr(layer, "vnni_packed", False)):
                x = quantize_activations_q8(x.float()).to(x.dtype)
            elif self.bf16_products and x2.shape[0] > MAX_INT8_ACTIVATION_ROWS:
                x, w = (t.to(torch.bfloat16).to(x.dtype) for t in (x, w))
            return F.linear(x, w, bias)
        out = x2.new_empty(x2.shape[0], weight.shape[0])
        self.ops.gguf_linear(out, x2, weight, self.layer_kernel_type(layer), bias)
        return out.view(*x.shape[:-1], weight.shape[0])

    def __repr__(self) -> str:
        notes = (", int8 activations" * self.int8_activations
                 + ", bf16 products" * self.bf16_products + ", VNNI" * self.vnni)
        return f"{type(self).__name__}({self.qtype}{notes})"
