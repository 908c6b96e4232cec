"""Read a GGUF file's weights as HF-named torch tensors, dequantized one at a time.

`iterate_gguf(path, dtype)` yields (hf_name, tensor) for every weight tensor in file order
(names from `sluice.model_spec.gguf.hf_tensor_name`), ready for `model.load_weights`. Each tensor
is dequantized by the `gguf` package (numpy, from the memory-mapped file) to float32, reordered
to the HF layout, then cast to `dtype`; only one tensor's float32 copy is alive at a time.

Layout conventions of llama.cpp's converter, undone here:

* Dimensions are listed innermost first: a GGUF tensor of shape [ne0, ne1] is the row-major
  torch tensor [ne1, ne0] (ne0 is contiguous). `dequantize` already returns [ne1, ne0], e.g.
  token_embd [hidden, vocab] -> [vocab, hidden], attn_q [hidden, H*D] -> [H*D, hidden].
* For the llama architecture the converter permuted the rows of the Q and K projections
  (weights and biases) from HF's rotate-half RoPE layout to llama.cpp's interleaved-pairs
  layout. Within each head of D rows, HF row h*D + half*(D/2) + j (half in {0, 1},
  j < D/2) was moved to row h*D + 2*j + half:

      HF:   [x0 x1 ... x(D/2-1) | y0 y1 ... y(D/2-1)]      GGUF: [x0 y0 x1 y1 ... ]

  `unpermute_qk` moves it back; heads = num_attention_heads for Q, num_key_value_heads for K.
  qwen2 and qwen3 files are not permuted.

Tensors named in `keep_quantized` (linear weights that run from their blocks, chosen by
`sluice.model.gguf_quant`) are yielded as their raw blocks instead: uint8 [rows, row bytes],
a copy of the file's bytes with the Q/K rows un-permuted the same way (a row is whole blocks).
Those named in `transcode` (layers stored in a type without block kernels whose values a
kernel type holds exactly, chosen by `gguf_quant` too) are yielded as the blocks of that type
(`sluice.model.gguf_transcode.transcode`), un-permuted as raw blocks are. Those named in
`requantize` (the other layers stored in such a type) are dequantized and un-permuted as float
tensors are, then yielded as the Q8_0 blocks of those values
(`sluice.model.int8_quant.quantize_q8_0`), uint8 [rows, K / 32 * 34].
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from sluice.errors import ModelLoadError
from sluice.model_spec.gguf import (GGUF_ARCHITECTURES, NON_WEIGHT_TENSORS, SUPPORTED_TENSOR_TYPES,
                                    field_value, gguf_reader, hf_tensor_name)

if TYPE_CHECKING:
    from gguf import GGUFReader

PERMUTED_QK_ARCHITECTURES = ("llama",)


def unpermute_qk(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (see the module docstring) on a [H*D, ...] array:
    view rows as [H, D/2, 2], swap to [H, 2, D/2], flatten back."""
    n = rows.shape[0]
    if n % (2 * num_heads):
        raise ValueError(f"{n} rows do not split into {num_heads} heads of even size")
    grouped = rows.reshape(num_heads, n // num_heads // 2, 2, *rows.shape[1:])
    return grouped.swapaxes(1, 2).reshape(rows.shape)


Q1_0_BLOCK = (128, 18)
"""Q1_0's values and bytes per block (llama.cpp's `block_q1_0`: fp16 d, then 16 sign bytes)."""


def dequantize_q1_0(data: np.ndarray) -> np.ndarray:
    """llama.cpp's Q1_0 blocks (gguf-py 0.19 has no decoder) as float32: value j of a block is
    d if bit j % 8 of sign byte j / 8 is set, else -d (`dequantize_row_q1_0`). `data`:
    [..., row bytes] -> [..., row bytes / 18 * 128]."""
    values, nbytes = Q1_0_BLOCK
    blocks = np.ascontiguousarray(data, np.uint8).reshape(-1, nbytes)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)            # [n, 1]
    bits = np.unpackbits(blocks[:, 2:], axis=1, bitorder="little")          # [n, 128]
    out = np.where(bits == 1, d, -d).astype(np.float32)
    return out.reshape(*data.shape[:-1], data.shape[-1] // nbytes * values)


def decode_blocks(data: np.ndarray, type_name: str) -> np.ndarray:
    """GGUF bytes of type `type_name` as float32 values: gguf-py's decoder, or sluice's own
    for the types gguf-py cannot decode (Q1_0)."""
    import gguf
    from gguf.quants import dequantize

    if type_name == "Q1_0":
        return dequantize_q1_0(data)
    return dequantize(data, gguf.GGMLQuantizationType[type_name])


def dequantize_tensor(tensor) -> np.ndarray:
    """A `gguf.ReaderTensor` as a float32 array in torch (row-major) shape, i.e. the GGUF
    dims reversed; a fresh writable array (never a view of the memory map)."""
    values = decode_blocks(tensor.data, tensor.tensor_type.name)
    expected = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    values = np.asarray(values, dtype=np.float32)
    if values.shape != expected:
        values = values.reshape(expected)
    if not values.flags.writeable or not values.flags.c_contiguous or \
            np.may_share_memory(values, tensor.data):
        values = np.array(values, dtype=np.float32, order="C", copy=True)
    return values


def iterate_gguf(gguf_path: str | Path | GGUFReader, dtype: torch.dtype,
                 keep_quantized: Collection[str] = frozenset(),
                 requantize: Collection[str] = frozenset(),
                 transcode: Mapping[str, str] | None = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, tensor in `dtype`) for every weight in the GGUF file `gguf_path` (a path or
    an open reader), or its raw blocks for the names in `keep_quantized`, blocks of the type
    `transcode[name]` for the names in `transcode`, or Q8_0 blocks of its values for those in
    `requantize` (see the module docstring). Raises `ModelLoadError` naming the file for an
    unreadable or unsupported file or a tensor that cannot be dequantized."""
    reader = gguf_reader(gguf_path)
    path = Path(reader.data.filename)
    transcode = transcode or {}
    arch = field_value(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                             f"{', '.join(GGUF_ARCHITECTURES)}.")
    num_heads = field_value(reader, f"{arch}.attention.head_count")
    num_kv_heads = field_value(reader, f"{arch}.attention.head_count_kv", num_heads)
    permuted = arch in PERMUTED_QK_ARCHITECTURES
    for t in reader.tensors:
        if t.name in NON_WEIGHT_TENSORS:
            continue
        name = hf_tensor_name(t.name)
        if name is None:
            raise ModelLoadError(f"{path}: tensor {t.name} is not part of the {arch} "
                                 "architecture sluice runs.")
        if t.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
            raise ModelLoadError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which "
                                 f"is not supported; supported: "
                                 f"{', '.join(SUPPORTED_TENSOR_TYPES)}.")
        blocks = None
        if name in keep_quantized:
            blocks = np.array(t.data, dtype=np.uint8, order="C", copy=True)
        elif name in transcode:
            blocks = _transcoded(path, t, transcode[name])
        if blocks is not None:
            if permuted and (".q_proj." in name or ".k_proj." in name):
                blocks = unpermute_qk(blocks, num_heads if ".q_proj." in name else num_kv_heads)
            yield name, torch.from_numpy(np.ascontiguousarray(blocks))
            continue
        try:
            values = dequantize_tensor(t)
            if permuted and (".q_proj." in name or ".k_proj." in name):
                values = unpermute_qk(values, num_heads if ".q_proj." in name else num_kv_heads)
        except (ValueError, TypeError, NotImplementedError, AssertionError) as e:
            raise ModelLoadError(f"{path}: tensor {t.name} ({t.tensor_type.name}, GGUF shape "
                                 f"{t.shape.tolist()}) cannot be read: {e}") from None
        if name in requantize:
            from sluice.model.int8_quant import quantize_q8_0
            yield name, quantize_q8_0(torch.from_numpy(values))
            del values
            continue
        yield name, torch.from_numpy(values).to(dtype)
        del values


def _transcoded(path: Path, tensor, target: str) -> np.ndarray:
    """`tensor`'s blocks re-encoded exactly as `target` blocks (the plan's `target_type`),
    [rows, target row bytes]."""
    from sluice.model.gguf_transcode import transcode

    source = tensor.tensor_type.name
    try:
        return transcode(source, np.asarray(tensor.data), target)
    except ValueError as e:
        raise ModelLoadError(f"{path}: tensor {tensor.name} ({source}) cannot be read as "
                             f"{target} blocks: {e}") from None
